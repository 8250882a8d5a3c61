"""Bring a run's results from the object store into the output directory, verified (sizes + sha256)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kuberlhf.contract.spec import STAGE_ORDER, RLHFPipeline, Stage
from kuberlhf.contract.stage import METRICS_FILE, StageLayout
from kuberlhf.runner.console import Console
from kuberlhf.runner.metrics import Record, merge_metrics, parse_jsonl, to_jsonl


def output_targets(layout: StageLayout, pipeline: RLHFPipeline, out: Path) -> list[tuple[Stage, str, Path]]:
    """(stage, object-store URI, local directory) of every model a run produces."""
    targets = [
        (Stage.sft, layout.model_uri(Stage.sft), out / "sft"),
        (Stage.reward, layout.model_uri(Stage.reward), out / "reward"),
        (Stage.ppo, layout.model_uri(Stage.ppo), out / "ppo" / "model"),
    ]
    if pipeline.spec.stages.ppo.ema.enabled:
        targets.append((Stage.ppo, layout.ema_uri(), out / "ppo" / "ema"))
    return targets


def tensorboard_targets(layout: StageLayout, pipeline: RLHFPipeline, out: Path) -> list[tuple[Stage, str, Path]]:
    """TensorBoard events of the stages with ``tensorboard: true``, into ``<out>/tensorboard/<stage>/`` (one
    ``tensorboard --logdir <out>/tensorboard`` shows every stage)."""
    return [(st, layout.tensorboard_uri(st), out / "tensorboard" / st.value) for st in STAGE_ORDER
            if pipeline.spec.stages.get(st).tensorboard]


def collect_outputs(store: Any, layout: StageLayout, pipeline: RLHFPipeline, out: Path,
                    console: Console) -> list[Record]:
    """Download every complete stage's models (files already present and verified are skipped) and merge
    the stages' metrics into ``<out>/metrics.jsonl``; returns the merged records."""
    complete = {st for st in STAGE_ORDER if store.is_complete(layout.stage_uri(st))}
    for stage, uri, local in output_targets(layout, pipeline, out):
        if stage not in complete:
            continue
        if not store.is_complete(uri):
            console.warn(f"{uri} has no _COMPLETE marker: not downloaded")
            continue
        manifest = store.download_dir(uri, local)
        console.info(f"{stage.value:>6}: {local}  ({len(getattr(manifest, 'files', []) or [])} files, verified)")
    for stage, uri, local in tensorboard_targets(layout, pipeline, out):
        # a stage that completed before `tensorboard: true` was set has no events (the setting alone does not
        # re-run a stage)
        if stage in complete and store.is_complete(uri):
            store.download_dir(uri, local)
            console.info(f"{stage.value:>6}: TensorBoard events in {local} (tensorboard --logdir {local.parent})")
    per_stage = []
    for stage in STAGE_ORDER:
        uri = f"{layout.stage_uri(stage)}/{METRICS_FILE}"
        if stage in complete and store.exists(uri):
            per_stage.append(parse_jsonl(store.get_bytes(uri).decode()))
    records = merge_metrics(per_stage)
    (out / "metrics.jsonl").write_text(to_jsonl(records))
    console.info(f"metrics: {out / 'metrics.jsonl'} ({len(records)} records)")
    return records
