"""Training-loop building blocks shared by the stages: optimizer and LR schedule, DeepSpeed engine creation,
resumable per-rank data loading, and the step plan."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kuberlhf.models.lora import lora_param_groups


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, offload: bool,
                   lora_lr: float | None = None) -> torch.optim.Optimizer:
    groups = lora_param_groups(model, lr, weight_decay, lora_lr)
    if offload:
        # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's CPU Adam (JIT-built once, then cached)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=(0.9, 0.95))
    # the fused kernel (CPU and CUDA) updates all tensors in one call; the default per-tensor loop cost more
    # than the matmuls of a small model's step here
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int):
    from transformers import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1))


@contextlib.contextmanager
def zero3_fp32_master_shared(enabled: bool = True) -> Iterator[None]:
    """Workaround for DeepSpeed 0.16-0.19 (read in 0.19.8, ``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions``):
    a ZeRO-3 partition that is already fp32 on the optimizer's device is meant to be its own fp32 master weights
    ("we don't need another copy of the weights"), but the test compares ``tensor.device`` (a ``torch.device``)
    with ``self.device`` (the accelerator's device *name*, a str such as 'cpu' or 'cuda:0'), which is never equal;
    so fp32 training keeps a second fp32 copy of every partition, 4 bytes per parameter per rank. While inside,
    that method sees ``self.device`` as the same device as a ``torch.device``, so the test means what it says.
    The optimizer then steps the partition in place instead of a copy of it (equal values: the same math, which
    a test checks step by step). Offload, NVMe and bf16/fp16 take their own branches before or fail its dtype
    test; other DeepSpeed versions are left alone."""
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
    from packaging.version import Version

    create = getattr(Stage3, "_create_fp32_partitions", None)
    if not enabled or create is None or not Version("0.16") <= Version(deepspeed.__version__) < Version("0.20"):
        yield
        return

    def create_with_device(self: Any) -> None:
        name = self.device
        self.device = torch.device(name) if isinstance(name, str) else name
        try:
            create(self)
        finally:
            self.device = name

    Stage3._create_fp32_partitions = create_with_device
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = create


def ds_initialize(model: torch.nn.Module, config: dict[str, Any], optimizer=None, scheduler=None,
                  share_fp32_master: bool = True):
    """``deepspeed.initialize`` with the buckets sized for the model, :func:`zero3_fp32_master_shared` (off only to
    compare with DeepSpeed's own behaviour) and the single-rank shortcuts below."""
    import deepspeed

    from kuberlhf.training.ds_config import sized_buckets

    model_config = getattr(model, "config", None)
    config = sized_buckets(config, getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None))
    with zero3_fp32_master_shared(share_fp32_master):
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if skips_gradient_allreduce(engine.zero_optimization_stage(), engine.dp_world_size, engine.mpu):
        # averaging gradients over one rank is the identity, but DeepSpeed still flattens, all-reduces (gloo
        # here) and copies them back on every backward
        engine.enable_backward_allreduce = False
    if clips_locally(engine):
        engine.clip_fp32_gradients = foreach_clipper(engine)
        # DeepSpeed's zero_grad walks the module tree (named_parameters) on every step to set each grad to None
        everything = list(engine.module.parameters())

        def zero_grad() -> None:
            for p in everything:
                p.grad = None

        engine.zero_grad = zero_grad
        if steps_lean(engine):
            engine.step = lean_step(engine)
    return engine


def steps_lean(engine: Any) -> bool:
    """Whether ``engine.step`` can be :func:`lean_step`: DeepSpeed-managed gradient accumulation, and nothing its
    ``step`` does around the model step is switched on (monitor, flops profiler, wall-clock breakdown, autotuning,
    a decoupled checkpoint engine, ZenFlow, the ZeRO 0 autocast grad scaler)."""
    decoupled = getattr(getattr(engine, "checkpoint_engine", None), "is_decoupled", lambda: False)()
    return (engine.managed_gradient_accumulation() and not engine.monitor.enabled
            and not engine.flops_profiler_enabled() and not engine.wall_clock_breakdown()
            and not engine.autotuning_enabled() and not decoupled and not getattr(engine, "zenflow", False)
            and getattr(engine, "torch_autocast_z0_gradscaler", None) is None)


def lean_step(engine: Any):
    """``engine.step`` as DeepSpeed's own model step (our clipping, the fused AdamW, our zero_grad, the LR schedule,
    the step and sample counters) at each accumulation boundary, and the micro-step count, without the timers,
    throughput meter and monitor/profiler/autotuning checks its ``step`` runs around it on every call: about a
    fifth of a tiny model's optimizer step in Python (bench/ppo_bench.py, optimizer step vs torch's)."""
    take_model_step = engine._take_model_step  # noqa: SLF001 - DeepSpeed's step minus its bookkeeping

    def step(lr_kwargs: dict[str, Any] | None = None) -> None:
        if engine.is_gradient_accumulation_boundary():
            take_model_step(lr_kwargs)
        engine.micro_steps += 1

    return step


def clips_locally(engine: Any) -> bool:
    """Whether DeepSpeed's fp32 gradient clipping can be torch's foreach clipping without a collective: ZeRO 0,
    no model parallelism, fp32 (the only path that calls ``clip_fp32_gradients``). DeepSpeed's version loops over
    the tensors in Python and all-reduces the norm over the data-parallel group even at world size 1; at ZeRO 0
    the gradients are already averaged over the ranks when it runs, so every rank computes the same norm."""
    return (engine.gradient_clipping() > 0 and engine.zero_optimization_stage() == 0 and engine.mpu is None
            and not (engine.fp16_enabled() or engine.bfloat16_enabled()))


def foreach_clipper(engine: Any):
    """``engine.clip_fp32_gradients`` as ``torch.nn.utils.clip_grad_norm_(foreach=True)``: the same norm and
    scale (``min(1, max_norm / (norm + 1e-6))``) in a few multi-tensor kernels. The gradient-carrying parameters
    are collected once; LoRA or frozen modules keep ``requires_grad`` fixed after initialisation."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    max_norm = float(engine.gradient_clipping())

    def clip() -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm, foreach=True)

    return clip


def skips_gradient_allreduce(zero_stage: int, dp_world_size: int, mpu: Any = None) -> bool:
    """Whether the backward gradient all-reduce can be switched off: one data-parallel rank, ZeRO 0 (ZeRO 1-3
    move gradients into their partitions in that step too) and no model parallelism."""
    return zero_stage == 0 and dp_world_size == 1 and mpu is None


def rank_indices(dataset_len: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool = True
                 ) -> list[int]:
    """This rank's sample order for an epoch (DistributedSampler's: the same on every restart)."""
    sampler = DistributedSampler(range(dataset_len), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=dataset_len >= world)
    sampler.set_epoch(epoch)
    return list(sampler)


def make_loader(dataset: Dataset, batch_size: int, rank: int, world: int, seed: int, epoch: int,
                skip_batches: int = 0, shuffle: bool = True, drop_last: bool = True) -> DataLoader:
    """The epoch's batches of this rank, starting after ``skip_batches`` (resume mid-epoch)."""
    indices = rank_indices(len(dataset), rank, world, seed, epoch, shuffle)[skip_batches * batch_size:]
    # a DataLoader draws its base seed from the global torch RNG unless it has its own generator; that draw
    # would shift the sampling RNG of a resumed run (which builds its loader after restoring the RNG state)
    # against an uninterrupted one (which built it before)
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=dataset.collate,
                      drop_last=drop_last, generator=torch.Generator())


def batches_per_epoch(dataset_len: int, batch_size: int, rank: int, world: int) -> int:
    """Full batches one rank gets per epoch from :func:`make_loader` (``drop_last``)."""
    return len(rank_indices(dataset_len, rank, world, 0, 0, shuffle=False)) // batch_size


def epoch_position(consumed: int, per_epoch: int) -> tuple[int, int]:
    """(epoch, batches to skip in it) after ``consumed`` batches of ``per_epoch`` each (endless iteration)."""
    if per_epoch <= 0:
        return 0, 0
    return divmod(consumed, per_epoch)


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps of a stage: ``batches_per_epoch`` micro-batches per rank, ``grad_accum`` per step."""

    batches_per_epoch: int
    grad_accum: int
    epochs: int
    max_steps: int | None

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch // self.grad_accum

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batches already consumed in that epoch) after ``step`` optimizer steps."""
        if self.steps_per_epoch == 0:
            return 0, 0
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.grad_accum


def plan_for(dataset_len: int, micro_batch: int, world: int, grad_accum: int, epochs: int,
             max_steps: int | None, what: str) -> StepPlan:
    per_rank = dataset_len // world if dataset_len >= world else dataset_len
    plan = StepPlan(per_rank // micro_batch, grad_accum, epochs, max_steps)
    if plan.total_steps == 0:
        raise ValueError(f"{what}: {dataset_len} training rows give no optimizer step with {world} ranks x "
                         f"perDeviceBatchSize {micro_batch} x gradientAccumulationSteps {grad_accum}; lower them "
                         "or add data (data.maxSamples, data.split)")
    return plan


def to_device(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def safe_exp(x: float) -> float:
    return math.exp(x) if x < 80 else float("inf")
