"""Final-model export from DeepSpeed engines into Hugging Face format (full weights on rank 0, any ZeRO stage).
The gathered weights are loaded into a fresh CPU model built from the config; LoRA adapters are merged, so
the result loads with plain ``AutoModelForCausalLM.from_pretrained``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Collective. The full state dict on rank 0 (None elsewhere); gathers ZeRO-3 partitions."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def plain_module(build: Callable[[], nn.Module], state_dict: dict[str, torch.Tensor], lora: Any = None) -> nn.Module:
    """``build()`` (a fresh model of the same architecture) loaded with ``state_dict``; LoRA merged."""
    from kuberlhf.models.lora import apply_lora, merge_lora_

    module = build()
    if any("lora_" in k for k in state_dict):
        apply_lora(module, lora)
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    tied = getattr(module.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and "lm_head" in k)]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict does not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    if tied and hasattr(module, "tie_weights"):
        module.tie_weights()
    merge_lora_(module)
    return module.float()


def causal_lm_builder(config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config)

    return build


def reward_builder(config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import AutoModel

        from kuberlhf.models.reward import RewardModel

        return RewardModel(AutoModel.from_config(config))

    return build


def save_causal_lm(module: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    module.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def export_causal_lm(engine: Any, tokenizer: Any, out_dir: Path, lora: Any = None) -> None:
    """Collective. Rank 0 writes config, model.safetensors and the full tokenizer to ``out_dir``."""
    sd = consolidated_state_dict(engine)
    if sd is None:
        return
    save_causal_lm(plain_module(causal_lm_builder(engine.module.config), sd, lora), tokenizer, out_dir)


def export_reward_model(engine: Any, tokenizer: Any, out_dir: Path, lora: Any = None) -> None:
    """Collective. Rank 0 writes the reward-model format documented in ``kuberlhf.models.reward``."""
    sd = consolidated_state_dict(engine)
    if sd is None:
        return
    plain_module(reward_builder(engine.module.config), sd, lora).save_pretrained(out_dir, tokenizer=tokenizer)
