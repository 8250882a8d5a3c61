"""The data layer (DeepSpeed-Chat's idea): every dataset becomes rows of prompt / chosen / rejected, each dataset
is split across the three steps by seed, the datasets are blended, and each stage tokenises its rows (cached
safely across ranks).

Every name is imported on first use: ``kuberlhf.data.format`` (used by the chat server and the CLI) must not pull
in ``datasets`` (~3 s) or torch. Only ``kuberlhf.data.tokenized`` imports torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # rows
    "load_rows": "sources", "load_texts": "sources", "BUILTINS": "sources", "all_known_names": "sources",
    "stage_rows": "blend", "unsupervised_texts": "blend", "stage_slice_indices": "blend", "spec_hash": "blend",
    "STAGE_INDEX": "blend",
    "ADAPTERS": "adapters", "Adapter": "adapters", "get_adapter": "adapters", "known_names": "adapters",
    "split_indices": "splits",
    "DataError": "errors",
    "format_prompt": "format", "format_response": "format", "format_conversation": "format",
    "cut_at_next_turn": "format",
    # tokens
    "tokenize_cached": "cache", "default_cache_dir": "cache", "tokenizer_hash": "cache",
    "IGNORE_INDEX": "encode",
    "SFTDataset": "tokenized", "PairDataset": "tokenized", "PromptDataset": "tokenized",
    "UnsupervisedDataset": "tokenized", "sft_collate": "tokenized", "pair_collate": "tokenized",
    "prompt_collate": "tokenized", "pad_left": "tokenized", "pad_right": "tokenized",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kuberlhf.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kuberlhf.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
