"""The data layer (DeepSpeed-Chat's idea): every dataset becomes rows of prompt / chosen / rejected, each dataset
is split across the three steps by seed, the datasets are blended, and each stage tokenises its rows (cached
safely across ranks). Nothing here imports torch except ``kuberlhf.data.tokenized``, loaded lazily."""

from __future__ import annotations

from typing import Any

from kuberlhf.data.adapters import ADAPTERS, Adapter, get_adapter, known_names
from kuberlhf.data.blend import STAGE_INDEX, spec_hash, stage_rows, stage_slice_indices, unsupervised_texts
from kuberlhf.data.cache import default_cache_dir, tokenize_cached, tokenizer_hash
from kuberlhf.data.encode import IGNORE_INDEX
from kuberlhf.data.errors import DataError
from kuberlhf.data.format import cut_at_next_turn, format_conversation, format_prompt, format_response
from kuberlhf.data.sources import BUILTINS, all_known_names, load_rows, load_texts
from kuberlhf.data.splits import split_indices

_TORCH_NAMES = ("SFTDataset", "PairDataset", "PromptDataset", "UnsupervisedDataset", "sft_collate", "pair_collate",
                "prompt_collate", "pad_left", "pad_right")


def __getattr__(name: str) -> Any:
    # The torch datasets are imported on first use so `import kuberlhf.data` stays light (operator, CLI).
    if name in _TORCH_NAMES:
        from kuberlhf.data import tokenized

        return getattr(tokenized, name)
    raise AttributeError(f"module 'kuberlhf.data' has no attribute {name!r}")


__all__ = [
    "ADAPTERS", "Adapter", "BUILTINS", "DataError", "IGNORE_INDEX", "STAGE_INDEX", "all_known_names",
    "cut_at_next_turn", "default_cache_dir", "format_conversation", "format_prompt", "format_response",
    "get_adapter", "known_names", "load_rows", "load_texts", "spec_hash", "split_indices", "stage_rows",
    "stage_slice_indices", "tokenize_cached", "tokenizer_hash", "unsupervised_texts", *_TORCH_NAMES,
]
