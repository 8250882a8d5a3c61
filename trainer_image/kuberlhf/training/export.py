"""Final-model export from DeepSpeed engines into Hugging Face format, in the training precision.

The weights are written in the dtype the engine trains in (bf16/fp16 safetensors; fp32 only for fp32
training). At ZeRO-3 they are gathered one submodule at a time (:func:`export_tensors`): each module's own
parameters are all-gathered, rank 0 copies them to CPU in the export dtype and they are re-partitioned before
the next module, and rank 0 streams them into safetensors shards of at most ``max_shard_bytes``
(:class:`ShardWriter`), so no rank ever materialises the whole model, in fp32 or otherwise. LoRA adapters are
merged into their base weights on the way (``W + B @ A * scale``, in fp32, then cast), so the result loads
with plain ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kuberlhf.models.partition import gathered

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' usual shard size for large checkpoints
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def engine_dtype(engine: Any) -> torch.dtype:
    """The precision the engine trains in (what the export writes)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def _lora_layer_class() -> type | None:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; a model without LoRA does not need it
        return None
    return LoraLayer


def export_tensors(
    module: nn.Module, dtype: torch.dtype | None = None, merge_lora: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective (every rank iterates to the end). Rank 0 gets ``(name, CPU tensor)`` for every parameter and
    persistent buffer of ``module`` in ``dtype`` (default: as stored), gathering one submodule at a time; other
    ranks get nothing. Tied parameters appear once (under their first name). With ``merge_lora``, a LoRA layer
    yields its merged ``weight`` (and ``bias``) under the plain layer's name."""
    main = _is_main()
    lora_cls = _lora_layer_class() if merge_lora else None
    seen: set[int] = set()

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(
            device="cpu", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True
        ).contiguous()

    def walk(mod: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if lora_cls is not None and isinstance(mod, lora_cls):
            out = []
            with gathered(mod.parameters()):
                if main:
                    base = mod.get_base_layer()
                    weight = base.weight.detach().float().clone()
                    for name in mod.active_adapters:
                        if name in mod.lora_A:
                            weight += mod.get_delta_weight(name).float()
                    out.append((f"{prefix}weight", cast(weight)))
                    if getattr(base, "bias", None) is not None:
                        out.append((f"{prefix}bias", cast(base.bias)))
            seen.update(id(p) for p in mod.parameters())
            yield from out
            return
        own = [(n, p) for n, p in mod.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        out = []
        with gathered(p for _, p in own):
            if main:
                out = [(f"{prefix}{n}", cast(p)) for n, p in own]
        yield from out
        if main:
            for n, b in mod.named_buffers(recurse=False):
                if b is not None and n not in mod._non_persistent_buffers_set:
                    yield f"{prefix}{n}", cast(b)
        for n, child in mod.named_children():
            yield from walk(child, f"{prefix}{n}.")

    yield from walk(module, "")


def state_dict_16bit(
    module: nn.Module, dtype: torch.dtype | None = None, merge_lora: bool = False
) -> dict[str, torch.Tensor] | None:
    """Collective. :func:`export_tensors` as one dict on rank 0 (None elsewhere), for state that must stay one
    file (the EMA in a checkpoint)."""
    sd = dict(export_tensors(module, dtype, merge_lora=merge_lora))
    return sd if _is_main() else None


class ShardWriter:
    """Streams tensors into HF safetensors shards (``model.safetensors``, or ``model-0000i-of-0000N.safetensors``
    plus ``model.safetensors.index.json``), holding at most one shard in memory."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".shard-{len(self.files):05d}.safetensors.partial"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names (and the index); returns the file names."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, keys), name in zip(self.files, names, strict=True):
            os.replace(path, self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            names.append(INDEX_NAME)
        return names


def _export_config(config: Any, dtype: torch.dtype) -> Any:
    config = copy.deepcopy(config)
    config.use_cache = True  # gradient checkpointing switched it off for training
    config.dtype = dtype
    return config


def export_causal_lm(
    engine: Any, tokenizer: Any, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Collective. Rank 0 writes config, safetensors weights (training dtype, LoRA merged) and the full
    tokenizer to ``out_dir``."""
    dtype = engine_dtype(engine)
    module = engine.module
    writer = ShardWriter(out_dir, max_shard_bytes) if _is_main() else None
    for name, tensor in export_tensors(module, dtype):
        writer.add(name, tensor)
    if writer is None:
        return
    writer.close()
    _export_config(module.config, dtype).save_pretrained(out_dir)
    if getattr(module, "generation_config", None) is not None:
        module.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def export_reward_model(
    engine: Any, tokenizer: Any, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Collective. Rank 0 writes the reward-model format documented in ``kuberlhf.models.reward`` (backbone
    shards + value head) in the training dtype."""
    from safetensors.torch import save_file

    from kuberlhf.models.reward import VALUE_HEAD_FILE, RewardModel

    dtype = engine_dtype(engine)
    module = engine.module
    writer = ShardWriter(out_dir, max_shard_bytes) if _is_main() else None
    head: dict[str, torch.Tensor] = {}
    prefix = "rwtransformer."
    for name, tensor in export_tensors(module, dtype):
        if name.startswith(prefix):
            writer.add(name[len(prefix) :], tensor)
        else:
            head[name] = tensor
    if writer is None:
        return
    writer.close()
    _export_config(module.rwtransformer.config, dtype).save_pretrained(out_dir)
    save_file({"v_head.weight": head["v_head.weight"]}, str(Path(out_dir) / VALUE_HEAD_FILE))
    RewardModel.write_metadata(out_dir, module.v_head.in_features, type(module.rwtransformer).__name__)
    tokenizer.save_pretrained(out_dir)
