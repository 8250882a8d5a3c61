"""PPO / reward / SFT math against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from kuberlhf.rlhf import ppo_math as pm


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_gae_and_returns_by_hand():
    # mask: position 0 is the prompt, 1 and 2 are actions, 3 is padding after the answer.
    rewards, values, mask = t([[0.0, 0.5, 1.0, 0.0]]), t([[9.0, 0.2, 0.4, 7.0]]), t([[0, 1, 1, 0]])
    adv, ret = pm.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=2: next is not an action -> delta = 1.0 - 0.4 = 0.6
    # t=1: delta = 0.5 + 0.9*0.4 - 0.2 = 0.66; adv = 0.66 + 0.9*0.5*0.6 = 0.93
    assert torch.allclose(adv, t([[0.0, 0.93, 0.6, 0.0]]))
    assert torch.allclose(ret, t([[0.0, 1.13, 1.0, 0.0]]))


def test_gae_gamma_one_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask = t([[1.0, 2.0, 3.0]]), t([[0.5, 0.5, 0.5]]), t([[1, 1, 1]])
    adv, ret = pm.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, t([[6.0, 5.0, 3.0]]))
    assert torch.allclose(adv, t([[5.5, 4.5, 2.5]]))


def test_kl_shaped_rewards_put_clipped_score_on_last_answer_token():
    logp = t([[-1.0, -2.0, -3.0, -4.0], [0.0, 0.0, 0.0, 0.0]])
    ref = t([[-1.5, -1.0, -3.0, -9.0], [0.0, 0.0, 0.0, 0.0]])
    mask = t([[0, 1, 1, 0], [1, 1, 1, 1]])
    rewards = pm.kl_shaped_rewards(logp, ref, t([7.0, -7.0]), mask, kl_coef=0.1, reward_clip=5.0)
    # row 0: pos1 = -0.1*(-2 - -1) = 0.1; pos2 = 0 + clip(7) = 5; prompt and padding stay 0
    # row 1: no KL; clip(-7) = -5 on the last action (pos 3)
    assert torch.allclose(rewards, t([[0.0, 0.1, 5.0, 0.0], [0.0, 0.0, 0.0, -5.0]]))


def test_policy_loss_clips_and_masks():
    logp = t([[math.log(1.5), math.log(0.5), 0.0]])
    old = t([[0.0, 0.0, 0.0]])
    adv = t([[1.0, -1.0, 2.0]])
    # pos0: ratio 1.5 -> max(-1.5, -1.2) = -1.2; pos1: ratio 0.5, A=-1 -> max(0.5, 0.8) = 0.8; pos2 masked
    loss = pm.policy_loss(logp, old, adv, t([[1, 1, 0]]), clip_range=0.2)
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)


def test_value_loss_clips_and_masks():
    # pos0: max((1-0)^2, (0.7-0)^2) = 1; pos1: 1 -> 0.5 * mean = 0.5
    assert pm.value_loss(t([[1.0, 0.0]]), t([[0.5, 0.0]]), t([[0.0, 1.0]]), t([[1, 1]]), 0.2).item() == \
        pytest.approx(0.5)
    # v=0, old=0.5 -> clipped 0.3; R=0.6: max(0.36, 0.09) = 0.36 -> 0.18; the masked position is ignored
    assert pm.value_loss(t([[0.0, 9.0]]), t([[0.5, 0.0]]), t([[0.6, 0.0]]), t([[1, 0]]), 0.2).item() == \
        pytest.approx(0.18)


def test_end_score_index_is_last_non_pad_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert pm.end_score_index(mask).tolist() == [2, 4, 0]
    values = t([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    assert pm.gather_end_scores(values, mask).tolist() == [2.0, 9.0, 10.0]


def test_pairwise_loss():
    # (-log sigmoid(2) - log sigmoid(0)) / 2 = (log(1+e^-2) + log 2) / 2
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert pm.pairwise_loss(t([2.0, 0.0]), t([0.0, 0.0])).item() == pytest.approx(expected, rel=1e-6)


def test_sft_labels_mask_padding_and_optionally_prompt():
    ids, mask = torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 1, 1, 0]])
    assert pm.sft_labels(ids, mask).tolist() == [[5, 6, 7, -100]]
    assert pm.sft_labels(ids, mask, torch.tensor([[1, 0, 0, 0]])).tolist() == [[-100, 6, 7, -100]]


def test_causal_lm_loss_uniform_logits_is_log_vocab_and_ignores_masked():
    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([[-100, 2, 3, -100]])
    assert pm.causal_lm_loss(logits, labels).item() == pytest.approx(math.log(4))
    # a confident correct prediction at the only counted position gives ~0
    logits2 = torch.zeros(1, 3, 4)
    logits2[0, 0, 2] = 50.0
    assert pm.causal_lm_loss(logits2, torch.tensor([[-100, 2, -100]])).item() == pytest.approx(0.0, abs=1e-6)


def test_token_logprobs_and_sequence_kl():
    logits = torch.zeros(1, 3, 2)
    lp = pm.token_logprobs(logits, torch.tensor([[0, 1, 0]]))
    assert torch.allclose(lp, t([[math.log(0.5), math.log(0.5)]]))
    # sum over actions of (logp - ref): (-1 - -2) + 0 = 1 for row 0, 3 for row 1 -> mean 2
    kl = pm.sequence_kl(t([[-1.0, 0.0], [1.0, 2.0]]), t([[-2.0, 0.0], [0.0, 0.0]]), t([[1, 1], [1, 0]]))
    assert kl.item() == pytest.approx(1.0)


def test_ptx_mixing():
    assert pm.mixed_actor_loss(t(0.5), t(2.0), 0.25).item() == pytest.approx(1.0)
    assert pm.mixed_actor_loss(t(0.5), None, 27.8).item() == pytest.approx(0.5)
    assert pm.ptx_loss(t(2.0), 27.8).item() == pytest.approx(55.6)


def test_ema_update():
    ema = t([1.0, 2.0])
    pm.ema_update_(ema, t([3.0, 4.0]), beta=0.9)
    assert torch.allclose(ema, t([1.2, 2.2]))


def test_adaptive_kl_controller():
    ctl = pm.AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    # KL 12 -> error clipped to +0.2 -> x(1 + 0.2*100/10000)
    assert ctl.update(12.0, 100) == pytest.approx(0.1002)
    ctl = pm.AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    assert ctl.update(3.0, 100) == pytest.approx(0.0998)
    assert pm.FixedKLController(0.3).update(100.0, 5) == 0.3
