"""Loading and adapting datasets: every registered adapter on hand-made rows, local files and directories laid out
like the hub's, and the error messages (unknown name, missing column, missing file, offline hub)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kuberlhf.contract.spec import DatasetRef, DataSpec
from kuberlhf.data import ADAPTERS, DataError, get_adapter, load_rows, load_texts
from kuberlhf.data.sources import adapt

# One hand-made raw row per registered dataset, in the dataset's own columns, and the rows we expect.
HH = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: what is two plus two?\n\nAssistant:"
RAW: dict[str, tuple[dict, tuple[str, str, str]]] = {
    "prompt/chosen/rejected": (
        {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."},
        (" Human: What is two plus two? Assistant:", " Four.", " Five.")),
    "Dahoas/rm-static": (
        {"prompt": HH, "response": " Four.", "chosen": " Four.", "rejected": " Go away."},
        (" " + HH.strip(), " Four.", " Go away.")),
    "Dahoas/full-hh-rlhf": (
        {"prompt": HH, "response": " Four.", "chosen": " Four.", "rejected": " Go away."},
        (" " + HH.strip(), " Four.", " Go away.")),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        {"prompt": "Name a red fruit.", "chosen": "An apple.", "rejected": "A banana."},
        (" Human: Name a red fruit. Assistant:", " An apple.", " A banana.")),
    "yitingxie/rlhf-reward-datasets": (
        {"prompt": "\n\nHuman: Name a red fruit.\n\n", "chosen": "Assistant: An apple.",
         "rejected": "Assistant: A banana."},
        (" Human: Name a red fruit.\n\nAssistant:", " An apple.", " A banana.")),
    "openai/webgpt_comparisons": (
        {"question": {"full_text": "Why is the sky blue?", "id": "q1", "dataset": "eli5"},
         "quotes_0": {"title": [], "extract": []}, "answer_0": "Air scatters light [1].", "tokens_0": [],
         "score_0": -1.0, "quotes_1": {"title": [], "extract": []}, "answer_1": "Rayleigh scattering [1, 2].",
         "tokens_1": [], "score_1": 1.0},
        (" Human: Why is the sky blue? Assistant:", " Rayleigh scattering.", " Air scatters light.")),
    "stanfordnlp/SHP": (
        {"post_id": "p", "domain": "askscience", "upvote_ratio": 0.9, "history": "Why is the sea salty?",
         "c_root_id_A": "a", "c_root_id_B": "b", "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": 3,
         "score_B": 9, "human_ref_A": "Rivers carry salt.", "human_ref_B": "It just is.", "labels": 1,
         "seconds_difference": 1.0, "score_ratio": 3.0},
        (" Human: Why is the sea salty? Assistant:", " Rivers carry salt.", " It just is.")),
    "Anthropic/hh-rlhf": (
        {"chosen": HH + " Four.", "rejected": HH + " Go away."},
        (" " + HH.strip(), " Four.", " Go away.")),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": (
        {"prompt": "USER: Say hi. ASSISTANT:", "label": "Hi!"},
        (" Human: Say hi. Assistant:", " Hi!", "")),
}


def test_every_registered_adapter_has_a_hand_made_case() -> None:
    assert {a.name for a in ADAPTERS.values()} == set(RAW)


@pytest.mark.parametrize("name", sorted(RAW))
def test_adapter_on_hand_made_rows(name: str) -> None:
    raw_row, expected = RAW[name]
    out = adapt(datasets.Dataset.from_list([raw_row]), get_adapter(name), f"dataset {name!r}")
    assert out.column_names == ["prompt", "chosen", "rejected"]
    assert (out[0]["prompt"], out[0]["chosen"], out[0]["rejected"]) == expected


def test_webgpt_ties_dropped_and_shp_label_zero_picks_b() -> None:
    row = dict(RAW["openai/webgpt_comparisons"][0], score_0=0.0, score_1=0.0)
    keep = dict(RAW["openai/webgpt_comparisons"][0], score_0=2.0, score_1=0.0)
    out = adapt(datasets.Dataset.from_list([row, keep]), get_adapter("openai/webgpt_comparisons"), "x")
    assert len(out) == 1 and out[0]["chosen"] == " Air scatters light."
    shp = dict(RAW["stanfordnlp/SHP"][0], labels=0)
    out = adapt(datasets.Dataset.from_list([shp]), get_adapter("stanfordnlp/SHP"), "x")
    assert (out[0]["chosen"], out[0]["rejected"]) == (" It just is.", " Rivers carry salt.")


def test_local_jsonl_json_parquet_files(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "cols.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for name in ("p.jsonl", "p.json", "cols.json", "p.parquet"):
        out = load_rows(DatasetRef(path=str(tmp_path / name)))
        assert out["prompt"] == [f" Human: q{i} Assistant:" for i in range(5)], name
        assert out["rejected"][3] == " bad 3"


def test_sft_only_file_without_rejected(tmp_path: Path) -> None:
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    out = load_rows(DatasetRef(path=str(tmp_path / "sft.jsonl")))
    assert out[0] == {"prompt": " Human: hi Assistant:", "chosen": " hello", "rejected": ""}


def _hub_layout(root: Path, rows: list[dict], fmt: str = "parquet") -> Path:
    """A directory like a hub dataset repository: data/{train,test}-00000-of-00001.<fmt>."""
    (root / "data").mkdir(parents=True)
    for split, part in (("train", rows[:-1]), ("test", rows[-1:])):
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(part), root / "data" / f"{split}-00000-of-00001.parquet")
        else:
            (root / "data" / f"{split}-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


def test_local_copy_of_rm_static_uses_its_adapter(tmp_path: Path) -> None:
    # Dahoas/rm-static's own columns, and a prompt already in Human/Assistant form.
    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "response": f" a{i}", "chosen": f" a{i}",
             "rejected": f" b{i}"} for i in range(4)]
    root = _hub_layout(tmp_path / "mirror" / "Dahoas" / "rm-static", rows)
    out = load_rows(DatasetRef(path=str(root)))
    assert len(out) == 4  # both splits, train first
    assert out[0] == {"prompt": " Human: q0\n\nAssistant:", "chosen": " a0", "rejected": " b0"}
    assert out[3]["chosen"] == " a3"


def test_local_copy_of_hh_rlhf_by_name_hint(tmp_path: Path) -> None:
    # The path says nothing about the dataset; the adapter hint does (the columns alone would also match).
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad"}
            for i in range(3)]
    root = _hub_layout(tmp_path / "anything", rows, fmt="jsonl")
    out = load_rows(DatasetRef(path=str(root), adapter="Anthropic/hh-rlhf"))
    assert out[2] == {"prompt": " Human: q2\n\nAssistant:", "chosen": " good", "rejected": " bad"}


def test_local_copy_of_webgpt_in_hub_cache_spelling(tmp_path: Path) -> None:
    raw, expected = RAW["openai/webgpt_comparisons"]
    root = _hub_layout(tmp_path / "openai___webgpt_comparisons", [raw, raw])
    out = load_rows(DatasetRef(path=str(root)))
    assert (out[0]["prompt"], out[0]["chosen"], out[0]["rejected"]) == expected


def test_save_to_disk_directory(tmp_path: Path) -> None:
    raw, expected = RAW["stanfordnlp/SHP"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([raw]),
                          "validation": datasets.Dataset.from_list([raw])}).save_to_disk(tmp_path / "shp")
    out = load_rows(DatasetRef(path=str(tmp_path / "shp"), adapter="stanfordnlp/SHP"))
    assert len(out) == 2 and (out[1]["prompt"], out[1]["chosen"], out[1]["rejected"]) == expected


def test_builtin_datasets() -> None:
    pairs = load_rows(DatasetRef(name="kuberlhf/synthetic-pairs"))
    assert len(pairs) == 4000
    assert all(p.startswith(" Human: ") and p.endswith(" Assistant:") for p in pairs["prompt"][:50])
    assert all(r for r in pairs["rejected"])
    texts = load_texts(DatasetRef(name="kuberlhf/synthetic-corpus"))
    assert texts.column_names == ["text"] and len(texts) == 2000


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_name_lists_known_names() -> None:
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_rows(DatasetRef(name="nobody/no-such-dataset"))
    assert time.monotonic() - start < 10  # offline: fails fast instead of retrying the hub
    msg = str(err.value)
    assert "nobody/no-such-dataset" in msg and "local path" in msg
    for name in ("Dahoas/rm-static", "stanfordnlp/SHP", "kuberlhf/synthetic-pairs"):
        assert name in msg


def test_unknown_builtin_and_unknown_adapter() -> None:
    with pytest.raises(DataError, match=r"unknown built-in dataset 'kuberlhf/nope'.*kuberlhf/synthetic-pairs"):
        load_rows(DatasetRef(name="kuberlhf/nope"))
    with pytest.raises(DataError, match=r"unknown dataset adapter 'foo/bar'.*Dahoas/rm-static"):
        load_rows(DatasetRef(path="/x.jsonl", adapter="foo/bar"))


def test_known_hub_name_offline_says_use_local_path() -> None:
    with pytest.raises(DataError) as err:
        load_rows(DatasetRef(name="Dahoas/rm-static"))
    msg = str(err.value)
    assert "'Dahoas/rm-static'" in msg and "offline" in msg and "path: /data/Dahoas/rm-static" in msg


def test_missing_columns_named_with_file(tmp_path: Path) -> None:
    path = tmp_path / "shp.jsonl"
    raw = {k: v for k, v in RAW["stanfordnlp/SHP"][0].items() if k not in ("labels", "human_ref_B")}
    path.write_text(json.dumps(raw) + "\n")
    with pytest.raises(DataError) as err:
        load_rows(DatasetRef(path=str(path), adapter="stanfordnlp/SHP"))
    msg = str(err.value)
    assert str(path) in msg and "human_ref_B" in msg and "labels" in msg and "stanfordnlp/SHP" in msg


def test_columns_matching_nothing(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"odd.jsonl.*\['question', 'answer'\].*prompt, chosen"):
        load_rows(DatasetRef(path=str(path)))


def test_missing_file_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.jsonl' does not exist.*data.datasets\[\].path"):
        load_rows(DatasetRef(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"does not exist"):
        load_rows(DatasetRef(path=str(tmp_path / "no-dir")))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl' line 2 is not valid JSON"):
        load_rows(DatasetRef(path=str(tmp_path / "bad.jsonl")))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported type '.xml'"):
        load_rows(DatasetRef(path=str(tmp_path / "data.xml")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"cannot load dataset directory .*empty"):
        load_rows(DatasetRef(path=str(tmp_path / "empty")))


def test_unsupervised_text_field_error(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "a b c"}) + "\n")
    with pytest.raises(DataError, match=r"no column 'text'.*content.*unsupervisedTextField"):
        load_texts(DatasetRef(path=str(tmp_path / "c.jsonl")))
    assert load_texts(DatasetRef(path=str(tmp_path / "c.jsonl")), "content")["text"] == ["a b c"]


def test_bare_strings_in_spec_resolve_to_builtin_and_paths() -> None:
    spec = DataSpec(datasets=["kuberlhf/synthetic-pairs", "./pairs.jsonl"])
    assert spec.datasets[0].name == "kuberlhf/synthetic-pairs" and spec.datasets[1].path == "./pairs.jsonl"


def test_plain_text_corpus_and_inconsistent_rows(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("the sky is blue\n\nthe sea is blue\n")
    texts = load_texts(DatasetRef(path=str(tmp_path / "corpus.txt")))
    assert list(texts["text"]) == ["the sky is blue", "the sea is blue"]
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "a", "chosen": 1}\n{"prompt": "b", "chosen": "x"}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl'.*consistent column types"):
        load_rows(DatasetRef(path=str(tmp_path / "mixed.jsonl")))
