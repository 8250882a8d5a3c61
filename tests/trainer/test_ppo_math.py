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


def gae_by_recursion(rewards, values, mask, gamma, lam):
    """The textbook backward loop, as the reference of the closed form."""
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    n = rewards.shape[1]
    for i in reversed(range(n)):
        next_mask = mask[:, i + 1] if i + 1 < n else torch.zeros_like(last)
        next_value = values[:, i + 1] * next_mask if i + 1 < n else torch.zeros_like(last)
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        last = (delta + gamma * lam * next_mask * last) * mask[:, i]
        adv[:, i] = last
    return adv, (adv + values) * mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (0.99, 0.0), (0.0, 1.0)])
def test_gae_closed_form_equals_the_recursion(gamma, lam):
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    mask = torch.zeros(6, 40)
    mask[0, 10:30] = 1  # prompt, answer, padding
    mask[1, 5:] = 1  # answer to the end
    mask[2, 1:4] = 1
    mask[2, 7:9] = 1  # two runs: the recursion restarts after a gap
    mask[4, 39] = 1  # a single action at the end; row 3: no actions at all
    mask[5] = (torch.rand(40, generator=g) > 0.5).float()
    adv, ret = pm.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_by_recursion(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-5) and torch.allclose(ret, ref_ret, atol=1e-5)
    assert torch.equal(adv[3], torch.zeros(40))


def test_answer_logprobs_layout_by_hand():
    # prompt of 2 tokens, 2 generated: step 0 scores token 2 (shifted position 1), step 1 token 3 (position 2)
    seq = torch.tensor([[5, 6, 1, 0]])
    step_logits = torch.log(t([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]))  # already normalised
    out = pm.answer_logprobs(step_logits, seq, prompt_len=2)
    assert out.shape == (1, 3)
    assert torch.allclose(out, t([[0.0, math.log(0.25), math.log(0.1)]]))


def test_generation_logits_give_the_forward_pass_logprobs():
    """The identity behind reusing generation: the raw logits of KV-cache sampling (``output_logits``) give the
    same log-probs of the sampled answer as a full forward over the left-padded sequence."""
    from kuberlhf.models.loading import load_tokenizer
    from kuberlhf.models.tiny import TINY_MODEL_NAME, tiny_causal_lm
    from kuberlhf.rlhf.trainer import answer_mask, position_ids

    tok = load_tokenizer(TINY_MODEL_NAME, padding_side="left")
    model = tiny_causal_lm(11).eval()
    enc = tok([" Human: name a color Assistant:", " Human: hi Assistant:"], return_tensors="pt", padding=True)
    p_len = enc.input_ids.shape[1]
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=True, top_k=0, temperature=0.7,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             return_dict_in_generate=True, output_logits=True)
        seq = out.sequences
        mask = torch.cat([enc.attention_mask, answer_mask(seq[:, p_len:], tok.eos_token_id, tok.pad_token_id)], 1)
        seq = torch.where(mask.bool(), seq, torch.full_like(seq, tok.pad_token_id))
        forward = pm.token_logprobs(model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)
                                          ).logits, seq)
    reused = pm.answer_logprobs(torch.stack(out.logits, dim=1), seq, p_len)
    actions = mask[:, 1:].clone()
    actions[:, : p_len - 1] = 0
    assert int(actions.sum()) >= 4
    assert torch.allclose(reused * actions, forward * actions, atol=1e-5)


def deepspeed_chat_actor_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """DeepSpeed-Chat's ``DeepSpeedPPOTrainer.actor_loss_fn`` (ppo_trainer.py), written out as the reference."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.sum(torch.max(pg_loss1, pg_loss2) * mask) / mask.sum()


def test_policy_loss_masks_before_exponentiating():
    # a masked position (prompt / padding) with a log-ratio of 1000: exp would be inf and inf * 0 = nan
    logp = t([[math.log(1.5), 1000.0, math.log(0.5)]]).requires_grad_(True)
    old, adv, mask = t([[0.0, 0.0, 0.0]]), t([[1.0, 3.0, -1.0]]), t([[1, 0, 1]])
    loss = pm.policy_loss(logp, old, adv, mask, clip_range=0.2)
    loss.backward()
    # pos0: max(-1.5, -1.2) = -1.2; pos2: max(0.5, 0.8) = 0.8; mean over the two actions = -0.2
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    # the unclipped side of pos 0 is clipped away (ratio 1.5 > 1.2); pos 2's clipped branch is constant -> 0
    assert torch.equal(logp.grad, t([[0.0, 0.0, 0.0]]))
    # a non-finite log-prob at a masked position is cut off too (where, not a product)
    inf_logp = t([[0.1, -math.inf, 0.05]]).requires_grad_(True)
    loss = pm.policy_loss(inf_logp, old, adv, mask, clip_range=0.2)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(inf_logp.grad).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_equals_deepspeed_chat_on_finite_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logp, old, adv = (torch.randn(4, 12, generator=g) * 0.3 for _ in range(3))
    mask = (torch.rand(4, 12, generator=g) > 0.3).float()
    ours = pm.policy_loss(logp, old, adv, mask, 0.2)
    assert ours.item() == pytest.approx(deepspeed_chat_actor_loss(logp, old, adv, mask, 0.2).item(), rel=1e-6)


def test_ema_beta_warmup_schedule():
    # without warm-up: DeepSpeed-Chat's constant decay
    assert pm.ema_beta(0.992, 1, warmup=False) == 0.992
    # with warm-up: (1 + t) / (10 + t) until it reaches beta, then beta
    assert pm.ema_beta(0.992, 1, warmup=True) == pytest.approx(2 / 11)
    assert pm.ema_beta(0.992, 80, warmup=True) == pytest.approx(81 / 90)
    assert pm.ema_beta(0.992, 1115, warmup=True) == pytest.approx(0.992, abs=1e-6)
    assert pm.ema_beta(0.992, 5000, warmup=True) == 0.992
    assert pm.ema_beta(0.5, 1, warmup=True) == pytest.approx(2 / 11)
    assert pm.ema_beta(0.5, 20, warmup=True) == 0.5


def test_ema_with_warmup_tracks_a_moving_target_on_a_short_run():
    """An actor moving at constant speed for 160 optimizer steps (the tiny recipe's run): with DeepSpeed-Chat's
    beta 0.992 held constant the EMA ends barely 44% of the way there; with the warm-up it trails by about a tenth
    of the run."""
    const, warm = t([0.0]), t([0.0])
    steps = 160
    for step in range(1, steps + 1):
        target = t([step / steps])
        pm.ema_update_(const, target, pm.ema_beta(0.992, step, warmup=False))
        pm.ema_update_(warm, target, pm.ema_beta(0.992, step, warmup=True))
    assert const.item() < 0.5
    assert 0.85 < warm.item() < 0.95


def test_whiten_normalises_over_the_actions_only():
    x = t([[100.0, 1.0, 2.0, 3.0], [7.0, 4.0, 5.0, -50.0]])
    mask = t([[0, 1, 1, 1], [0, 1, 1, 0]])
    out = pm.whiten(x, mask)
    vals = out[mask.bool()]
    # actions 1, 2, 3, 4, 5: mean 3, variance 2
    assert torch.allclose(vals, (t([1.0, 2.0, 3.0, 4.0, 5.0]) - 3) / math.sqrt(2), atol=1e-6)
    assert torch.equal(out[~mask.bool()], t([0.0, 0.0, 0.0]))
    assert torch.allclose(pm.whiten(x, mask, shift_mean=False)[mask.bool()], vals + 3, atol=1e-6)


def test_answers_of_at_most_one_token_drop_out_of_every_loss_as_deepspeed_chat_drops_them():
    """DeepSpeed-Chat's ``_generate_sequence`` drops answers of <= 1 token (EOS alone); zeroing their actions
    gives exactly the losses of the batch without them."""
    mask = t([[0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    kept = pm.drop_short_answers(mask)
    assert torch.equal(kept, t([[0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]))
    torch.manual_seed(0)
    logp, old, ref, values = (torch.randn(4, 4) for _ in range(4))
    scores = t([1.0, 9.0, -2.0, 0.0])  # the one-token answer has the best score: it must not count

    def losses(rows, m):
        r = pm.kl_shaped_rewards(old[rows], ref[rows], scores[rows], m, kl_coef=0.1, reward_clip=5.0)
        adv, ret = pm.gae(r, values[rows], m, gamma=1.0, lam=0.95)
        return (
            pm.policy_loss(logp[rows], old[rows], adv, m, 0.2),
            pm.value_loss(logp[rows], values[rows], ret, m, 0.2),
        )

    dropped = losses([0, 1, 2, 3], kept)
    without = losses([0, 2], mask[[0, 2]])
    assert all(torch.allclose(a, b) for a, b in zip(dropped, without, strict=True))
    assert not torch.allclose(losses([0, 1, 2, 3], mask)[0], without[0])
