"""The shape of a model (what the memory planner needs: sizes, never weights), from its ``config.json``.

:func:`shape_from_config` is pure. :func:`read_model_shape` is the I/O edge: it reads ``config.json`` of a local
directory, the built-in tiny model, an ``s3://`` / ``file://`` model (that one object only) or a hub name
(``config.json`` only, through huggingface_hub), and falls back to :data:`KNOWN_CONFIGS` for hub names it cannot
reach (an offline cluster, or this machine).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_positions: int
    embed_dim: int  # OPT's word_embed_proj_dim (opt-350m: 512); hidden_size elsewhere
    num_kv_heads: int
    tie_word_embeddings: bool = True
    gated_mlp: bool = False  # Llama-style gate/up/down (3 matrices) instead of fc1/fc2
    final_norm: bool = True  # OPT with do_layer_norm_before false (opt-350m) has no final layer norm
    source: str = "config.json"  # where the numbers came from (config.json | known OPT config)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder block (attention + MLP + norms, biases for OPT/GPT-2)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * h * 2 + h * kv * 2  # q, o and k, v
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn_dim
        biased = self.model_type in ("opt", "gpt2", "gpt_neox", "bloom")
        bias = (2 * h + 2 * kv + self.ffn_dim + h) if biased else 0
        norms = 2 * h * (2 if biased else 1)
        return attn + mlp + bias + norms

    @property
    def backbone_params(self) -> int:
        """Parameters without the LM head (what a reward model keeps)."""
        embed = self.vocab_size * self.embed_dim
        positions = (self.max_positions + 2) * self.hidden_size if self.model_type == "opt" else 0
        proj = 2 * self.hidden_size * self.embed_dim if self.embed_dim != self.hidden_size else 0
        final_norm = self.hidden_size * (2 if self.model_type in ("opt", "gpt2", "gpt_neox", "bloom") else 1)
        final_norm *= int(self.final_norm)
        return embed + positions + proj + self.num_layers * self.layer_params + final_norm

    @property
    def causal_lm_params(self) -> int:
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.embed_dim
        return self.backbone_params + head

    @property
    def largest_layer_params(self) -> int:
        """The biggest single tensor (what ZeRO-3 gathers at once; DeepSpeed's ``largest_layer_params``)."""
        return max(
            self.vocab_size * self.embed_dim,
            self.hidden_size * self.ffn_dim,
            (self.max_positions + 2) * self.hidden_size,
        )


def _opt(hidden: int, layers: int, heads: int, embed: int | None = None) -> dict[str, Any]:
    """The config.json values of an OPT model (the benchmarks build their models from these too)."""
    return {
        "model_type": "opt",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "ffn_dim": 4 * hidden,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": embed or hidden,
        "tie_word_embeddings": True,
        # opt-350m alone applies layer norm after each block (post-LN), as its config.json says
        "do_layer_norm_before": embed is None,
        "activation_function": "relu",
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "dropout": 0.1,
        "attention_dropout": 0.0,
    }


# KNOWN CONFIGS, NOT READ FROM THE HUB: the published config.json numbers of the OPT family (Zhang et al. 2022,
# "OPT: Open Pre-trained Transformer Language Models", table 1; the facebook/opt-* model cards). Used only for a
# hub name whose config.json cannot be read; a readable config.json always wins.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/opt-125m": _opt(768, 12, 12),
    "facebook/opt-350m": _opt(1024, 24, 16, embed=512),
    "facebook/opt-1.3b": _opt(2048, 24, 32),
    "facebook/opt-2.7b": _opt(2560, 32, 32),
    "facebook/opt-6.7b": _opt(4096, 32, 32),
    "facebook/opt-13b": _opt(5120, 40, 40),
    "facebook/opt-30b": _opt(7168, 48, 56),
    "facebook/opt-66b": _opt(9216, 64, 72),
}


class ShapeError(ValueError):
    """A model whose config cannot be read or is not a decoder transformer; the message names the field."""


def shape_from_config(config: dict[str, Any], source: str = "config.json") -> ModelShape:
    """Pure: the planner's numbers from an HF ``config.json`` dict (OPT, Llama/Mistral/Qwen, GPT-2, GPT-NeoX)."""

    def first(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if config.get(k) is not None:
                return config[k]
        if default is None:
            raise ShapeError(f"config.json has none of {keys}")
        return default

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head"))
    model_type = str(config.get("model_type", "unknown"))
    gated = "intermediate_size" in config and model_type not in ("gpt_neox", "gpt2", "opt")
    return ModelShape(
        model_type=model_type,
        vocab_size=int(first("vocab_size")),
        hidden_size=hidden,
        num_layers=int(first("num_hidden_layers", "n_layer")),
        num_heads=heads,
        ffn_dim=int(first("ffn_dim", "intermediate_size", "n_inner", default=4 * hidden)),
        max_positions=int(first("max_position_embeddings", "n_positions", default=2048)),
        embed_dim=int(first("word_embed_proj_dim", default=hidden)),
        num_kv_heads=int(first("num_key_value_heads", default=heads)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        gated_mlp=gated,
        final_norm=not (model_type == "opt" and config.get("do_layer_norm_before") is False),
        source=source,
    )


def _read_config_json(source: str, storage: Any) -> dict[str, Any] | None:
    """config.json of ``source`` if it can be read without weights; None for an unreachable hub name."""
    from kuberlhf.models.loading import is_tiny, is_uri
    from kuberlhf.models.tiny import TINY_ASSETS

    if is_tiny(source):
        return json.loads((TINY_ASSETS / "config.json").read_text())
    if is_uri(source):
        from kuberlhf.storage import ObjectStore

        store = ObjectStore.from_uri(source, endpoint=getattr(storage, "endpoint", None))
        return json.loads(store.get_bytes(f"{source.rstrip('/')}/config.json"))
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        return json.loads(open(os.path.join(expanded, "config.json"), encoding="utf-8").read())
    from huggingface_hub import hf_hub_download

    for local_only in (True, False):  # the local hub cache first: it answers offline
        if not local_only and not _hub_resolves():
            return None
        try:
            return json.loads(open(hf_hub_download(source, "config.json", local_files_only=local_only),
                                   encoding="utf-8").read())
        except Exception:  # not cached / offline, unknown or gated: the known table (or an error) decides
            continue
    return None


def _hub_resolves() -> bool:
    """Whether the hub's host name resolves: huggingface_hub retries a failed name lookup five times with backoff
    (~31 s per file), which a machine without DNS for it would pay for every model of every plan."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname or "", 443)
    except OSError:
        return False
    return True


def read_model_shape(source: str, field: str, storage: Any = None) -> ModelShape:
    """The shape of the model at ``source`` (spec field ``field``), reading config.json only."""
    try:
        config = _read_config_json(source, storage)
    except (OSError, ValueError) as e:
        raise ShapeError(f"{field}={source}: cannot read its config.json: {e}") from e
    if config is not None:
        return shape_from_config(config, "config.json")
    if source in KNOWN_CONFIGS:
        return shape_from_config(KNOWN_CONFIGS[source], "known OPT config")
    raise ShapeError(
        f"{field}={source}: its config.json cannot be read (hub unreachable?) and it is not one of the "
        f"known configs ({', '.join(KNOWN_CONFIGS)}); give a local directory or an s3:// URI"
    )
