"""Group-relative policy optimisation (Shao et al. 2024, "DeepSeekMath", section 4.1), with outcome rewards:

- every prompt is answered ``groupSize`` times (sampled from the actor as PPO samples its experience);
- each answer's reward (the step-2 reward model's score clipped to ``±rewardClip``, or a reward function's value:
  :mod:`kuberlhf.rlhf.code_reward`) becomes its advantage after normalising within its group,
  ``A_i = (r_i - mean(r)) / (std(r) + eps)``, the same for each of its tokens (``scaleRewards``: the group's
  ``std``, DeepSeekMath's; or the rank's batch's; or none); ``std`` is the population standard deviation, so a
  group whose answers all got the same reward (ties, and a group of one) has advantage 0 for every answer rather
  than a division by zero; there is no critic;
- the loss per token is PPO's clipped surrogate of the ratio ``pi / pi_old`` plus ``klCoef`` times the k3
  estimator of KL(pi || pi_ref) (Schulman, "Approximating KL divergence", 2020):
  ``exp(ref - logp) - (ref - logp) - 1``, unbiased and never negative; averaged over each answer's tokens, then over
  answers (DeepSeekMath's ``1/G sum_i 1/|o_i| sum_t``);
- the EMA of the actor and mixed training (ptx) work as in PPO: this trainer *is* the PPO trainer's generation,
  log-prob, ptx and EMA code (:class:`~kuberlhf.rlhf.trainer.PPOTrainer`) with the group step instead of GAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kuberlhf.contract.spec import GRPOStageSpec, spec_default
from kuberlhf.rlhf.engine import RLHFEngine
from kuberlhf.rlhf.trainer import PPOTrainer

GROUP_EPS = 1e-4  # added to the group's standard deviation (TRL's GRPO uses the same)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = GROUP_EPS, scale: str = "group"
                     ) -> torch.Tensor:
    """Rewards (N,) of N / group_size consecutive groups -> advantages (N,): each reward minus its group's mean,
    over a population standard deviation plus ``eps``: the group's (``scale="group"``, DeepSeekMath), all N
    rewards' (``"batch"``), or not divided (``"none"``, Dr. GRPO: Liu et al. 2025). Ties (and groups of one) give
    0. Per-group scaling lifts a group whose answers differ only by a reward model's noise to unit advantages,
    like a group with one right answer; the batch's spread keeps their sizes apart (bench/RESULTS.md section 7)."""
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.view(-1)
    if scale == "batch":
        std = rewards.float().std(unbiased=False)
    elif scale == "group":
        std = groups.std(dim=1, unbiased=False, keepdim=True)
    else:
        raise ValueError(f"scale must be group, batch or none, not {scale!r}")
    return (centred / (std + eps)).view(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi: ``e^d - d - 1`` with
    ``d = ref - logp``."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip_range: float, kl_coef: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean k3 KL per token) of a batch. ``advantages``: one per sequence (B,); ``mask``: the answer tokens
    (B, T) as in :mod:`~kuberlhf.rlhf.ppo_math`. Log-ratios are masked before they are exponentiated (see
    ``ppo_math.policy_loss``)."""
    m = mask.bool()
    zeros = torch.zeros_like(logprobs)
    ratio = torch.exp(torch.where(m, logprobs - old_logprobs, zeros))
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv)
    kl = torch.where(m, k3_kl(logprobs, torch.where(m, ref_logprobs, logprobs)), zeros)
    per_token = -surrogate + kl_coef * kl
    n = m.sum(dim=1).clamp(min=1).to(logprobs.dtype)
    per_seq = (per_token * m).sum(dim=1) / n
    has = m.any(dim=1)
    loss = per_seq[has].mean() if bool(has.any()) else per_seq.sum() * 0.0
    return loss, (kl.sum() / m.sum().clamp(min=1)).detach()


@dataclass
class GRPOSettings:
    """GRPO's constants; every default is ``spec.stages.grpo``'s. The generation fields are the ones
    :class:`PPOTrainer` reads (it samples the groups)."""

    group_size: int = spec_default(GRPOStageSpec, "group_size")
    kl_coef: float = spec_default(GRPOStageSpec, "kl_coef")
    scale_rewards: str = spec_default(GRPOStageSpec, "scale_rewards")
    clip_range: float = spec_default(GRPOStageSpec, "clip_range")
    reward_clip: float = spec_default(GRPOStageSpec, "reward_clip")
    max_answer_len: int = spec_default(GRPOStageSpec, "max_answer_len")
    temperature: float = spec_default(GRPOStageSpec, "temperature")
    top_p: float = spec_default(GRPOStageSpec, "top_p")
    ptx_coef: float = spec_default(GRPOStageSpec, "ptx_coef")
    decoder: str = spec_default(GRPOStageSpec, "decoder")
    compile_decoder: bool | None = spec_default(GRPOStageSpec, "compile_decoder")
    reuse_generation_logprobs: bool = True
    adaptive_kl: bool = False  # GRPO's KL term is in the loss with a fixed coefficient

    @classmethod
    def from_spec(cls, st: Any) -> GRPOSettings:
        return cls(group_size=st.group_size, kl_coef=st.kl_coef, scale_rewards=st.scale_rewards,
                   clip_range=st.clip_range, reward_clip=st.reward_clip, max_answer_len=st.max_answer_len,
                   temperature=st.temperature, top_p=st.top_p, ptx_coef=st.ptx_coef, decoder=st.decoder,
                   compile_decoder=st.compile_decoder)


class GRPOTrainer(PPOTrainer):
    """``generate_experience(prompt_batch)`` samples ``groupSize`` answers per prompt and scores them (reward
    model, or ``reward_fn(prompts, answers) -> list[float]``); ``train_rlhf(exp)`` does one actor step;
    ``train_unsupervised`` (ptx) and the engine's EMA are PPO's."""

    def __init__(self, engine: RLHFEngine, settings: GRPOSettings, world_size: int = 1, reward_fn: Any = None):
        if reward_fn is None and engine.reward is None:
            raise ValueError("GRPO needs a reward: an engine with a reward model, or reward_fn")
        super().__init__(engine, settings, world_size)  # type: ignore[arg-type]
        self.reward_fn = reward_fn

    @torch.no_grad()
    def score(self, exp: dict[str, torch.Tensor], pos: torch.Tensor) -> torch.Tensor:
        if self.reward_fn is not None:
            from kuberlhf.stages.ppo import rollout_texts

            values = self.reward_fn(*rollout_texts(self.tokenizer, exp))
            return torch.tensor(values, dtype=torch.float32, device=exp["seq"].device)
        _, scores = self._frozen_or_engine(self.reward)(exp["seq"], exp["attention_mask"], pos)
        return scores.float().clamp(-self.s.reward_clip, self.s.reward_clip)

    @torch.no_grad()
    def generate_experience(self, prompt_batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.s.group_size
        groups = {k: v.repeat_interleave(g, dim=0) for k, v in prompt_batch.items()}  # a group's rows are adjacent
        exp = self.rollout(groups)
        scores = self.score(exp, exp.pop("position_ids"))
        self.actor.train()
        return {**exp, "scores": scores, "advantages": group_advantages(scores, g, scale=self.s.scale_rewards)}

    def train_rlhf(self, exp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One actor step on ``exp`` (any subset of whole sequences: the advantages were normalised over whole
        groups in ``generate_experience``) -> (loss, mean k3 KL per token)."""
        self.actor.train()
        logprobs = self._answer_logprobs(self.actor, exp["seq"], exp["attention_mask"], exp["prompts"].shape[1])
        loss, kl = grpo_loss(logprobs, exp["logprobs"], exp["ref_logprobs"], exp["advantages"], exp["action_mask"],
                             self.s.clip_range, self.s.kl_coef)
        self.actor.backward(loss)
        self.actor.step()
        return loss.detach(), kl
