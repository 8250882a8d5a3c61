"""Stage metrics (``metrics.jsonl``, format in the project brief): parsing, merging, one-line summaries.
Pure functions over lists of dicts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from kuberlhf.contract.spec import ALL_STAGES

Record = dict[str, Any]


def parse_jsonl(text: str, source: str = "metrics.jsonl") -> list[Record]:
    """Records of a metrics.jsonl; a malformed line (a stage killed mid-write) is skipped, not fatal."""
    records: list[Record] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def merge_metrics(per_stage: Iterable[Sequence[Record]]) -> list[Record]:
    """All stages' records in pipeline order, each stage's by (step, time); duplicate (stage, split, step)
    rows from a resumed attempt keep the latest."""
    order = {st.value: i for i, st in enumerate(ALL_STAGES)}
    latest: dict[tuple[Any, ...], Record] = {}
    for records in per_stage:
        for rec in records:
            key = (rec.get("stage"), rec.get("split", "train"), rec.get("step"))
            prev = latest.get(key)
            if prev is None or float(rec.get("time", 0)) >= float(prev.get("time", 0)):
                latest[key] = rec
    return sorted(latest.values(), key=lambda r: (order.get(r.get("stage"), 99), str(r.get("split", "train")),
                                                 int(r.get("step") or 0), float(r.get("time") or 0)))


def to_jsonl(records: Iterable[Record]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def series(records: Iterable[Record], stage: str, key: str, split: str = "train") -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping records that lack it."""
    steps: list[int] = []
    values: list[float] = []
    for rec in records:
        if rec.get("stage") == stage and rec.get("split", "train") == split and isinstance(rec.get(key), (int, float)):
            steps.append(int(rec.get("step") or 0))
            values.append(float(rec[key]))
    return steps, values


def _first_last(records: Sequence[Record], stage: str, key: str, split: str = "train") -> tuple[float, float] | None:
    _, vals = series(records, stage, key, split)
    return (vals[0], vals[-1]) if vals else None


def summarize_stage(records: Sequence[Record], stage: str) -> str:
    """One human line per stage, e.g. 'loss 6.21 -> 2.80, eval perplexity 17.3'."""
    parts: list[str] = []
    if stage == "sft":
        if fl := _first_last(records, "sft", "loss"):
            parts.append(f"loss {fl[0]:.3f} -> {fl[1]:.3f}")
        if fl := _first_last(records, "sft", "perplexity", "eval"):
            parts.append(f"eval perplexity {fl[1]:.2f}")
    elif stage == "reward":
        if fl := _first_last(records, "reward", "loss"):
            parts.append(f"loss {fl[0]:.3f} -> {fl[1]:.3f}")
        if fl := _first_last(records, "reward", "accuracy", "eval"):
            parts.append(f"eval accuracy {fl[1]:.1%}")
        ch, rj = _first_last(records, "reward", "chosen_score", "eval"), _first_last(records, "reward", "rejected_score", "eval")
        if ch and rj:
            parts.append(f"chosen {ch[1]:+.2f} vs rejected {rj[1]:+.2f}")
    elif stage in ("ppo", "grpo"):
        if fl := _first_last(records, stage, "reward"):
            parts.append(f"reward {fl[0]:+.3f} -> {fl[1]:+.3f}")
        if fl := _first_last(records, stage, "true_reward"):
            parts.append(f"true reward {fl[0]:.3f} -> {fl[1]:.3f}")
        if fl := _first_last(records, stage, "kl"):
            parts.append(f"KL {fl[1]:.3f}")
    elif stage == "dpo":
        if fl := _first_last(records, "dpo", "loss"):
            parts.append(f"loss {fl[0]:.3f} -> {fl[1]:.3f}")
        if fl := _first_last(records, "dpo", "reward_accuracy", "eval"):
            parts.append(f"eval reward accuracy {fl[1]:.1%}")
        if fl := _first_last(records, "dpo", "margin", "eval"):
            parts.append(f"eval margin {fl[1]:+.3f}")
    steps = [int(r.get("step") or 0) for r in records if r.get("stage") == stage and r.get("split", "train") == "train"]
    if steps:
        parts.insert(0, f"{max(steps)} steps")
    return ", ".join(parts) if parts else "no metrics recorded"
