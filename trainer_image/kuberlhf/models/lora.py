"""LoRA through ``peft``: adapters are injected into the Linear layers (and GPT-2 style ``Conv1D`` layers) whose
qualified name contains ``LoraSpec.module_name``, optionally everything else is frozen, and before export the
adapters are merged into the base weights so the saved model is a plain Hugging Face model.

``module_name``'s default, ``decoder.layers.``, is DeepSpeed-Chat's (OPT's layer names). A model whose names
do not contain it (Llama ``model.layers.N``, GPT-2 ``transformer.h.N``, GPT-NeoX ``gpt_neox.layers.N``...) gets
its adapters on the layers of its decoder blocks instead: the Linear/Conv1D layers inside the model's
``ModuleList`` of blocks, which is what the default means for OPT. A name the user set explicitly is used as
given and an error names the field when it matches nothing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEFAULT_MODULE_NAME = "decoder.layers."  # LoraSpec.module_name's default (DeepSpeed-Chat's --lora_module_name)


def _adaptable(m: nn.Module) -> bool:
    """Layers peft can put LoRA on: nn.Linear and transformers' Conv1D (GPT-2's transposed Linear)."""
    if isinstance(m, nn.Linear):
        return True
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, Conv1D)


def lora_targets(module: nn.Module, substring: str) -> list[str]:
    return [n for n, m in module.named_modules() if _adaptable(m) and substring in n]


def block_layer_targets(module: nn.Module) -> list[str]:
    """The adaptable layers inside the model's decoder blocks: the ``ModuleList``(s) whose items hold them, so
    embeddings, the LM head and a reward model's value head are left alone."""
    lists = [name for name, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    prefixes = tuple(f"{name}." for name in lists)
    return [n for n, m in module.named_modules() if _adaptable(m) and n.startswith(prefixes)]


def resolve_lora_targets(module: nn.Module, module_name: str) -> list[str]:
    targets = lora_targets(module, module_name)
    if not targets and module_name == DEFAULT_MODULE_NAME:
        targets = block_layer_targets(module)
    return targets


def apply_lora(module: nn.Module, spec: Any, field: str = "lora") -> nn.Module:
    """Inject LoRA adapters in place (no-op when ``spec`` is None or ``spec.dim == 0``)."""
    if spec is None or spec.dim == 0:
        return module
    from peft import LoraConfig, inject_adapter_in_model

    targets = resolve_lora_targets(module, spec.module_name)
    if not targets:
        raise ValueError(f"{field}.moduleName={spec.module_name!r} matches no Linear layer of the model; "
                         "use a substring of its layer names (e.g. 'decoder.layers.' for OPT, 'layers.' for Llama, "
                         "'h.' for GPT-2)")
    conv1d = any(not isinstance(module.get_submodule(t), nn.Linear) for t in targets)
    # Conv1D stores its weight transposed (fan_in_fan_out); a model has either kind, not both
    config = LoraConfig(r=spec.dim, lora_alpha=spec.alpha or spec.dim, target_modules=targets, lora_dropout=0.0,
                        fan_in_fan_out=conv1d)
    inject_adapter_in_model(config, module)
    if spec.only_optimize_lora:
        for name, p in module.named_parameters():
            # the reward/critic value head stays trainable: a frozen random head cannot learn a score
            p.requires_grad = "lora_" in name or name.startswith("v_head")
    return module


def lora_param_groups(module: nn.Module, lr: float, weight_decay: float, lora_lr: float | None = None
                      ) -> list[dict[str, Any]]:
    """AdamW parameter groups: no decay on biases/LayerNorms; LoRA weights at their own learning rate."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = name.endswith("bias") or "layer_norm" in name.lower() or "layernorm" in name.lower()
        is_lora = "lora_" in name
        groups.setdefault((no_decay, is_lora), []).append(p)
    out = []
    for (no_decay, is_lora), params in groups.items():
        out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                    "lr": (lora_lr or lr) if is_lora else lr})
    return out


def merge_lora_(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer):
            sub.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, sub.get_base_layer())
    return module


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in n for n, _ in module.named_parameters())
