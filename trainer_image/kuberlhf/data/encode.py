"""Turning rows into token ids, as pure functions of (texts, tokenizer, lengths). No torch, no padding: sequences
are stored unpadded (cached as such) and padded per batch by the collators in ``kuberlhf.data.tokenized``.

Prompt and answer are tokenised separately and concatenated, which is exactly what the model sees at generation
time (the prompt's tokens, then its own). The prompt gets the tokenizer's usual special tokens (a BOS for OPT and
Llama, nothing for GPT-2); every answer ends with EOS so the model learns to stop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kuberlhf.data.format import ASSISTANT, HUMAN

IGNORE_INDEX = -100


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token: set tokenizer.eos_token")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: Any) -> int:
    """The pad id; tokenizers without one (GPT-2) pad with EOS (positions are masked by attention_mask)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def _ids(tokenizer: Any, texts: Sequence[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]


def fit(prompt: list[int], answer: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Fit prompt+answer into max_len: the prompt loses tokens from the LEFT (its end, next to the answer,
    matters most) and the answer from the right, the answer keeping at least half the budget when both are long,
    so a masked-prompt loss always has answer tokens to learn from."""
    if len(prompt) + len(answer) <= max_len:
        return prompt, answer
    answer_budget = max(max_len - len(prompt), min(len(answer), max_len // 2))
    answer = answer[:answer_budget]
    keep = max_len - len(answer)
    return (prompt[len(prompt) - keep:] if keep > 0 else []), answer


def assistant_spans(prompt: str) -> list[tuple[int, int]]:
    """Character spans of the assistant's earlier answers in a multi-turn prompt: from each 'Assistant:' to the
    next 'Human:' (the prompt's final 'Assistant:' opens the answer, so its span is empty)."""
    spans = []
    start = prompt.find(ASSISTANT)
    while start >= 0:
        begin = start + len(ASSISTANT)
        end = prompt.find(HUMAN, begin)
        end = len(prompt) if end < 0 else end
        if prompt[begin:end].strip():
            spans.append((begin, end))
        start = prompt.find(ASSISTANT, end)
    return spans


def _prompt_labels(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids as labels where they spell an earlier assistant answer, -100 elsewhere (the human turns,
    the markers, BOS). A tokenizer without offsets (not a fast one) masks the whole prompt."""
    if not prompts:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [[IGNORE_INDEX] * len(ids) for ids in _ids(tokenizer, prompts, True)]
    enc = tokenizer(list(prompts), add_special_tokens=True, return_offsets_mapping=True)
    labels = []
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"], strict=True):
        spans = assistant_spans(prompt)
        labels.append([t if e > s and any(b <= s and e <= f for b, f in spans) else IGNORE_INDEX
                       for t, (s, e) in zip(ids, offsets, strict=True)])
    return labels


def encode_sft(prompts: Sequence[str], answers: Sequence[str], tokenizer: Any, max_seq_len: int,
               mask_prompt: bool) -> dict[str, list[list[int]]]:
    """input_ids = prompt + answer + EOS (fitted to max_seq_len); labels = input_ids, except, when mask_prompt,
    the prompt's positions are -100 but for the assistant's earlier answers of a multi-turn prompt (the loss is on
    everything the assistant says, as in multi-turn chat fine-tuning, and never on the human's words)."""
    eos = eos_id(tokenizer)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    p_ids = _ids(tokenizer, prompts, True)
    p_labels = _prompt_labels(tokenizer, prompts) if mask_prompt else p_ids
    for full, full_labels, a in zip(p_ids, p_labels, _ids(tokenizer, answers, False), strict=True):
        p, a = fit(full, a + [eos], max_seq_len)
        out["input_ids"].append(p + a)
        out["labels"].append(list(full_labels[len(full) - len(p):]) + a)
    return out


def encode_pairs(prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str], tokenizer: Any,
                 max_seq_len: int) -> dict[str, list[list[int]]]:
    """chosen_input_ids / rejected_input_ids = prompt + answer + EOS, each fitted to max_seq_len (the reward is
    read at the last real token, the EOS, so both sequences end the same way)."""
    eos = eos_id(tokenizer)
    out: dict[str, list[list[int]]] = {"chosen_input_ids": [], "rejected_input_ids": []}
    p_ids = _ids(tokenizer, prompts, True)
    for key, answers in (("chosen_input_ids", chosen), ("rejected_input_ids", rejected)):
        for p, a in zip(p_ids, _ids(tokenizer, answers, False), strict=True):
            p, a = fit(p, a + [eos], max_seq_len)
            out[key].append(p + a)
    return out


def encode_prompts(prompts: Sequence[str], tokenizer: Any, max_prompt_len: int) -> dict[str, list[list[int]]]:
    """prompt_input_ids truncated from the LEFT to max_prompt_len (the end, 'Assistant:', must stay)."""
    return {"prompt_input_ids": [p[max(0, len(p) - max_prompt_len):] for p in _ids(tokenizer, prompts, True)]}


def encode_blocks(texts: Sequence[str], tokenizer: Any, block_len: int) -> dict[str, list[list[int]]]:
    """The texts joined with EOS and cut into blocks of block_len tokens (the remainder is dropped unless it is
    the only block), for the ptx language-model loss."""
    eos = eos_id(tokenizer)
    stream: list[int] = []
    for ids in _ids(tokenizer, texts, False):
        stream.extend(ids + [eos])
    blocks = [stream[i:i + block_len] for i in range(0, len(stream) - block_len + 1, block_len)]
    if not blocks and stream:
        blocks = [stream]
    return {"input_ids": blocks}


ENCODERS = {
    "sft": lambda b, tok, n, o: encode_sft(b["prompt"], b["chosen"], tok, n, o.get("mask") == "human_turns"),
    "pair": lambda b, tok, n, o: encode_pairs(b["prompt"], b["chosen"], b["rejected"], tok, n),
    "prompt": lambda b, tok, n, o: encode_prompts(b["prompt"], tok, n),
    "ptx": lambda b, tok, n, o: encode_blocks(b["text"], tok, n),
}
