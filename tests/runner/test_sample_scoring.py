"""The end-of-run samples score answers the way step 2 trained the reward model: prompt and answer encoded
apart with EOS appended (``data.encode.encode_pairs``), the score read at that EOS. Scoring the bare text read
it at the answer's last word instead, a position the reward model was never trained on."""

from __future__ import annotations

import torch

from kuberlhf.data.encode import encode_pairs
from kuberlhf.data.format import format_prompt, format_response
from kuberlhf.models import RewardModel, load_tokenizer
from kuberlhf.models.tiny import TINY_MODEL_NAME
from kuberlhf.runner.samples import reward_scores


def test_reward_scores_use_the_training_encoding(tmp_path):
    tok = load_tokenizer(TINY_MODEL_NAME)
    rm = RewardModel.from_causal_lm_source(TINY_MODEL_NAME, seed=5)
    rm.save_pretrained(tmp_path, tokenizer=tok)
    rm = RewardModel.from_pretrained(tmp_path).eval()
    prompts, answers = ["Name a color.", "What is the capital of Japan?"], ["Red.", "Sure! It is Tokyo."]
    got = reward_scores(tmp_path, prompts, answers)
    with torch.no_grad():
        for p, a, score in zip(prompts, answers, got, strict=True):
            ids = encode_pairs([format_prompt(p)], [format_response(a)], [format_response(a)], tok, 64)
            seq = torch.tensor([ids["chosen_input_ids"][0]])
            assert seq[0, -1] == tok.eos_token_id
            trained = float(rm.end_scores(seq, torch.ones_like(seq))[0])
            bare = tok(format_prompt(p) + format_response(a), return_tensors="pt")
            untrained = float(rm.end_scores(bare.input_ids, bare.attention_mask)[0])
            assert abs(score - trained) < 1e-5
            assert abs(score - untrained) > 1e-4  # the EOS position, not the last word's
