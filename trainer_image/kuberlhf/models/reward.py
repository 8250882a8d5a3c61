"""The reward model (step 2) and the critic (step 3): a transformer backbone plus a scalar value head.

The value head maps each position's last hidden state to a scalar; the reward of a sequence is the value at
its last non-pad token (``kuberlhf.rlhf.ppo_math.end_score_index``), the critic uses every position.

Saved format (a directory; ``RewardModel.save_pretrained`` / ``RewardModel.from_pretrained``):

- ``config.json`` + ``model.safetensors``: the backbone (``AutoModel``, no LM head) in Hugging Face format, so
  ``AutoModel.from_pretrained(dir)`` loads it on its own;
- the FULL tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ...);
- ``value_head.safetensors``: one tensor ``v_head.weight`` of shape ``(1, hidden)`` (no bias);
- ``reward_config.json``: ``{"format": "kuberlhf-reward-v1", "score": "last_non_pad_token", "hidden_size": H,
  "backbone_class": "OPTModel"}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kuberlhf.rlhf.ppo_math import gather_end_scores

REWARD_FORMAT = "kuberlhf-reward-v1"
VALUE_HEAD_FILE = "value_head.safetensors"
REWARD_CONFIG_FILE = "reward_config.json"


def _hidden_size(config: Any) -> int:
    # OPT projects the last hidden state to word_embed_proj_dim (opt-350m: 1024 -> 512)
    return int(getattr(config, "word_embed_proj_dim", None) or getattr(config, "hidden_size", None)
               or config.n_embd)


class RewardModel(nn.Module):
    """Backbone + scalar value head. ``forward`` returns per-token values (B, L) and end scores (B,)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.config = backbone.config
        self.rwtransformer = backbone
        self.v_head = nn.Linear(_hidden_size(backbone.config), 1, bias=False)

    @classmethod
    def from_causal_lm_source(cls, source: str, field: str = "spec.reward.model", seed: int = 1234,
                              dropout: float | None = None, revision: str | None = None,
                              ds_config: dict[str, Any] | None = None) -> RewardModel:
        """A fresh reward model whose backbone is the base model of a causal LM (head randomly initialised).
        A ZeRO-3 ``ds_config`` creates it partitioned (``kuberlhf.models.partition``)."""
        from transformers import AutoModel

        from kuberlhf.models.loading import apply_dropout, is_tiny, load_pretrained, resolve_local
        from kuberlhf.models.partition import gathered, partitioned_loading
        from kuberlhf.models.tiny import tiny_config

        if not is_tiny(source):
            path = resolve_local(source, field)
            if (Path(path) / REWARD_CONFIG_FILE).exists():
                return cls.from_pretrained(path, dropout=dropout, ds_config=ds_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with partitioned_loading(ds_config):
                if is_tiny(source):
                    config = tiny_config()
                    apply_dropout(config, dropout)
                    backbone = AutoModel.from_config(config)
                else:
                    backbone = load_pretrained(AutoModel, path, source, field, dropout, revision)
            model = cls.wrap(backbone, ds_config)
            with gathered([model.v_head.weight], modifier_rank=0):
                nn.init.normal_(model.v_head.weight, std=1.0 / (model.v_head.in_features ** 0.5))
        return model

    @classmethod
    def wrap(cls, backbone: nn.Module, ds_config: dict[str, Any] | None = None) -> RewardModel:
        """The reward model around ``backbone``; the value head is partitioned like a ZeRO-3 backbone."""
        from kuberlhf.models.partition import zero_init

        with zero_init(ds_config):
            return cls(backbone)

    def gradient_checkpointing_enable(self) -> None:
        self.rwtransformer.gradient_checkpointing_enable()
        self.rwtransformer.config.use_cache = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                use_cache: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {"position_ids": position_ids} if position_ids is not None else {}
        hidden = self.rwtransformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                                    **kwargs)[0]
        values = self.v_head(hidden).squeeze(-1)
        return values, gather_end_scores(values, attention_mask)

    def end_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward(input_ids, attention_mask)[1]

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                        tokenizer: Any = None) -> None:
        """Write the documented format. ``state_dict`` (keys of this module) overrides the live weights, as
        ZeRO-3 needs a gathered copy."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        backbone_sd = {k[len("rwtransformer."):]: v for k, v in sd.items() if k.startswith("rwtransformer.")}
        self.rwtransformer.save_pretrained(out, state_dict=backbone_sd)
        save_file({"v_head.weight": sd["v_head.weight"].detach().contiguous().cpu()}, str(out / VALUE_HEAD_FILE))
        self.write_metadata(out, self.v_head.in_features, type(self.rwtransformer).__name__)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)

    @staticmethod
    def write_metadata(out_dir: str | os.PathLike, hidden_size: int, backbone_class: str) -> None:
        meta = {"format": REWARD_FORMAT, "score": "last_non_pad_token", "hidden_size": hidden_size,
                "backbone_class": backbone_class}
        (Path(out_dir) / REWARD_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dropout: float | None = None,
                        ds_config: dict[str, Any] | None = None) -> RewardModel:
        """Load the documented format; a ZeRO-3 ``ds_config`` loads it partitioned."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        from kuberlhf.models.loading import ModelError, apply_dropout
        from kuberlhf.models.partition import gathered, partitioned_loading

        path = Path(path)
        meta_file = path / REWARD_CONFIG_FILE
        if not meta_file.exists():
            raise ModelError(f"{path} is not a kuberlhf reward model: {REWARD_CONFIG_FILE} is missing")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != REWARD_FORMAT:
            raise ModelError(f"{meta_file}: unknown format {meta.get('format')!r}, expected {REWARD_FORMAT}")
        config = AutoConfig.from_pretrained(path)
        apply_dropout(config, dropout)
        with partitioned_loading(ds_config):
            backbone = AutoModel.from_pretrained(path, config=config, dtype=torch.float32)
        model = cls.wrap(backbone, ds_config)
        head = load_file(str(path / VALUE_HEAD_FILE))
        with gathered([model.v_head.weight], modifier_rank=0):
            model.v_head.weight.data.copy_(head["v_head.weight"].to(model.v_head.weight.dtype))
        return model
