"""Tokenised datasets and collators against hand-computed ids (word tokenizer: see conftest.WORDS)."""

from __future__ import annotations

import datasets
import pytest
import torch

from kuberlhf.data import (
    PairDataset,
    PromptDataset,
    SFTDataset,
    UnsupervisedDataset,
    format_prompt,
    format_response,
    pair_collate,
)
from kuberlhf.data.encode import fit

M = -100


def rows(*triples: tuple[str, str, str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": [format_prompt(p) for p, _, _ in triples],
                                       "chosen": [format_response(c) for _, c, _ in triples],
                                       "rejected": [format_response(r) if r else "" for _, _, r in triples]})


def t(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.long)


def test_sft_labels_without_prompt_mask(words_tok) -> None:
    ds = SFTDataset(rows(("hi", "yes no", "")), words_tok, 16, mask_prompt=False)
    item = ds[0]
    assert item["input_ids"].tolist() == [2, 4, 3, 6, 7, 1]  # Human: hi Assistant: yes no </s>
    assert item["labels"].tolist() == [2, 4, 3, 6, 7, 1]
    assert item["attention_mask"].tolist() == [1] * 6


def test_sft_collate_masks_prompt_and_padding(words_tok) -> None:
    ds = SFTDataset(rows(("hi", "yes no", ""), ("hello", "a", "")), words_tok, 16, mask_prompt=True)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].tolist() == [[2, 4, 3, 6, 7, 1], [2, 5, 3, 8, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[M, M, M, 6, 7, 1], [M, M, M, 8, 1, M]]


def test_sft_pad_to_max_len_items(words_tok) -> None:
    ds = SFTDataset(rows(("hello", "a", "")), words_tok, 8, mask_prompt=False, pad_to_max_len=True)
    item = ds[0]
    assert item["input_ids"].tolist() == [2, 5, 3, 8, 1, 0, 0, 0]
    assert item["attention_mask"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert item["labels"].tolist() == [2, 5, 3, 8, 1, M, M, M]
    assert ds.collate([item, item])["labels"].shape == (2, 8)


def test_sft_truncation_keeps_prompt_end_and_answer(words_tok) -> None:
    # prompt [2,4,3] + answer [6,7,1] in 4 tokens: the answer keeps half the budget, the prompt its end.
    ds = SFTDataset(rows(("hi", "yes no", "")), words_tok, 4, mask_prompt=True)
    assert ds[0]["input_ids"].tolist() == [4, 3, 6, 7]
    assert ds[0]["labels"].tolist() == [M, M, 6, 7]
    assert fit([1, 2], [3, 4, 5], 10) == ([1, 2], [3, 4, 5])
    assert fit([1, 2, 3, 4, 5, 6], [7, 8], 6) == ([3, 4, 5, 6], [7, 8])  # short answer kept whole
    assert fit([1], [2, 3, 4, 5, 6, 7], 4) == ([1], [2, 3, 4])  # short prompt kept whole


def test_sft_mask_keeps_the_assistants_earlier_turns(words_tok) -> None:
    """A multi-turn prompt: the loss covers every assistant turn (the earlier answers and the last), never the
    human's words or the markers; truncation from the left keeps the labels aligned."""
    ds = SFTDataset(rows(("Human: hi Assistant: yes no Human: hello Assistant:", "a b", "")), words_tok, 16,
                    mask_prompt=True)
    assert ds[0]["input_ids"].tolist() == [2, 4, 3, 6, 7, 2, 5, 3, 8, 9, 1]
    assert ds[0]["labels"].tolist() == [M, M, M, 6, 7, M, M, M, 8, 9, 1]
    cut = SFTDataset(rows(("Human: hi Assistant: yes no Human: hello Assistant:", "a b", "")), words_tok, 8,
                     mask_prompt=True)
    assert cut[0]["input_ids"].tolist() == [6, 7, 2, 5, 3, 8, 9, 1]
    assert cut[0]["labels"].tolist() == [6, 7, M, M, M, 8, 9, 1]


def test_pair_items_and_collate_layout(words_tok) -> None:
    ds = PairDataset(rows(("hi", "yes", "no"), ("hello", "a b c", "d")), words_tok, 16)
    assert ds[0]["chosen_input_ids"].tolist() == [2, 4, 3, 6, 1]
    assert ds[0]["rejected_input_ids"].tolist() == [2, 4, 3, 7, 1]
    assert ds[0]["chosen_attention_mask"].tolist() == [1] * 5
    batch = ds.collate([ds[0], ds[1]])
    # (2B, L): chosen of row 0, chosen of row 1, then rejected of row 0, rejected of row 1.
    assert batch["input_ids"].tolist() == [[2, 4, 3, 6, 1, 0, 0],
                                           [2, 5, 3, 8, 9, 10, 1],
                                           [2, 4, 3, 7, 1, 0, 0],
                                           [2, 5, 3, 11, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7,
                                                [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0]]
    padded = PairDataset(rows(("hi", "yes", "no")), words_tok, 8, pad_to_max_len=True)
    assert padded[0]["chosen_input_ids"].tolist() == [2, 4, 3, 6, 1, 0, 0, 0]
    assert padded.collate([padded[0]])["input_ids"].shape == (2, 8)


def test_pair_collate_function() -> None:
    batch = pair_collate([{"chosen_input_ids": t(5, 6), "rejected_input_ids": t(7)},
                          {"chosen_input_ids": t(8), "rejected_input_ids": t(9, 9, 9)}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 0], [8, 0, 0], [7, 0, 0], [9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]]


def test_prompts_left_padded_and_left_truncated(words_tok) -> None:
    ds = PromptDataset(rows(("hi", "x", ""), ("a b c d", "x", "")), words_tok, 4)
    assert ds[0]["prompt_input_ids"].tolist() == [2, 4, 3]
    # [2, 8, 9, 10, 11, 3] keeps its last 4 tokens: the end ("Assistant:") is what generation continues from.
    assert ds[1]["prompt_input_ids"].tolist() == [9, 10, 11, 3]
    batch = ds.collate([ds[0], ds[1]])
    assert batch["prompt_input_ids"].tolist() == [[0, 2, 4, 3], [9, 10, 11, 3]]
    assert batch["prompt_attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    fixed = PromptDataset(rows(("hi", "x", "")), words_tok, 5, pad_to_max_len=True)
    assert fixed[0]["prompt_input_ids"].tolist() == [0, 0, 2, 4, 3]
    assert fixed[0]["prompt_attention_mask"].tolist() == [0, 0, 1, 1, 1]
    assert fixed.collate([fixed[0]])["prompt_input_ids"].tolist() == [[0, 0, 2, 4, 3]]


def test_unsupervised_blocks(words_tok) -> None:
    ds = UnsupervisedDataset(["a b c", "d e"], words_tok, 3)
    # stream a b c </s> d e </s> = [8, 9, 10, 1, 11, 12, 1] -> two full blocks, the remainder dropped
    assert len(ds) == 2
    assert ds[0]["input_ids"].tolist() == [8, 9, 10]
    assert ds[1]["input_ids"].tolist() == [1, 11, 12]
    assert ds[1]["labels"].tolist() == [1, 11, 12]
    assert ds.collate([ds[0], ds[1]])["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    short = UnsupervisedDataset(["a"], words_tok, 8)
    assert short[0]["input_ids"].tolist() == [8, 1]


def test_real_tokenizer_round_trip(repo_root) -> None:
    """With the shipped tiny BPE: the unmasked labels decode to exactly the answer plus EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repo_root / "trainer_image" / "kuberlhf" / "assets" / "tiny-opt")
    r = rows(("What is the capital of France?", "Sure! The capital of France is Paris.", ""))
    item = SFTDataset(r, tok, 128, mask_prompt=True)[0]
    answer = item["input_ids"][item["labels"] != M]
    assert tok.decode(answer) == " Sure! The capital of France is Paris.</s>"
    assert tok.decode(item["input_ids"]).startswith(" Human: What is the capital of France? Assistant:")


def test_max_len_validation(words_tok) -> None:
    with pytest.raises(ValueError, match="max length"):
        SFTDataset(rows(("hi", "yes", "")), words_tok, 1)
