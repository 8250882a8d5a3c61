"""Pure helpers of the training loop: step plan / resume position, per-rank data order, metrics lines."""

from __future__ import annotations

import itertools
import json
import math

import torch

from kuberlhf.stages.ppo import ptx_stream
from kuberlhf.training.loop import StepPlan, batches_per_epoch, epoch_position, make_loader, plan_for, rank_indices
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


class RowIds(torch.utils.data.Dataset):
    """Rows that are their own index, so a batch shows which rows it holds."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {"ids": torch.tensor(rows)}


def test_ptx_stream_resumes_at_the_consumed_position_across_epochs():
    ds = RowIds(23)  # 11 rows per rank -> 3 batches of 3 per epoch (the last row dropped)
    assert batches_per_epoch(len(ds), 3, rank=1, world=2) == 3
    assert epoch_position(7, 3) == (2, 1) and epoch_position(0, 3) == (0, 0)
    full = [b["ids"].tolist() for b in itertools.islice(ptx_stream(ds, 3, 1, 2, seed=5), 10)]
    resumed = [b["ids"].tolist() for b in itertools.islice(ptx_stream(ds, 3, 1, 2, seed=5, consumed=4), 6)]
    assert resumed == full[4:]
    assert full[0] != full[3]  # the next epoch is reshuffled, not replayed


def test_make_loader_leaves_the_global_rng_alone():
    """A resumed run builds its loader after restoring the RNG; it must not shift the sampling stream."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(make_loader(RowIds(8), 2, 0, 1, seed=1, epoch=0)))
    assert torch.equal(torch.rand(3), expected)


def tensorboard_scalars_in(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard log dir, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_mirror_metrics_and_follow_a_resume(tmp_path):
    from kuberlhf.training.metrics import tensorboard_scalars

    assert tensorboard_scalars({"stage": "ppo", "step": 4, "split": "train", "time": 1.0, "reward": 2, "kl": None,
                                "note": "x", "flag": True}) == [("ppo/train/reward", 2.0, 4)]
    tb = tmp_path / "tb"
    w = MetricsWriter(tmp_path / "metrics.jsonl", "sft", tensorboard_dir=tb)
    for step in (1, 2, 3):
        w.write(step, "train", loss=float(step), lr=0.5)
    w.write(3, "eval", loss=9.0, perplexity=math.inf)
    assert tensorboard_scalars_in(tb) == {"sft/train/loss": [(1, 1.0), (2, 2.0), (3, 3.0)],
                                          "sft/train/lr": [(1, 0.5), (2, 0.5), (3, 0.5)],
                                          "sft/eval/loss": [(3, 9.0)]}
    # a resume from the step-2 checkpoint on the same disk: steps after it are gone from both records, and the
    # re-measured step 3 appears once
    w.truncate_after(2)
    w.write(3, "train", loss=30.0, lr=0.5)
    w.close()
    got = tensorboard_scalars_in(tb)
    assert got["sft/train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)] and "sft/eval/loss" not in got
    w.reset()  # a fresh start (--no-resume) on a disk with an earlier attempt's events
    assert tensorboard_scalars_in(tb) == {} and not (tmp_path / "metrics.jsonl").exists()
    w.close()
    assert not (tmp_path / "rank1").exists()
    MetricsWriter(tmp_path / "rank1" / "metrics.jsonl", "sft", enabled=False, tensorboard_dir=tmp_path / "rank1")
    assert not (tmp_path / "rank1").exists()  # only rank 0 writes events
