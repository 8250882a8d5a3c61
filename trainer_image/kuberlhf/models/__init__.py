"""Models of the three stages: causal LMs (actor, reference, SFT), the reward/critic model, LoRA, loading."""

from kuberlhf.models.loading import (
    ModelError,
    fetch_model,
    is_tiny,
    load_causal_lm,
    load_tokenizer,
    model_cache_dir,
)
from kuberlhf.models.lora import apply_lora, lora_param_groups, merge_lora_
from kuberlhf.models.reward import RewardModel
from kuberlhf.models.tiny import TINY_MODEL_NAME

__all__ = [
    "TINY_MODEL_NAME", "ModelError", "RewardModel", "apply_lora", "fetch_model", "is_tiny", "load_causal_lm",
    "load_tokenizer", "lora_param_groups", "merge_lora_", "model_cache_dir",
]
