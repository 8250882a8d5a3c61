"""Torch datasets and collators of the three stages (the only data module that imports torch).

Items are unpadded 1-D LongTensors (unless ``pad_to_max_len``); each dataset's ``collate`` pads a batch to its
longest sequence: right padding for SFT, pairs and ptx, LEFT padding for step 3's prompts (generation continues
from the last position of every row). Labels are -100 wherever the loss must not look."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from kuberlhf.data.cache import tokenize_cached
from kuberlhf.data.encode import IGNORE_INDEX, pad_id

Batch = dict[str, torch.Tensor]


def pad_right(seqs: Sequence[torch.Tensor], value: int, length: int | None = None) -> torch.Tensor:
    length = max(len(s) for s in seqs) if length is None else length
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s[:length]
    return out


def pad_left(seqs: Sequence[torch.Tensor], value: int, length: int | None = None) -> torch.Tensor:
    length = max(len(s) for s in seqs) if length is None else length
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[len(s) - min(len(s), length):]
        out[i, length - len(s):] = s
    return out


def _mask_right(seqs: Sequence[torch.Tensor], length: int | None = None) -> torch.Tensor:
    return pad_right([torch.ones(len(s), dtype=torch.long) for s in seqs], 0, length)


def sft_collate(batch: Sequence[Batch], pad_token_id: int, length: int | None = None) -> Batch:
    """input_ids / attention_mask / labels right-padded (labels -100 on padding)."""
    ids = [b["input_ids"] for b in batch]
    return {"input_ids": pad_right(ids, pad_token_id, length),
            "attention_mask": _mask_right(ids, length),
            "labels": pad_right([b["labels"] for b in batch], IGNORE_INDEX, length)}


def pair_collate(batch: Sequence[Batch], pad_token_id: int, length: int | None = None) -> Batch:
    """DeepSpeed-Chat's reward batch: input_ids / attention_mask of shape (2B, L), the B chosen sequences first,
    then the B rejected ones, right-padded to one length."""
    seqs = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
    return {"input_ids": pad_right(seqs, pad_token_id, length), "attention_mask": _mask_right(seqs, length)}


def prompt_collate(batch: Sequence[Batch], pad_token_id: int, length: int | None = None) -> Batch:
    """prompt_input_ids / prompt_attention_mask LEFT-padded."""
    seqs = [b["prompt_input_ids"] for b in batch]
    return {"prompt_input_ids": pad_left(seqs, pad_token_id, length),
            "prompt_attention_mask": pad_left([torch.ones(len(s), dtype=torch.long) for s in seqs], 0, length)}


class _Encoded(torch.utils.data.Dataset):
    kind = ""

    def __init__(self, rows: datasets.Dataset, tokenizer: Any, max_len: int, *, cache_dir: str | Path | None,
                 cache_key: str, options: dict[str, Any] | None = None, pad_to_max_len: bool = False) -> None:
        if max_len < 2:
            raise ValueError(f"max length must be >= 2 tokens, got {max_len}")
        self.max_len = max_len
        self.pad_token_id = pad_id(tokenizer)
        self.pad_to_max_len = pad_to_max_len
        self.features = tokenize_cached(rows, tokenizer, self.kind, max_len, cache_dir=cache_dir, key=cache_key,
                                        options=options).with_format("torch")

    def __len__(self) -> int:
        return len(self.features)

    def _row(self, i: int) -> Batch:
        return {k: v.to(torch.long) for k, v in self.features[int(i)].items()}

    @property
    def _length(self) -> int | None:
        return self.max_len if self.pad_to_max_len else None


class SFTDataset(_Encoded):
    """Step 1: prompt + chosen + EOS. Items input_ids / attention_mask / labels (labels -100 on padding and, when
    mask_prompt, on the prompt's human turns: ``encode.encode_sft``)."""

    kind = "sft"

    def __init__(self, rows: datasets.Dataset, tokenizer: Any, max_seq_len: int, mask_prompt: bool = False, *,
                 cache_dir: str | Path | None = None, cache_key: str = "", pad_to_max_len: bool = False) -> None:
        super().__init__(rows, tokenizer, max_seq_len, cache_dir=cache_dir, cache_key=cache_key,
                         options={"mask": "human_turns" if mask_prompt else "none"}, pad_to_max_len=pad_to_max_len)

    def __getitem__(self, i: int) -> Batch:
        r = self._row(i)
        if self.pad_to_max_len:
            return {k: v[0] for k, v in sft_collate([r], self.pad_token_id, self.max_len).items()}
        return {"input_ids": r["input_ids"], "attention_mask": torch.ones_like(r["input_ids"]), "labels": r["labels"]}

    def collate(self, batch: Sequence[Batch]) -> Batch:
        # Items may be pre-padded: strip to real tokens so the batch pads to one common length.
        real = [{k: b[k][b["attention_mask"].bool()] for k in ("input_ids", "labels")} for b in batch]
        return sft_collate(real, self.pad_token_id, self._length)


class PairDataset(_Encoded):
    """Step 2: items chosen_input_ids / chosen_attention_mask / rejected_input_ids / rejected_attention_mask;
    ``collate`` gives the (2B, L) chosen-then-rejected layout."""

    kind = "pair"

    def __init__(self, rows: datasets.Dataset, tokenizer: Any, max_seq_len: int, *,
                 cache_dir: str | Path | None = None, cache_key: str = "", pad_to_max_len: bool = False) -> None:
        super().__init__(rows, tokenizer, max_seq_len, cache_dir=cache_dir, cache_key=cache_key,
                         pad_to_max_len=pad_to_max_len)

    def __getitem__(self, i: int) -> Batch:
        r = self._row(i)
        out = {}
        for side in ("chosen", "rejected"):
            ids = r[f"{side}_input_ids"]
            if self.pad_to_max_len:
                out[f"{side}_input_ids"] = pad_right([ids], self.pad_token_id, self.max_len)[0]
                out[f"{side}_attention_mask"] = _mask_right([ids], self.max_len)[0]
            else:
                out[f"{side}_input_ids"] = ids
                out[f"{side}_attention_mask"] = torch.ones_like(ids)
        return out

    def collate(self, batch: Sequence[Batch]) -> Batch:
        # Items may be pre-padded: strip to real tokens so the batch pads to one common length.
        real = [{k: b[k][b[k.replace("input_ids", "attention_mask")].bool()] for k in
                 ("chosen_input_ids", "rejected_input_ids")} for b in batch]
        return pair_collate(real, self.pad_token_id, self._length)


class PromptDataset(_Encoded):
    """Step 3: prompts truncated from the left to max_prompt_len; ``collate`` LEFT-pads them into
    prompt_input_ids / prompt_attention_mask."""

    kind = "prompt"

    def __init__(self, rows: datasets.Dataset, tokenizer: Any, max_prompt_len: int, *,
                 cache_dir: str | Path | None = None, cache_key: str = "", pad_to_max_len: bool = False) -> None:
        super().__init__(rows, tokenizer, max_prompt_len, cache_dir=cache_dir, cache_key=cache_key,
                         pad_to_max_len=pad_to_max_len)

    def __getitem__(self, i: int) -> Batch:
        ids = self._row(i)["prompt_input_ids"]
        if self.pad_to_max_len:
            return {k: v[0] for k, v in prompt_collate([{"prompt_input_ids": ids}], self.pad_token_id,
                                                       self.max_len).items()}
        return {"prompt_input_ids": ids, "prompt_attention_mask": torch.ones_like(ids)}

    def collate(self, batch: Sequence[Batch]) -> Batch:
        real = [{"prompt_input_ids": b["prompt_input_ids"][b["prompt_attention_mask"].bool()]} for b in batch]
        return prompt_collate(real, self.pad_token_id, self._length)


class UnsupervisedDataset(_Encoded):
    """Step 3's ptx corpus: texts joined with EOS and cut into max_seq_len blocks; items input_ids /
    attention_mask / labels (labels = input_ids; -100 on padding of a short last batch)."""

    kind = "ptx"

    def __init__(self, texts: datasets.Dataset | Sequence[str], tokenizer: Any, max_seq_len: int, *,
                 cache_dir: str | Path | None = None, cache_key: str = "") -> None:
        if not isinstance(texts, datasets.Dataset):
            texts = datasets.Dataset.from_dict({"text": list(texts)})
        super().__init__(texts.select_columns(["text"]), tokenizer, max_seq_len, cache_dir=cache_dir,
                         cache_key=cache_key)

    def __getitem__(self, i: int) -> Batch:
        ids = self._row(i)["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def collate(self, batch: Sequence[Batch]) -> Batch:
        return sft_collate(batch, self.pad_token_id)
