"""Pieces the three stage entrypoints share: data loading with the tokenised cache, DeepSpeed settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kuberlhf.stages.runtime import StageRun
from kuberlhf.training import distributed as D
from kuberlhf.training.ds_config import stage_settings


def tokenized_cache_dir(run: StageRun) -> Path:
    from kuberlhf.data import default_cache_dir

    return default_cache_dir()


def cache_key(run: StageRun, split: str) -> str:
    from kuberlhf.data import spec_hash

    return f"{spec_hash(run.spec.data)}:{run.stage}:{split}"


def settings(run: StageRun, role: str | None = None):
    return stage_settings(run.spec, run.stage, run.dist.world_size, role=role)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    return {k: D.all_reduce_mean(v) for k, v in values.items()}


def model_dtype(run: StageRun) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.stage_spec.dtype.value, torch.float32)
