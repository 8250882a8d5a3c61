"""Per-stage rows of a DataSpec: DeepSpeed-Chat's split across steps, sftOnly, max_samples, eval hold-out, blend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kuberlhf.contract.spec import STAGE_ORDER, DataSpec, Stage, StorageSpec
from kuberlhf.data import DataError, stage_rows, unsupervised_texts


def _write(path: Path, prefix: str, n: int, rejected: bool = True) -> str:
    rows = [{"prompt": f"{prefix} {i}", "chosen": f"good {prefix} {i}"} | ({"rejected": "bad"} if rejected else {})
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _ids(ds) -> list[str]:
    return [p.removeprefix(" Human: ").removesuffix(" Assistant:") for p in ds["prompt"]]


@pytest.fixture()
def two_files(tmp_path: Path) -> tuple[str, str]:
    return _write(tmp_path / "a.jsonl", "a", 100), _write(tmp_path / "b.jsonl", "b", 50)


def test_two_datasets_split_244_disjoint_per_stage(two_files: tuple[str, str]) -> None:
    spec = DataSpec(datasets=list(two_files), split="2,4,4", eval_fraction=0.1, seed=3)
    per_stage = {}
    for stage in Stage:
        train, ev = stage_rows(spec, stage)
        t, e = _ids(train), _ids(ev)
        assert not set(t) & set(e)
        assert len(set(t)) == len(t)
        per_stage[stage] = set(t) | set(e)
    # Each dataset contributes 20% / 40% / 40% of its rows to steps 1 / 2 / 3 ...
    for stage, share in ((Stage.sft, 0.2), (Stage.reward, 0.4), (Stage.ppo, 0.4)):
        assert sum(x.startswith("a ") for x in per_stage[stage]) == 100 * share
        assert sum(x.startswith("b ") for x in per_stage[stage]) == 50 * share
    # ... the stages never share a row, and together they use every row.
    assert not per_stage[Stage.sft] & per_stage[Stage.reward]
    assert not per_stage[Stage.sft] & per_stage[Stage.ppo]
    assert not per_stage[Stage.reward] & per_stage[Stage.ppo]
    assert set().union(*per_stage.values()) == {f"a {i}" for i in range(100)} | {f"b {i}" for i in range(50)}


def test_blend_is_deterministic_and_seeded(two_files: tuple[str, str]) -> None:
    spec = DataSpec(datasets=list(two_files), seed=3)
    a, _ = stage_rows(spec, Stage.ppo)
    b, _ = stage_rows(spec, Stage.ppo)
    assert _ids(a) == _ids(b)
    c, _ = stage_rows(DataSpec(datasets=list(two_files), seed=4), Stage.ppo)
    assert _ids(a) != _ids(c)
    # shuffled: the two datasets are interleaved, not concatenated
    first_b = next(i for i, x in enumerate(_ids(a)) if x.startswith("b "))
    assert first_b < len(a) - 20


def test_eval_fraction(two_files: tuple[str, str]) -> None:
    train, ev = stage_rows(DataSpec(datasets=list(two_files), eval_fraction=0.25), Stage.reward)
    assert (len(train), len(ev)) == (30 + 15, 10 + 5)
    train, ev = stage_rows(DataSpec(datasets=list(two_files), eval_fraction=0.0), Stage.reward)
    assert (len(train), len(ev)) == (60, 0)


def test_sft_only_goes_entirely_to_step_1(tmp_path: Path, two_files: tuple[str, str]) -> None:
    sft_file = _write(tmp_path / "s.jsonl", "s", 30, rejected=False)
    spec = DataSpec(datasets=list(two_files), sft_only=[sft_file], eval_fraction=0.1)
    train, ev = stage_rows(spec, Stage.sft)
    got = _ids(train) + _ids(ev)
    assert sorted(x for x in got if x.startswith("s ")) == sorted(f"s {i}" for i in range(30))
    assert sum(x.startswith("a ") for x in got) == 20
    for stage in (Stage.reward, Stage.ppo):
        train, ev = stage_rows(spec, stage)
        assert not any(x.startswith("s ") for x in _ids(train) + _ids(ev))


def test_max_samples_caps_each_dataset(two_files: tuple[str, str]) -> None:
    spec = DataSpec(datasets=list(two_files), max_samples=20, eval_fraction=0.0)
    total = {stage: stage_rows(spec, stage)[0] for stage in STAGE_ORDER}  # the ppo pipeline's three steps
    ids = [x for ds in total.values() for x in _ids(ds)]
    assert sum(x.startswith("a ") for x in ids) == 20 and sum(x.startswith("b ") for x in ids) == 20
    assert len(total[Stage.sft]) == 8  # 20% of 20 from each dataset
    # a random subset, not the first rows
    assert sorted(int(x.split()[1]) for x in ids if x.startswith("a ")) != list(range(20))


def test_reward_stage_needs_rejected(tmp_path: Path) -> None:
    sft_file = _write(tmp_path / "s.jsonl", "s", 30, rejected=False)
    with pytest.raises(DataError, match=r"s.jsonl' has no rejected answers.*data.sftOnly"):
        stage_rows(DataSpec(datasets=[sft_file]), Stage.reward)


def test_stage_with_no_share_is_an_error(two_files: tuple[str, str]) -> None:
    with pytest.raises(DataError, match=r"no training rows for stage sft.*'0,1,1'"):
        stage_rows(DataSpec(datasets=list(two_files), split="0,1,1"), Stage.sft)


def test_builtins_end_to_end() -> None:
    spec = DataSpec(datasets=["kuberlhf/synthetic-pairs"], unsupervised="kuberlhf/synthetic-corpus", max_samples=500)
    train, ev = stage_rows(spec, Stage.reward)
    assert (len(train), len(ev)) == (180, 20)
    assert len(unsupervised_texts(spec)) == 500
    assert unsupervised_texts(DataSpec(datasets=["kuberlhf/synthetic-pairs"])) is None


def test_s3_dataset_path(s3_env, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset file in the pipeline's object store (real SeaweedFS), downloaded with the storage settings."""
    from kuberlhf.storage import ObjectStore

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    storage = StorageSpec(uri=s3_bucket + "/runs", endpoint=s3_env.endpoint)
    local = Path(_write(tmp_path / "a.jsonl", "a", 40))
    ObjectStore.from_spec(storage).put_bytes(f"{s3_bucket}/data/a.jsonl", local.read_bytes())
    spec = DataSpec(datasets=[f"{s3_bucket}/data/a.jsonl"], eval_fraction=0.0)
    train, _ = stage_rows(spec, Stage.ppo, storage=storage)
    assert len(train) == 16 and all(x.startswith("a ") for x in _ids(train))
    with pytest.raises(DataError, match=r"cannot download dataset s3://.*/data/missing.jsonl"):
        stage_rows(DataSpec(datasets=[f"{s3_bucket}/data/missing.jsonl"]), Stage.ppo, storage=storage)
