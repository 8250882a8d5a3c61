"""The scratch volume of a stage's pods (their HOME: model downloads, local checkpoints, the export), sized from
the memory planner's checkpoint estimate (:attr:`kuberlhf.planner.estimate.StageEstimate.scratch_bytes`)."""

from __future__ import annotations

import math
from typing import Any

from kuberlhf.planner.estimate import GiB, estimate_pipeline, parse_quantity

# HOME also holds the tokenizer, the datasets' cache and DeepSpeed's JIT-built extensions
MIN_SCRATCH = 2 * GiB
# a claim must have a size: what a PVC gets when the planner cannot size it (set spec.scratch.size instead)
UNSIZED_CLAIM = 100 * GiB


def stage_scratch_bytes(spec: Any, stage: str) -> int | None:
    """``spec.scratch.size``, else the planner's estimate for ``stage`` (at least :data:`MIN_SCRATCH`), else None
    when the models' shapes cannot be read without a download (an s3:// model, an unknown hub name)."""
    from kuberlhf.planner.check import offline_shapes

    if spec.scratch.size:
        return parse_quantity(spec.scratch.size)
    shapes = offline_shapes(spec)
    if shapes is None:
        return None
    est = next((s for s in estimate_pipeline(spec, shapes).stages if s.stage == stage), None)
    return None if est is None else max(MIN_SCRATCH, est.scratch_bytes)


def quantity(n: int) -> str:
    """Bytes as a Kubernetes quantity, rounded up to a whole GiB."""
    return f"{math.ceil(n / GiB)}Gi"
