"""ZeRO-3 partitioned construction: models are created already split across the data-parallel ranks, so no rank
ever holds a whole model (DeepSpeed-Chat's and OpenRLHF's ``HfDeepSpeedConfig`` pattern).

Transformers reads the active DeepSpeed config through a weak reference: while an ``HfDeepSpeedConfig`` is
alive, ``from_pretrained`` / ``from_config`` build the model inside ``deepspeed.zero.Init`` (each parameter
partitioned as its module is constructed, rank 0 copying the checkpoint in one submodule at a time) and
``resize_token_embeddings`` gathers what it resizes. :func:`partitioned_loading` keeps that object alive for
exactly the loading of one model: step 3 mixes ZeRO stages (a ZeRO-3 actor next to a ZeRO-2 critic), so a
config left alive would partition the next model too. Our own modules (the reward model's value head) are
built under :func:`zero_init`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def is_zero3(ds_config: dict[str, Any] | None) -> bool:
    return bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


@contextlib.contextmanager
def partitioned_loading(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """While active (and ``ds_config`` is ZeRO-3), transformers creates models partitioned. No-op otherwise."""
    if not is_zero3(ds_config):
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weakref to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def zero_init(ds_config: dict[str, Any] | None) -> contextlib.AbstractContextManager:
    """``deepspeed.zero.Init`` for modules we construct ourselves (ZeRO-3 only)."""
    if not is_zero3(ds_config):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its full shape is ``ds_shape``; ``param`` itself is an empty placeholder)."""
    return hasattr(param, "ds_id")


def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> contextlib.AbstractContextManager:
    """Collective when any parameter is partitioned: the full tensors inside the block (rank ``modifier_rank``'s
    changes are kept); a no-op for plain tensors."""
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in params if is_partitioned(p)], modifier_rank=modifier_rank)


def full_numel(param: torch.Tensor) -> int:
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


def local_numel(param: torch.Tensor) -> int:
    """Elements this rank stores for ``param`` (its ZeRO-3 partition, or the whole tensor)."""
    return int(param.ds_tensor.numel()) if is_partitioned(param) else param.numel()


def partition_report(module: torch.nn.Module) -> dict[str, Any]:
    """What this rank holds of ``module``: full and local element counts, how many parameters are partitioned,
    and how many are materialised (``param.numel() > 0``) at this moment."""
    params = list(module.parameters())
    return {
        "params": len(params),
        "partitioned": sum(is_partitioned(p) for p in params),
        "materialised": sum(p.numel() > 0 for p in params),
        "full_numel": sum(full_numel(p) for p in params),
        "local_numel": sum(local_numel(p) for p in params),
        "statuses": sorted({str(p.ds_status.name) for p in params if is_partitioned(p)}),
    }
