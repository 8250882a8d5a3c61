"""The numbers of DeepSpeed-Chat's PPO step as pure tensor functions (no models, no DeepSpeed), so each one is
unit-tested against hand-computed values.

Shapes: ``B`` sequences, ``T`` positions of the *shifted* sequence (position ``t`` scores token ``t+1``).
``mask[b, t] == 1`` marks positions whose next token is a generated answer token (an "action"); it is zero on
the prompt and on padding after the answer. All losses are masked means over actions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero entry of each row (0 for an all-zero row). Works for left- and right-padding."""
    t = mask.shape[-1]
    positions = torch.arange(t, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=-1).values


def end_score_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Where the reward model reads its score: the last non-pad token of each sequence."""
    return last_true_index(attention_mask)


def gather_end_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values (B, L) -> the score at the last non-pad token (B,)."""
    idx = end_score_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of the reward model: mean of ``-log sigmoid(r_chosen - r_rejected)``."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def sft_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor | None = None,
               ignore_index: int = -100) -> torch.Tensor:
    """Labels of the SFT loss: the inputs, with padding (and, when ``prompt_mask`` is given, the prompt tokens)
    set to ``ignore_index`` so they do not count."""
    labels = input_ids.clone()
    labels[attention_mask == 0] = ignore_index
    if prompt_mask is not None:
        labels[prompt_mask.bool()] = ignore_index
    return labels


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at ``t`` predict ``labels[t+1]``; ignored labels do not count."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=ignore_index)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[t+1] | logits[t]) of each position: (B, L, V), (B, L) -> (B, L-1)."""
    logp = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def answer_logprobs(step_logits: torch.Tensor, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The actor's log-probs of its sampled answer from the raw per-step logits of generation, laid out like
    :func:`token_logprobs` of the full sequence: (B, A, V), (B, P + A) -> (B, P + A - 1), zero on the prompt.

    Generation step ``j`` scores token ``P + j`` (position ``P - 1 + j`` of the shifted sequence). With the
    KV cache those logits are a forward pass over the same prefix, so this equals ``token_logprobs`` of a
    full forward at every answer position up to float rounding; the raw logits are the policy's (no
    temperature or top-p), as in a forward pass."""
    b, a = step_logits.shape[:2]
    out = torch.zeros(b, prompt_len + a - 1, dtype=torch.float32, device=step_logits.device)
    logp = F.log_softmax(step_logits.float(), dim=-1)
    out[:, prompt_len - 1:] = logp.gather(-1, seq[:, prompt_len:prompt_len + a].unsqueeze(-1)).squeeze(-1)
    return out


def drop_short_answers(action_mask: torch.Tensor, min_tokens: int = 2) -> torch.Tensor:
    """``action_mask`` with the rows of answers shorter than ``min_tokens`` actions (EOS counted) zeroed, so they
    carry no reward, advantage, policy or value loss: DeepSpeed-Chat's ``_generate_sequence`` drops every
    answer of at most one token ("if the answer is shorter than 1 token, drop it"). An answer that is only EOS is
    the prompt read as its own answer: a reward model never trained on it can score it above every real answer
    (bench/RESULTS.md §7: +7.7 on copy, where right answers score +3.9), and PPO learns to stop at once."""
    keep = action_mask.sum(dim=1, keepdim=True) >= min_tokens
    return action_mask * keep.to(action_mask.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_shaped_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float, reward_clip: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * (logp - ref_logp)`` on every action, plus the reward model's score
    clipped to ``±reward_clip`` added at the LAST action of each sequence. Zero off the actions."""
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = last_true_index(mask)
    clipped = scores.to(rewards.dtype).clamp(-reward_clip, reward_clip)
    has_action = mask.sum(dim=1) > 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += torch.where(has_action, clipped, torch.zeros_like(clipped))
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the actions -> (advantages, returns), both zero off the actions.

    The value after the last action is 0 (the episode ends there), so the recursion restarts at each
    sequence's end regardless of what the critic says about padding. The backward recursion
    ``A_t = m_t (delta_t + gamma lam m_{t+1} A_{t+1})`` is evaluated in closed form (no Python loop over
    positions): ``A_t = m_t sum_{k>=t} (gamma lam)^(k-t) delta_k`` over the unbroken run of actions after
    ``t`` (binary mask)."""
    mask = mask.to(values.dtype)
    zero = torch.zeros_like(mask[:, :1])
    next_mask = torch.cat([mask[:, 1:], zero], dim=1)
    next_values = torch.cat([values[:, 1:], zero], dim=1) * next_mask
    delta = rewards + gamma * next_values - values
    t_len = rewards.shape[1]
    pos = torch.arange(t_len, device=values.device)
    lag = pos.unsqueeze(0) - pos.unsqueeze(1)  # [t, k] = k - t
    discount = torch.where(lag >= 0, (gamma * lam) ** lag.clamp(min=0).to(values.dtype), 0.0)
    # k belongs to t's run iff no non-action lies in (t, k]: the count of gaps so far is the same at t and k
    gaps = torch.cumsum(1 - mask, dim=1)
    same_run = gaps.unsqueeze(2) == gaps.unsqueeze(1)  # [b, t, k]
    advantages = torch.einsum("btk,bk->bt", discount * same_run, delta) * mask
    returns = (advantages + values) * mask
    return advantages.detach(), returns.detach()


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``x`` normalised to unit variance (and zero mean with ``shift_mean``) over the masked positions of the
    whole batch, zero elsewhere: the advantage normalisation of PPO implementations (OpenAI baselines, TRL's
    ``whiten``, OpenRLHF's advantage normalisation; "The N Implementation Details of RLHF with PPO", Huang et
    al. 2024), which keeps the policy step the same size whatever the reward model's scale. DeepSpeed-Chat does
    not normalise."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate, masked mean: ``max(-A r, -A clip(r, 1-c, 1+c))`` with ``r = exp(logp - old)``.

    The log-ratio is masked BEFORE it is exponentiated (DeepSpeed-Chat's ``actor_loss_fn`` order): a masked
    position (prompt, padding) whose log-ratio is huge would otherwise give ``exp = inf`` and ``inf * 0 = nan``
    in the loss and every gradient. ``where`` rather than a product, so even a non-finite log-prob there is cut
    off (its gradient is exactly zero)."""
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return masked_mean(torch.max(unclipped, clipped), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> torch.Tensor:
    """Clipped value loss, masked mean: ``0.5 * max((v - R)^2, (clip(v, old ± c) - R)^2)``."""
    clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of the summed per-token log-ratio to the reference (the KL estimate reported)."""
    mask = mask.to(logprobs.dtype)
    return ((logprobs - ref_logprobs) * mask).sum(dim=1).mean()


def ptx_loss(lm_loss: torch.Tensor, ptx_coef: float) -> torch.Tensor:
    """The pre-training (ptx) term added to the actor's objective: ``ptx_coef * lm_loss``."""
    return ptx_coef * lm_loss


def mixed_actor_loss(actor_loss: torch.Tensor, lm_loss: torch.Tensor | None, ptx_coef: float) -> torch.Tensor:
    """Actor objective with mixed training: the PPO loss plus ``ptx_coef`` times the next-token loss."""
    if lm_loss is None or ptx_coef == 0:
        return actor_loss
    return actor_loss + ptx_loss(lm_loss, ptx_coef)


def ema_beta(beta: float, step: int, warmup: bool) -> float:
    """The EMA decay used at optimizer step ``step`` (1-based). Without warm-up: ``beta`` (DeepSpeed-Chat's
    constant). With warm-up: ``min(beta, (1 + step) / (10 + step))``, the ``num_updates`` schedule of
    TensorFlow's ``tf.train.ExponentialMovingAverage``: early on the average follows the actor closely, so a run
    shorter than the horizon ``1 / (1 - beta)`` is not an average dominated by the SFT start; from
    ``step = (10 beta - 1) / (1 - beta)`` on (1115 steps at 0.992) it is ``beta`` again."""
    if not warmup:
        return beta
    return min(beta, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update_(ema: torch.Tensor, new: torch.Tensor, beta: float) -> torch.Tensor:
    """In place: ``ema = beta * ema + (1 - beta) * new``."""
    ema.mul_(beta).add_(new.to(ema.dtype), alpha=1.0 - beta)
    return ema


@dataclass
class FixedKLController:
    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


@dataclass
class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: move ``value`` so the KL approaches ``target``; the error is
    clipped to ±20% and scaled by ``n_steps / horizon``."""

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> float:
        if not math.isfinite(current_kl):
            return self.value
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
