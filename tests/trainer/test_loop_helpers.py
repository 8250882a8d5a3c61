"""Pure helpers of the training loop: step plan / resume position, per-rank data order, metrics lines."""

from __future__ import annotations

import json
import math

from kuberlhf.training.loop import StepPlan, plan_for, rank_indices
from kuberlhf.training.metrics import MetricsWriter, metric_record


def test_step_plan_positions():
    plan = StepPlan(batches_per_epoch=10, grad_accum=2, epochs=3, max_steps=None)
    assert plan.steps_per_epoch == 5 and plan.total_steps == 15
    assert plan.position(0) == (0, 0) and plan.position(7) == (1, 4) and plan.position(10) == (2, 0)
    assert StepPlan(10, 2, 3, max_steps=4).total_steps == 4
    assert plan_for(100, micro_batch=4, world=2, grad_accum=1, epochs=1, max_steps=None, what="x").total_steps == 12


def test_rank_indices_are_disjoint_deterministic_and_reshuffled_per_epoch():
    r0, r1 = rank_indices(10, 0, 2, seed=1, epoch=0), rank_indices(10, 1, 2, seed=1, epoch=0)
    assert sorted(r0 + r1) == list(range(10))
    assert r0 == rank_indices(10, 0, 2, seed=1, epoch=0)
    assert r0 != rank_indices(10, 0, 2, seed=1, epoch=1)


def test_metrics_lines_and_resume_truncation(tmp_path):
    rec = metric_record("sft", 3, "train", {"loss": 1.5, "perplexity": math.inf, "skip": None}, now=10.0)
    assert rec == {"stage": "sft", "step": 3, "split": "train", "time": 10.0, "loss": 1.5, "perplexity": None}
    w = MetricsWriter(tmp_path / "metrics.jsonl", "sft")
    for step in (1, 2, 3):
        w.write(step, "train", loss=float(step))
    w.truncate_after(2)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[0]["stage"] == "sft"
    MetricsWriter(tmp_path / "other.jsonl", "sft", enabled=False).write(1, "train", loss=1.0)
    assert not (tmp_path / "other.jsonl").exists()
