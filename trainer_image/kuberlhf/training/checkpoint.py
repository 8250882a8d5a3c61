"""Resumable checkpoints: DeepSpeed ``save_checkpoint`` of every trained engine (weights, optimizer, LR
scheduler) plus one ``trainer_state_rank{R}.pt`` per rank (step, data position, RNG states, controller state).

Local layout of ``<dir>/step-N/``: ``<engine name>/step-N/...`` (DeepSpeed's own files), ``trainer_state_rank*.pt``
and ``metrics.jsonl`` (rank 0's metrics so far, so a resumed run continues the same file).

Saving is split in two so that serialising and writing can leave the training thread: :func:`snapshot_engines`
(collective, on the training thread) runs DeepSpeed's ``save_checkpoint`` with its ``torch.save`` calls captured as
host-memory copies of the state (:func:`snapshot`), and :func:`write_files` (any thread) writes them, each file
under a temporary name first so a crash never leaves a half-written file under a checkpoint's name.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class PendingFile:
    """A file of a checkpoint not written yet: its path and a snapshot of what ``torch.save`` would have written."""

    path: Path
    state: Any
    zipfile: bool = True  # torch.save's ``_use_new_zipfile_serialization``, as DeepSpeed's engine had it


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            yield from _tensors(v)


def _host_copy(t: torch.Tensor, storages: dict[tuple[str, int, int], Any]) -> torch.Tensor:
    """``t`` copied to host memory as a view of its storage's copy: one copy per storage, so views that shared a
    storage (ZeRO's flat buffers) still share one, as torch.save writes them."""
    src = t.untyped_storage()
    key = (str(src.device), src.data_ptr(), src.nbytes())
    host = storages.get(key)
    if host is None:
        host = storages[key] = src.clone() if src.device.type == "cpu" else src.cpu()
    out = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out.requires_grad_(t.requires_grad)


def snapshot(obj: Any) -> Any:
    """A copy of checkpoint state that training can no longer change, in host memory: every tensor in its
    dicts/lists/tuples copied as :func:`_host_copy` (accelerator tensors to the CPU), the rest ``copy.deepcopy``.
    Saving it writes what saving the live state would have at this moment; DeepSpeed loads checkpoints to the
    CPU first, so where the copy lives does not change what a resume loads."""
    storages: dict[tuple[str, int, int], Any] = {}
    memo = {id(t): _host_copy(t, storages) for t in _tensors(obj)}
    return copy.deepcopy(obj, memo)


class _CapturedSaves:
    """Stands in for an engine's DeepSpeed checkpoint engine during one ``save_checkpoint``: each ``save`` becomes
    a :class:`PendingFile` (a snapshot); everything else (makedirs, commit, load) is the real engine's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.files: list[PendingFile] = []

    def save(self, state_dict: Any, path: str) -> None:
        self.files.append(PendingFile(Path(path), snapshot(state_dict), getattr(self.inner, "zipfile_serialization",
                                                                                True)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.contextmanager
def captured_saves(engine: Any) -> Iterator[list[PendingFile]]:
    """While inside, ``engine.save_checkpoint`` writes nothing big: its torch.save calls land in the yielded list.
    Only DeepSpeed's plain torch engine is captured (0.16-0.19 save every file through
    ``engine.checkpoint_engine.save``); another one (a decoupled or fast writer configured in DeepSpeed's own
    ``checkpoint`` section) saves synchronously as DeepSpeed does, and the list stays empty."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    inner = getattr(engine, "checkpoint_engine", None)
    if type(inner) is not TorchCheckpointEngine:
        yield []
        return
    capture = _CapturedSaves(inner)
    engine.checkpoint_engine = capture
    try:
        yield capture.files
    finally:
        engine.checkpoint_engine = inner


def snapshot_engines(engines: dict[str, Any], ckpt_dir: Path, step: int, rank: int,
                     state: dict[str, Any]) -> list[PendingFile]:
    """Collective: every rank calls it. DeepSpeed state of each engine and this rank's trainer state, as snapshots
    still to be written by :func:`write_files` (DeepSpeed's small side files -- ``latest``, its recovery script --
    are written at once)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    files: list[PendingFile] = []
    for name, engine in engines.items():
        with captured_saves(engine) as captured:
            engine.save_checkpoint(str(ckpt_dir / name), tag=tag(step), client_state={"step": step})
        files += captured
    files.append(PendingFile(ckpt_dir / f"trainer_state_rank{rank}.pt",
                             snapshot({**state, "step": step, "rng": rng_state()})))
    return files


def write_files(files: list[PendingFile]) -> None:
    """Write each pending file (a ``.kuberlhf-part`` temporary, then renamed) and drop its snapshot, so host
    memory is given back file by file."""
    from kuberlhf.storage.manifest import PART_SUFFIX

    for f in files:
        f.path.parent.mkdir(parents=True, exist_ok=True)
        part = f.path.with_name(f.path.name + PART_SUFFIX)
        torch.save(f.state, part, _use_new_zipfile_serialization=f.zipfile)
        os.replace(part, f.path)
        f.state = None


def save_engines(engines: dict[str, Any], ckpt_dir: Path, step: int, rank: int, state: dict[str, Any]) -> None:
    """Collective: :func:`snapshot_engines` written at once (a synchronous save, outside a stage's runtime)."""
    write_files(snapshot_engines(engines, ckpt_dir, step, rank, state))


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


def snapshot_module_state(engine: Any, path: Path, rank: int) -> list[PendingFile]:
    """Collective: the full weights of a frozen engine (the EMA) as one file of rank 0, still to be written."""
    from kuberlhf.training.export import state_dict_16bit

    sd = state_dict_16bit(engine.module)  # stored dtype, gathered one submodule at a time
    return [PendingFile(path, snapshot(sd))] if rank == 0 and sd is not None else []


@torch.no_grad()
def load_module_state(engine: Any, path: Path) -> None:
    """Collective: load :func:`snapshot_module_state`'s file into a (possibly ZeRO-3 partitioned) engine."""
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
