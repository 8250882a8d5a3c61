"""The tokenised-data cache: one process tokenises, the others wait and load, when several start at once."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets

from kuberlhf.data.cache import _publish, cache_key, rows_hash, tokenize_cached, tokenizer_hash

WORKER = Path(__file__).with_name("cache_worker.py")


def _start(work: Path, cache_dir: Path, key: str, assets: Path, n: int) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(work), str(cache_dir), key, str(assets)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    deadline = time.monotonic() + 120
    while len(list(work.glob("ready-*"))) < n:
        assert time.monotonic() < deadline, [p.communicate(timeout=5) for p in procs if p.poll() is not None]
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    (work / "go").touch()  # all ranks start at once
    return procs


def _results(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_ranks_starting_at_once_tokenise_once(tmp_path: Path, repo_root: Path, monkeypatch) -> None:
    assets = repo_root / "trainer_image" / "kuberlhf" / "assets" / "tiny-opt"
    cache_dir = tmp_path / "cache"
    work = tmp_path / "run1"
    work.mkdir()
    results = _results(_start(work, cache_dir, "spec123:sft:train", assets, n=3))
    assert len({r["pid"] for r in results}) == 3
    assert len({(r["n"], r["digest"]) for r in results}) == 1 and results[0]["n"] == 72  # 20% of 400 rows, less 10% eval
    assert len((work / "encode-calls.log").read_text().split()) == 1  # exactly one process tokenised
    entries = [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and entries[0].startswith("sft-")  # no temporary directory left behind

    # A later start (here: this process, same rows, tokenizer and key) loads the entry and tokenises nothing.
    from transformers import AutoTokenizer

    import kuberlhf.data.cache as cache
    from kuberlhf.contract.spec import DataSpec, Stage
    from kuberlhf.data import stage_rows

    def no_encode(*_a, **_k):
        raise AssertionError("tokenised again although the cache holds the entry")

    monkeypatch.setattr(cache, "encode_rows", no_encode)
    rows, _ = stage_rows(DataSpec(datasets=["kuberlhf/synthetic-pairs"], max_samples=400), Stage.sft)
    tok = AutoTokenizer.from_pretrained(assets)
    again = tokenize_cached(rows, tok, "sft", 48, cache_dir=cache_dir, key="spec123:sft:train",
                            options={"mask": "human_turns"})
    assert hashlib.sha256(json.dumps(again[:]["labels"]).encode()).hexdigest() == results[0]["digest"]


def test_key_covers_tokenizer_rows_options(words_tok, repo_root: Path) -> None:
    from transformers import AutoTokenizer

    tiny = AutoTokenizer.from_pretrained(repo_root / "trainer_image" / "kuberlhf" / "assets" / "tiny-opt")
    rows = datasets.Dataset.from_dict({"prompt": [" Human: hi Assistant:"], "chosen": [" yes"], "rejected": [""]})
    other = datasets.Dataset.from_dict({"prompt": [" Human: hi Assistant:"], "chosen": [" no"], "rejected": [""]})
    base = cache_key(rows, words_tok, "sft", 16, "k", {"mask": "human_turns"})
    assert base == cache_key(rows, words_tok, "sft", 16, "k", {"mask": "human_turns"})
    assert base != cache_key(rows, tiny, "sft", 16, "k", {"mask": "human_turns"})
    assert base != cache_key(other, words_tok, "sft", 16, "k", {"mask": "human_turns"})
    assert base != cache_key(rows, words_tok, "sft", 17, "k", {"mask": "human_turns"})
    assert base != cache_key(rows, words_tok, "sft", 16, "k2", {"mask": "human_turns"})
    assert base != cache_key(rows, words_tok, "sft", 16, "k", {"mask": "none"})
    assert tokenizer_hash(words_tok) != tokenizer_hash(tiny)
    assert rows_hash(rows) != rows_hash(other)


def test_lost_rename_race_keeps_the_winner(tmp_path: Path, words_tok) -> None:
    """Where file locks do not work (some network filesystems), two writers may both tokenise: the second
    rename fails, the first entry stays, and nothing temporary is left."""
    rows = datasets.Dataset.from_dict({"prompt": [" Human: hi Assistant:"], "chosen": [" yes"], "rejected": [""]})
    first = tokenize_cached(rows, words_tok, "sft", 16, cache_dir=tmp_path, key="k")
    entry = next(p for p in tmp_path.iterdir() if p.is_dir())
    _publish(first, entry)  # a second writer of the same entry
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [entry.name]
    assert datasets.load_from_disk(str(entry))["input_ids"] == [[2, 4, 3, 6, 1]]
