"""Bring a run's results from the object store into the output directory, verified (sizes + sha256)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kuberlhf.contract.spec import RLHFPipeline, Stage
from kuberlhf.contract.stage import METRICS_FILE, StageLayout
from kuberlhf.runner.console import Console
from kuberlhf.runner.metrics import Record, merge_metrics, parse_jsonl, to_jsonl


def output_targets(layout: StageLayout, pipeline: RLHFPipeline, out: Path) -> list[tuple[Stage, str, Path]]:
    """(stage, object-store URI, local directory) of every model a run produces."""
    spec = pipeline.spec
    targets = []
    for st in spec.stage_graph:
        # sft and reward are one model each; the final stage keeps model/ (and ema/) side by side
        local = out / st.value / "model" if st is spec.final_stage else out / st.value
        targets.append((st, layout.model_uri(st), local))
    if spec.final_ema_enabled:
        targets.append((spec.final_stage, layout.ema_uri(spec.final_stage), out / spec.final_stage.value / "ema"))
    return targets


def tensorboard_targets(layout: StageLayout, pipeline: RLHFPipeline, out: Path) -> list[tuple[Stage, str, Path]]:
    """TensorBoard events of the stages with ``tensorboard: true``, into ``<out>/tensorboard/<stage>/`` (one
    ``tensorboard --logdir <out>/tensorboard`` shows every stage)."""
    return [(st, layout.tensorboard_uri(st), out / "tensorboard" / st.value) for st in pipeline.spec.stage_graph
            if pipeline.spec.stages.get(st).tensorboard]


def collect_outputs(store: Any, layout: StageLayout, pipeline: RLHFPipeline, out: Path,
                    console: Console) -> list[Record]:
    """Download every complete stage's models (files already present and verified are skipped) and merge
    the stages' metrics into ``<out>/metrics.jsonl``; returns the merged records."""
    graph = pipeline.spec.stage_graph
    complete = {st for st in graph if store.is_complete(layout.stage_uri(st))}
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
    for stage in graph:
        uri = f"{layout.stage_uri(stage)}/{METRICS_FILE}"
        if stage in complete and store.exists(uri):
            per_stage.append(parse_jsonl(store.get_bytes(uri).decode()))
    records = merge_metrics(per_stage)
    (out / "metrics.jsonl").write_text(to_jsonl(records))
    console.info(f"metrics: {out / 'metrics.jsonl'} ({len(records)} records)")
    return records
