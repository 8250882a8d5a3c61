"""The built-in model ``kuberlhf/tiny-opt``: the shipped tiny OPT config (2 layers, hidden 64, vocab 768)
with random weights drawn from the stage seed, and the shipped byte-level BPE tokenizer (trained on the built-in
data by hack/make_tiny_assets.py). It lets the whole
pipeline run on a CPU in minutes with no hub access."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL_NAME = "kuberlhf/tiny-opt"
TINY_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-opt"


def tiny_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(TINY_ASSETS)


def tiny_causal_lm(seed: int, dropout: float | None = None):
    """Random-init tiny OPT; the same seed gives the same weights on every rank and node."""
    import torch
    from transformers import AutoModelForCausalLM

    from kuberlhf.models.loading import apply_dropout

    config = tiny_config()
    apply_dropout(config, dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
