"""The loop of steps 1 and 2: micro-batches through one DeepSpeed engine, optimizer steps with gradient
accumulation, periodic eval, resumable checkpoints and metrics."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from kuberlhf.stages.common import cache_key, tokenized_cache_dir
from kuberlhf.stages.runtime import CRASH_EXIT_CODE, StageRun
from kuberlhf.training import distributed as D
from kuberlhf.training.checkpoint import load_engines, snapshot_engines
from kuberlhf.training.loop import StepPlan, make_loader, to_device

# Test hook: exit with this code right after committing the checkpoint of this step (a crash mid-stage).
FAIL_AT_STEP_ENV = "KUBERLHF_FAIL_AFTER_CHECKPOINT"


def maybe_crash(step: int, run: StageRun | None = None) -> None:
    """The tests' crash after checkpoint ``step`` is committed (a background upload is waited for first)."""
    if os.environ.get(FAIL_AT_STEP_ENV) == str(step):
        if run is not None:
            run.drain_upload()
        D.barrier()
        os._exit(CRASH_EXIT_CODE)


def progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


def tokenized_splits(run: StageRun, make: Callable[..., Any], tokenizer: Any, *args: Any) -> tuple[Any, Any]:
    """This stage's (train, eval) rows, tokenised through the shared cache: ``make(rows, tokenizer, *args, ...)``
    is a dataset class of ``kuberlhf.data`` (SFTDataset, PairDataset)."""
    from kuberlhf.data import stage_rows

    rows = stage_rows(run.spec.data, run.ctx.stage, storage=run.spec.storage)
    cache = tokenized_cache_dir(run)
    return tuple(make(split_rows, tokenizer, *args, cache_dir=cache, cache_key=cache_key(run, split))
                 for split_rows, split in zip(rows, ("train", "eval"), strict=True))


def training_engine(run: StageRun, model: Any, ds_config: dict[str, Any], total_steps: int) -> Any:
    """The stage's DeepSpeed engine: AdamW (LoRA weights at their own rate) + LR schedule from the stage spec
    (learningRate: the deploymentType preset's unless set)."""
    from kuberlhf.training.loop import ds_initialize, make_optimizer, make_scheduler

    st = run.stage_spec
    optimizer = make_optimizer(model, st.learning_rate, st.weight_decay, st.offload,
                               st.lora.learning_rate if st.lora else None)
    scheduler = make_scheduler(optimizer, st.lr_scheduler, st.warmup_steps, total_steps)
    return ds_initialize(model, ds_config, optimizer, scheduler)


def supervised_loop(run: StageRun, engine: Any, train_ds: Any, plan: StepPlan, micro_batch: int,
                    train_step: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
                    evaluate: Callable[[], dict[str, float]]) -> int:
    """Train to ``plan.total_steps``; returns the number of optimizer steps done. ``train_step`` returns the
    loss to backpropagate and scalars to log (including ``tokens``, summed for throughput)."""
    st = run.stage_spec
    dist = run.dist
    step = 0
    resume_step = run.latest_checkpoint()
    if resume_step is not None:
        local = run.download_checkpoint(resume_step)
        state = load_engines({"model": engine}, local, resume_step, dist.rank)
        step = int(state["step"])
    epoch, skip = plan.position(step)
    bar = progress(plan.total_steps, step, dist.is_main, run.stage)
    acc: dict[str, float] = {}
    n_micro, t0 = 0, time.time()
    eval_every = st.eval_every_steps or plan.steps_per_epoch
    while step < plan.total_steps:
        engine.train()
        loader = make_loader(train_ds, micro_batch, dist.rank, dist.world_size, st.seed, epoch, skip)
        # an epoch is a whole number of optimizer steps, so a step never spans two epochs (resume is exact)
        budget = plan.steps_per_epoch * plan.grad_accum - skip
        for i, batch in enumerate(loader):
            if i >= budget:
                break
            batch = to_device(batch, engine.device)
            loss, scalars = train_step(batch)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            n_micro += 1
            acc["loss"] = acc.get("loss", 0.0) + float(loss.detach())
            for k, v in scalars.items():
                acc[k] = acc.get(k, 0.0) + float(v)
            if not boundary:
                continue
            step += 1
            bar.update(1)
            elapsed = max(time.time() - t0, 1e-9)
            tokens = D.all_reduce_mean(acc.pop("tokens", 0.0)) * dist.world_size
            logged = {k: D.all_reduce_mean(v / n_micro) for k, v in acc.items()}
            logged["lr"] = engine.get_lr()[0]
            logged["tokens_per_s"] = tokens / elapsed
            if run.stage != "sft":
                logged.pop("tokens_per_s")
            run.metrics.write(step, "train", **logged)
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
            acc, n_micro, t0 = {}, 0, time.time()
            if step % eval_every == 0 or step == plan.total_steps:
                run.metrics.write(step, "eval", **evaluate())
                engine.train()
            save, stop = run.checkpoint_due(step, plan.total_steps, st.checkpoint_every_steps)
            if save:
                run.save_checkpoint(step, lambda local, step=step, epoch=epoch: snapshot_engines(
                    {"model": engine}, local, step, dist.rank, {"epoch": epoch}))
                if stop:
                    raise run.interrupted(step)
                maybe_crash(step, run)
            if step >= plan.total_steps:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    return step
