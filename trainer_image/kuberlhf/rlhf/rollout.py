"""Rollouts decoupled from PPO updates (``spec.stages.ppo.rolloutBatchSize``, OpenRLHF's rollout batch): the
prompts of ``rolloutBatchSize / generationBatchSize`` consecutive experience batches are decoded and scored
together, so a decoding step carries that many more sequences, and the rollout is then split back into
experience batches of ``generationBatchSize``, one PPO update each, in loader order. With the two sizes equal
this is the coupled loop exactly (tests/trainer/test_rollout.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator

import torch

Batch = dict[str, torch.Tensor]


def merge_prompt_batches(batches: list[Batch], pad_id: int) -> Batch:
    """Left-padded prompt batches (``prompt_input_ids``, ``prompt_attention_mask``) as one, re-padded on the left
    to the longest: a left-padded row's real tokens and positions do not move relative to its end."""
    if len(batches) == 1:
        return batches[0]
    width = max(b["prompt_input_ids"].shape[1] for b in batches)
    ids, masks = [], []
    for b in batches:
        extra = width - b["prompt_input_ids"].shape[1]
        ids.append(torch.nn.functional.pad(b["prompt_input_ids"], (extra, 0), value=pad_id))
        masks.append(torch.nn.functional.pad(b["prompt_attention_mask"], (extra, 0), value=0))
    return {"prompt_input_ids": torch.cat(ids), "prompt_attention_mask": torch.cat(masks)}


def rollouts(
    generate_experience: Callable[[Batch], Batch], batches: Iterable[Batch], per_rollout: int, pad_id: int
) -> Iterator[tuple[Batch, float]]:
    """``(experience batch, its share of the rollout's generate_experience seconds)`` for every prompt batch of
    ``batches``, generating ``per_rollout`` batches at a time."""
    it = iter(batches)
    while group := list(itertools.islice(it, per_rollout)):
        t0 = time.time()
        exp = generate_experience(merge_prompt_batches(group, pad_id))
        seconds = (time.time() - t0) / len(group)
        sizes = [b["prompt_input_ids"].shape[0] for b in group]
        if len(group) == 1:
            yield exp, seconds
            continue
        start = 0
        for size in sizes:
            yield {k: v[start : start + size] for k, v in exp.items()}, seconds
            start += size
