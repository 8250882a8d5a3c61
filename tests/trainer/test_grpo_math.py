"""GRPO's numbers (kuberlhf.rlhf.grpo) against values worked out by hand here: group normalisation with ties and
single-sample groups, the k3 KL estimator, and the clipped loss with its KL term."""

from __future__ import annotations

import math

import pytest
import torch

from kuberlhf.rlhf.grpo import group_advantages, grpo_loss, k3_kl


def test_group_normalisation_hand_computed_ties_and_single_samples() -> None:
    # group (1, 2, 3): mean 2, population std sqrt(2/3) = 0.8164966; group (5, 5, 5): a tie, all 0
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    z = 1 / (math.sqrt(2 / 3) + 1e-4)
    assert adv.tolist() == pytest.approx([-z, 0.0, z, 0.0, 0.0, 0.0], abs=1e-6)
    # groups of one: nothing to compare with, every advantage 0 (not a division by zero)
    assert group_advantages(torch.tensor([0.3, -2.0, 7.0]), 1).tolist() == [0.0, 0.0, 0.0]
    # a pair: +-std / (std + eps), about +-1, whatever the offset of the rewards
    assert group_advantages(torch.tensor([10.0, 30.0]), 2).tolist() == pytest.approx([-10 / 10.0001, 10 / 10.0001])
    # groups are consecutive rows; a partial group is refused
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_batch_and_no_scaling_keep_a_noise_only_group_small() -> None:
    # group A (-5, -5, -5, -2.3): three wrong answers at the clip, one the reward model scores higher (noise);
    # group B (-5, 4, -5, 4): two right answers. Per-group scaling gives A's outlier the same +sqrt(3) as a
    # right answer of a 1-in-4 group; batch scaling divides both groups by the one spread of all 8 rewards.
    r = torch.tensor([-5.0, -5.0, -5.0, -2.3, -5.0, 4.0, -5.0, 4.0])
    group = group_advantages(r, 4)
    assert float(group[3]) == pytest.approx(math.sqrt(3), abs=1e-3) and float(group[5]) == pytest.approx(1, abs=1e-3)
    centred = [-0.675, -0.675, -0.675, 2.025, -4.5, 4.5, -4.5, 4.5]  # minus each group's mean (-4.325, -0.5)
    mean = sum(r.tolist()) / 8
    std = math.sqrt(sum((x - mean) ** 2 for x in r.tolist()) / 8)
    batch = group_advantages(r, 4, scale="batch")
    assert batch.tolist() == pytest.approx([c / (std + 1e-4) for c in centred], abs=1e-5)
    assert group_advantages(r, 4, scale="none").tolist() == pytest.approx(centred, abs=1e-6)
    # ties stay 0 under every scale; an unknown one is refused
    for scale in ("group", "batch", "none"):
        assert group_advantages(torch.tensor([2.0, 2.0, 7.0, 7.0]), 2, scale=scale).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="group, batch or none"):
        group_advantages(r, 4, scale="global")


def test_k3_estimator() -> None:
    logp = torch.log(torch.tensor([0.5, 0.5, 0.25]))
    ref = torch.log(torch.tensor([0.5, 1.0, 0.125]))
    # d = ref - logp: 0, ln 2, -ln 2 -> e^d - d - 1: 0, 1 - ln 2, 0.5 + ln 2 - 1
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.0, 1 - math.log(2), math.log(2) - 0.5], abs=1e-6)
    assert bool((k3_kl(torch.randn(100), torch.randn(100)) >= 0).all())


def test_loss_is_the_token_mean_per_answer_then_the_answer_mean() -> None:
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])  # answer 1 has two tokens, answer 2 one
    logp = torch.full((2, 3), math.log(0.5))
    adv = torch.tensor([2.0, 1.0])
    # ratio 1, no KL: -(2 + 1) / 2
    loss, kl = grpo_loss(logp, logp, logp, adv, mask, clip_range=0.2, kl_coef=0.04)
    assert float(loss) == pytest.approx(-1.5) and float(kl) == pytest.approx(0.0)
    # reference at 1/4 on every token: k3 = 0.5 + ln 2 - 1 = 0.1931472 per token
    ref = torch.full((2, 3), math.log(0.25))
    ref[0, 0] = 50.0  # off the answer: must not count
    loss, kl = grpo_loss(logp, logp, ref, adv, mask, clip_range=0.2, kl_coef=0.5)
    assert float(kl) == pytest.approx(math.log(2) - 0.5, abs=1e-6)
    assert float(loss) == pytest.approx(-1.5 + 0.5 * (math.log(2) - 0.5), abs=1e-6)


def test_ratio_clipping() -> None:
    mask = torch.tensor([[0, 1]])
    old = torch.tensor([[0.0, math.log(0.25)]])
    new = torch.tensor([[0.0, math.log(0.5)]]).requires_grad_()  # ratio 2
    # A > 0: min(2A, 1.2A) = 1.2A, and no gradient through the clipped ratio
    loss, _ = grpo_loss(new, old, new.detach(), torch.tensor([1.0]), mask, 0.2, 0.0)
    assert float(loss.detach()) == pytest.approx(-1.2)
    loss.backward()
    assert float(new.grad.abs().sum()) == 0.0
    # A < 0: min(-2, -1.2) = -2: the unclipped term, so the loss is 2
    loss, _ = grpo_loss(new.detach(), old, new.detach(), torch.tensor([-1.0]), mask, 0.2, 0.0)
    assert float(loss) == pytest.approx(2.0)
