"""Distributed start-up of a stage worker: torchrun-style env rendezvous (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), the DeepSpeed launcher's ``--local_rank``, or a single process with no launcher.

On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op (~3 min on 2 cores) in every
``init_distributed``. gloo does the same job for our tiny CPU runs, so the op is switched off through
DeepSpeed's own compatibility table unless ``KUBERLHF_DS_SHM_COMM=1`` asks for it (it is then built once into
TORCH_EXTENSIONS_DIR, default ``~/.cache/kuberlhf/torch_extensions``, and reused).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_single_process_env(env: dict[str, str] | None = None) -> None:
    """Make a launcher-less process look like rank 0 of 1 (DeepSpeed otherwise tries MPI discovery)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return
    env.setdefault("RANK", "0")
    env.setdefault("LOCAL_RANK", env.get("LOCAL_RANK", "0"))
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_WORLD_SIZE", "1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(free_port())


def configure_extensions_dir() -> None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "kuberlhf" / "torch_extensions"))


def disable_cpu_shm_comm() -> None:
    """Keep DeepSpeed's CPU comm on plain gloo: mark the shm op incompatible so it is never JIT-built."""
    if os.environ.get("KUBERLHF_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    # DeepSpeed probes op compatibility once per process and keeps the dict; its own check reads it back
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def skip_muon_import() -> None:
    """DeepSpeed imports its Muon optimizer in every ``deepspeed.initialize`` only for ``isinstance`` checks;
    the import pulls in torch.compile machinery (~9 s per rank here, more under load). We never build a Muon
    optimizer, so a stand-in module whose ``MuonWithAuxAdam`` no optimizer is an instance of gives DeepSpeed
    the same answers without the import. ``KUBERLHF_DS_MUON=1`` keeps the real module."""
    import sys
    import types

    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if os.environ.get("KUBERLHF_DS_MUON") == "1" or name in sys.modules:
        return
    stand_in = types.ModuleType(name)

    class MuonWithAuxAdam:  # never instantiated: only the target of DeepSpeed's isinstance checks
        pass

    stand_in.MuonWithAuxAdam = MuonWithAuxAdam
    sys.modules[name] = stand_in


def init_distributed(accelerator: str, timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA) and return this rank."""
    import deepspeed
    import torch

    configure_extensions_dir()
    set_single_process_env()
    skip_muon_import()
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        disable_cpu_shm_comm()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="gloo" if accelerator == "cpu" else "nccl",
                               timeout=datetime.timedelta(seconds=timeout_s))
    return dist_info(os.environ, torch.distributed.get_rank(), torch.distributed.get_world_size())


def dist_info(env: Mapping[str, str], rank: int, world: int) -> DistInfo:
    """This rank's place from the launcher's env: torchrun sets LOCAL_WORLD_SIZE and GROUP_RANK, the DeepSpeed
    launcher LOCAL_SIZE and CROSS_RANK; with neither, all ranks are on one node."""
    local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
    node_rank = env.get("GROUP_RANK") or env.get("CROSS_RANK")
    return DistInfo(rank=rank, local_rank=int(env.get("LOCAL_RANK", rank % local_world)), world_size=world,
                    local_world_size=local_world, node_rank=int(node_rank) if node_rank else rank // local_world)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_object(obj):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def collective_device(backend: str):
    """Where a tensor for a collective of ``backend`` must live: NCCL reduces only CUDA tensors (a CPU tensor
    fails with "No backend type associated with device type cpu"), gloo CPU ones."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_mean(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device(dist.get_backend()))
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank when ``flag`` is True on at least one."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
