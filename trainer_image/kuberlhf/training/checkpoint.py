"""Resumable checkpoints: DeepSpeed ``save_checkpoint`` of every trained engine (weights, optimizer, LR
scheduler) plus one ``trainer_state_rank{R}.pt`` per rank (step, data position, RNG states, controller state).

Local layout of ``<dir>/step-N/``: ``<engine name>/step-N/...`` (DeepSpeed's own files), ``trainer_state_rank*.pt``
and ``metrics.jsonl`` (rank 0's metrics so far, so a resumed run continues the same file).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (the sampling RNG of generation), so a fresh run does not depend on how much
    randomness set-up code happened to draw."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def tag(step: int) -> str:
    return f"step-{step}"


def save_engines(engines: dict[str, Any], ckpt_dir: Path, step: int, rank: int, state: dict[str, Any]) -> None:
    """Collective: every rank calls it. Writes DeepSpeed state of each engine and this rank's trainer state."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for name, engine in engines.items():
        engine.save_checkpoint(str(ckpt_dir / name), tag=tag(step), client_state={"step": step})
    torch.save({**state, "step": step, "rng": rng_state()}, ckpt_dir / f"trainer_state_rank{rank}.pt")


def load_engines(engines: dict[str, Any], ckpt_dir: Path, step: int, rank: int) -> dict[str, Any]:
    """Collective: restores every engine (with optimizer and scheduler) and returns this rank's trainer state."""
    from kuberlhf.training.zero_resume import load_zero12_into_zero0, needs_conversion

    for name, engine in engines.items():
        if needs_conversion(engine, ckpt_dir / name / tag(step)):  # written at ZeRO 1/2 before one rank ran ZeRO 0
            path, _ = load_zero12_into_zero0(engine, str(ckpt_dir / name), tag(step))
        else:
            path, _ = engine.load_checkpoint(str(ckpt_dir / name), tag=tag(step), load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"checkpoint {ckpt_dir} has no DeepSpeed state for {name!r} at {tag(step)}")
    own = ckpt_dir / f"trainer_state_rank{rank}.pt"
    # a different world size on resume: fall back to rank 0's position (the data sampler re-shards by rank)
    state = torch.load(own if own.exists() else ckpt_dir / "trainer_state_rank0.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state


def save_module_state(engine: Any, path: Path, rank: int) -> None:
    """Collective: the full weights of a frozen engine (the EMA) as one file written by rank 0."""
    from kuberlhf.training.export import state_dict_16bit

    sd = state_dict_16bit(engine.module)  # stored dtype, gathered one submodule at a time
    if rank == 0 and sd is not None:
        torch.save(sd, path)


@torch.no_grad()
def load_module_state(engine: Any, path: Path) -> None:
    """Collective: load :func:`save_module_state`'s file into a (possibly ZeRO-3 partitioned) engine."""
    import torch.distributed as dist

    from kuberlhf.models.partition import gathered

    main = not dist.is_initialized() or dist.get_rank() == 0
    # only rank 0's values are kept (modifier_rank=0): the others never read the file's pages
    sd = torch.load(path, weights_only=True, mmap=True)
    for name, p in engine.module.named_parameters():
        if name in sd:
            with gathered([p], modifier_rank=0):
                if main or not hasattr(p, "ds_id"):
                    p.data.copy_(sd[name].to(p.dtype))
