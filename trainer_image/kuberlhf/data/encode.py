"""Turning rows into token ids, as pure functions of (texts, tokenizer, lengths). No torch, no padding: sequences
are stored unpadded (cached as such) and padded per batch by the collators in ``kuberlhf.data.tokenized``.

Prompt and answer are tokenised separately and concatenated, which is exactly what the model sees at generation
time (the prompt's tokens, then its own). The prompt gets the tokenizer's usual special tokens (a BOS for OPT and
Llama, nothing for GPT-2); every answer ends with EOS so the model learns to stop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def encode_sft(prompts: Sequence[str], answers: Sequence[str], tokenizer: Any, max_seq_len: int,
               mask_prompt: bool) -> dict[str, list[list[int]]]:
    """input_ids = prompt + answer + EOS (fitted to max_seq_len); labels = input_ids with the prompt positions
    set to -100 when mask_prompt."""
    eos = eos_id(tokenizer)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for p, a in zip(_ids(tokenizer, prompts, True), _ids(tokenizer, answers, False), strict=True):
        p, a = fit(p, a + [eos], max_seq_len)
        out["input_ids"].append(p + a)
        out["labels"].append(([IGNORE_INDEX] * len(p) if mask_prompt else list(p)) + a)
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
    "sft": lambda b, tok, n, o: encode_sft(b["prompt"], b["chosen"], tok, n, bool(o.get("mask_prompt"))),
    "pair": lambda b, tok, n, o: encode_pairs(b["prompt"], b["chosen"], b["rejected"], tok, n),
    "prompt": lambda b, tok, n, o: encode_prompts(b["prompt"], tok, n),
    "ptx": lambda b, tok, n, o: encode_blocks(b["text"], tok, n),
}
