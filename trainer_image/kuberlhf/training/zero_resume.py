"""Resuming a one-rank checkpoint written at ZeRO 1/2 into a ZeRO 0 engine.

Since ``ds_config.effective_zero_stage``, a one-rank fp32 stage runs ZeRO 1/2 as ZeRO 0, and DeepSpeed's checkpoint
layouts differ: at ZeRO 0 the optimizer state is the torch optimizer's own ``state_dict`` inside
``mp_rank_00_model_states.pt``; at ZeRO 1/2 it is ``zero_pp_rank_0_mp_rank_00_optim_states.pt``, Adam's moments as one
flat tensor per parameter group, with the slice of each named parameter (``param_slice_mappings``). Over one rank
that flat partition is the whole group, so the moments are cut back into per-parameter tensors by those slices; the
weights, LR schedule and step counters come through DeepSpeed's own ``load_checkpoint``.

A checkpoint of a ZeRO 1/2 engine over several ranks, or any other mismatch, is refused naming the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ZERO_OPTIM_FILES = "zero_pp_rank_*_optim_states.pt"


class CheckpointLayoutError(RuntimeError):
    """A DeepSpeed checkpoint this engine cannot resume; the message names the fix."""


def zero_optim_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob(ZERO_OPTIM_FILES))


def needs_conversion(engine: Any, tag_dir: Path) -> bool:
    """Whether ``tag_dir`` holds ZeRO 1/2 optimizer files while ``engine`` runs ZeRO 0 (refused when that cannot be
    converted, or for the reverse mismatch)."""
    files = zero_optim_files(tag_dir)
    stage = engine.zero_optimization_stage()
    if stage == 0 and files:
        if len(files) != 1:
            raise CheckpointLayoutError(
                f"{tag_dir} was written by a ZeRO 1/2 engine over {len(files)} ranks and this one runs ZeRO 0 on one "
                "rank; resume it with the same number of ranks (nodes x gpusPerNode) it was written with"
            )
        return True
    if stage > 0 and not files and (tag_dir / "mp_rank_00_model_states.pt").exists():
        raise CheckpointLayoutError(
            f"{tag_dir} was written by a ZeRO 0 engine (a one-rank fp32 stage runs its ZeRO 1/2 as ZeRO 0) and this "
            f"engine runs ZeRO {stage}; resume it on one rank, as it was written, or restart the stage without it"
        )
    return False


@torch.no_grad()
def load_zero12_into_zero0(engine: Any, load_dir: str, tag: str) -> tuple[str | None, dict[str, Any]]:
    """``engine.load_checkpoint`` for a one-rank ZeRO 1/2 checkpoint: weights, schedule and counters through
    DeepSpeed, then Adam's per-parameter moments cut from the flat groups."""
    path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=False, load_lr_scheduler_states=True)
    if path is None:
        return None, {}
    (file,) = zero_optim_files(Path(load_dir) / tag)
    saved = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    base, mappings = saved["base_optimizer_state"], saved["param_slice_mappings"]
    optimizer = engine.optimizer
    current = optimizer.state_dict()
    if len(mappings) != len(current["param_groups"]):
        raise CheckpointLayoutError(
            f"{file}: {len(mappings)} parameter groups, the optimizer has "
            f"{len(current['param_groups'])}; restart the stage without this checkpoint"
        )
    by_name = dict(engine.module.named_parameters())
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state: dict[int, dict[str, Any]] = {}
    for group_no, (group_map, group) in enumerate(zip(mappings, optimizer.param_groups, strict=True)):
        flat = base["state"].get(group_no) or {}
        if not flat:
            continue  # never stepped
        for name, where in group_map.items():
            param = by_name[name]
            cut = {
                k: v.narrow(0, where.start, where.numel).view_as(param).clone()
                for k, v in flat.items()
                if torch.is_tensor(v) and v.dim() == 1 and v.numel() > 1
            }
            step = flat.get("step")
            cut["step"] = step.clone() if torch.is_tensor(step) else torch.tensor(float(step or 0))
            state[index[id(param)]] = cut
        if len(group_map) != len(group["params"]):
            raise CheckpointLayoutError(
                f"{file}: group {group_no} holds {len(group_map)} parameters, the optimizer "
                f"{len(group['params'])}; restart the stage without this checkpoint"
            )
    groups = [
        {**now, **{k: v for k, v in old.items() if k != "params"}}
        for now, old in zip(current["param_groups"], base["param_groups"], strict=True)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return path, client
