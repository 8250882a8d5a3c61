"""Models of the three stages: causal LMs (actor, reference, SFT), the reward/critic model, LoRA, loading.
Torch-heavy members load on first use, so path checks (``kuberlhf.models.loading``) stay light."""

from __future__ import annotations

import importlib
from typing import Any

_MEMBERS = {
    "ModelError": "loading", "fetch_model": "loading", "is_tiny": "loading", "load_causal_lm": "loading",
    "load_tokenizer": "loading", "model_cache_dir": "loading",
    "apply_lora": "lora", "lora_param_groups": "lora", "merge_lora_": "lora",
    "RewardModel": "reward", "TINY_MODEL_NAME": "tiny",
}


def __getattr__(name: str) -> Any:
    if name in _MEMBERS:
        return getattr(importlib.import_module(f"kuberlhf.models.{_MEMBERS[name]}"), name)
    raise AttributeError(f"module 'kuberlhf.models' has no attribute {name!r}")


__all__ = sorted(_MEMBERS)
