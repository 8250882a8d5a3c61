"""Per-stage rows of a DataSpec: each dataset's slice for the stage (DeepSpeed-Chat's data_split), sftOnly datasets
entirely in step 1, a deterministic eval hold-out, then all datasets blended with a seeded shuffle."""

from __future__ import annotations

import hashlib
import json

import datasets

from kuberlhf.contract.spec import STAGE_INDEX, DatasetRef, DataSpec, Stage, StorageSpec
from kuberlhf.data.errors import DataError
from kuberlhf.data.sources import COLUMNS, load_rows, load_texts
from kuberlhf.data.splits import eval_count, permutation, split_indices


def _empty() -> datasets.Dataset:
    return datasets.Dataset.from_dict({c: [] for c in COLUMNS},
                                      features=datasets.Features({c: datasets.Value("string") for c in COLUMNS}))


def capped(rows: datasets.Dataset, max_samples: int | None, seed: int, key: str) -> datasets.Dataset:
    """At most max_samples rows, a seeded random subset (kept in the original order) so quick runs still see
    every kind of example."""
    if max_samples is None or len(rows) <= max_samples:
        return rows
    return rows.select(sorted(permutation(len(rows), seed, key + "\0sample")[:max_samples]))


def stage_slice_indices(n: int, data: DataSpec, stage: Stage, key: str, sft_only: bool) -> tuple[list[int], list[int]]:
    """(train, eval) row indices of one dataset of n rows for a stage. Pure."""
    stage = Stage(stage)
    if sft_only:
        part = permutation(n, data.seed, key) if stage is Stage.sft else []
    else:
        part = split_indices(n, data.split_weights, data.seed, key)[STAGE_INDEX[stage]]
    n_eval = eval_count(len(part), data.eval_fraction)
    # The slice is already in shuffled order: its tail is a random, deterministic hold-out.
    return part[:len(part) - n_eval], part[len(part) - n_eval:]


def _dataset_key(ref: DatasetRef, kind: str) -> str:
    # The key seeds the split. It names the dataset, not its place in the list, so adding or reordering datasets
    # leaves each dataset's partition (which rows each stage saw) unchanged.
    return f"{kind}:{ref.key}:{ref.config or ''}"


def stage_rows(data: DataSpec, stage: Stage, *,
               storage: StorageSpec | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) rows prompt / chosen / rejected of a stage, blended over the spec's datasets (train
    shuffled by seed). ``storage``: the pipeline's storage settings, for s3:// dataset paths."""
    stage = Stage(stage)
    trains: list[datasets.Dataset] = []
    evals: list[datasets.Dataset] = []
    sources = [(ref, "pairs", False) for ref in data.datasets]
    if stage is Stage.sft:
        sources += [(ref, "sft_only", True) for ref in data.sft_only]
    for ref, kind, sft_only in sources:
        key = _dataset_key(ref, kind)
        rows = capped(load_rows(ref, storage=storage), data.max_samples, data.seed, key)
        train_idx, eval_idx = stage_slice_indices(len(rows), data, stage, key, sft_only)
        train, ev = rows.select(train_idx), rows.select(eval_idx)
        if stage in (Stage.reward, Stage.dpo):
            train, ev = _pairs_only(train, ref), _pairs_only(ev, ref)
        trains.append(train)
        evals.append(ev)
    train = datasets.concatenate_datasets(trains) if trains else _empty()
    ev = datasets.concatenate_datasets(evals) if evals else _empty()
    if len(train) == 0:
        raise DataError(f"no training rows for stage {stage.value}: data.split {data.split!r} gives this stage "
                        f"nothing (or the datasets are too small); give it a positive share or more rows")
    blend_key = f"blend:{stage.value}"
    return train.select(permutation(len(train), data.seed, blend_key)), ev


def _pairs_only(rows: datasets.Dataset, ref: DatasetRef) -> datasets.Dataset:
    """Step 2 needs a rejected answer: drop rows without one, and refuse a dataset that has none at all."""
    if len(rows) == 0:
        return rows
    kept = rows.select([i for i, r in enumerate(rows["rejected"]) if r])
    if len(kept) == 0:
        where = f"dataset {ref.name!r}" if ref.name else f"dataset file {ref.path!r}"
        raise DataError(f"{where} has no rejected answers, so step 2 (reward model) cannot use it: list it under "
                        f"data.sftOnly, or add a 'rejected' column")
    return kept


def unsupervised_texts(data: DataSpec, *, storage: StorageSpec | None = None) -> datasets.Dataset | None:
    """The ptx corpus (column ``text``) of step 3, capped by max_samples; None when the spec has none."""
    if data.unsupervised is None:
        return None
    texts = load_texts(data.unsupervised, data.unsupervised_text_field, storage=storage)
    return capped(texts, data.max_samples, data.seed, _dataset_key(data.unsupervised, "unsupervised"))


def spec_hash(data: DataSpec) -> str:
    """A digest of everything in the data spec that changes the rows (used in cache keys)."""
    doc = json.dumps(data.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]
