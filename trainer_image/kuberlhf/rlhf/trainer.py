"""DeepSpeed-Chat's ``DeepSpeedPPOTrainer``: ``generate_experience(prompt_batch)`` rolls out the actor and
scores the answers; ``train_rlhf(exp)`` does one actor and one critic step; ``train_unsupervised`` the ptx step.
All constants come from ``spec.stages.ppo`` (:class:`PPOSettings`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from kuberlhf.rlhf import ppo_math as pm
from kuberlhf.rlhf.engine import RLHFEngine


@dataclass
class PPOSettings:
    kl_coef: float = 0.1
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    reward_clip: float = 5.0
    max_answer_len: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    ptx_coef: float = 0.0
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000

    @classmethod
    def from_spec(cls, st: Any) -> PPOSettings:
        return cls(kl_coef=st.kl_coef, clip_range=st.clip_range, clip_range_value=st.clip_range_value,
                   gamma=st.gamma, lam=st.lam, reward_clip=st.reward_clip, max_answer_len=st.max_answer_len,
                   temperature=st.temperature, top_p=st.top_p, ptx_coef=st.ptx_coef,
                   adaptive_kl=st.adaptive_kl.enabled, kl_target=st.adaptive_kl.target,
                   kl_horizon=st.adaptive_kl.horizon)


def answer_mask(answers: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """1 on generated tokens up to and including the first EOS, 0 after it (generate pads finished rows).
    Pad and EOS may be the same id (GPT-2), so the cut is at the first EOS, not at pads."""
    is_eos = answers == eos_id
    after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    mask = ~after_eos
    if pad_id != eos_id:
        mask &= answers != pad_id
    return mask.long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt sees the positions it was trained with."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _accepts_position_ids(module: Any) -> bool:
    try:
        return "position_ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


class PPOTrainer:
    def __init__(self, engine: RLHFEngine, settings: PPOSettings, world_size: int = 1):
        self.rlhf = engine
        self.actor, self.ref, self.critic, self.reward = engine.actor, engine.ref, engine.critic, engine.reward
        self.tokenizer = engine.tokenizer
        self.s = settings
        self.world_size = world_size
        self.kl_ctl = (pm.AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
                       if settings.adaptive_kl else pm.FixedKLController(settings.kl_coef))
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id)
        self._lm_pos = _accepts_position_ids(self.actor.module)

    # --- experience ------------------------------------------------------------------------------------
    def _lm_logits(self, engine: Any, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"position_ids": position_ids(mask)} if self._lm_pos else {}
        return engine(input_ids=seq, attention_mask=mask, use_cache=False, **kwargs).logits

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """KV-cache sampling from the actor; under ZeRO-3 with several ranks every rank keeps stepping until all
        are done (``synced_gpus``), or the parameter all-gathers would deadlock."""
        self.actor.eval()
        synced = self.rlhf.actor_zero3 and self.world_size > 1
        # the hybrid engine (CUDA only) swaps in its inference kernels through engine.generate; plain engines
        # generate through the wrapped HF module
        hybrid = bool(getattr(self.actor, "_config", None) and self.actor._config.hybrid_engine.enabled)
        gen = self.actor.generate if hybrid else self.actor.module.generate
        return gen(
            input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=self.s.max_answer_len, do_sample=True,
            temperature=self.s.temperature, top_p=self.s.top_p, top_k=0, pad_token_id=self.pad_id,
            eos_token_id=self.eos_id, synced_gpus=synced, use_cache=True)

    @torch.no_grad()
    def generate_experience(self, prompt_batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Roll out the actor on left-padded prompts and score everything PPO needs: log-probs of the actor and
        the reference, critic values, reward-model scores, masks."""
        device = self.actor.device
        prompts = prompt_batch["prompt_input_ids"].to(device)
        prompt_mask = prompt_batch["prompt_attention_mask"].to(device)
        seq = self.generate(prompts, prompt_mask)
        p_len = prompts.shape[1]
        ans_mask = answer_mask(seq[:, p_len:], self.eos_id, self.pad_id)
        mask = torch.cat([prompt_mask.long(), ans_mask], dim=1)
        seq = torch.where(mask.bool(), seq, torch.full_like(seq, self.pad_id))
        action_mask = mask[:, 1:].clone()
        action_mask[:, : p_len - 1] = 0
        logprobs = pm.token_logprobs(self._lm_logits(self.actor, seq, mask), seq)
        ref_logprobs = pm.token_logprobs(self._lm_logits(self.ref, seq, mask), seq)
        pos = position_ids(mask)
        values, _ = self.critic(seq, mask, pos)
        _, scores = self.reward(seq, mask, pos)
        self.actor.train()
        return {"prompts": prompts, "seq": seq, "attention_mask": mask, "action_mask": action_mask,
                "logprobs": logprobs.float(), "ref_logprobs": ref_logprobs.float(),
                "values": values[:, :-1].float(), "scores": scores.float()}

    # --- training -------------------------------------------------------------------------------------
    def advantages(self, exp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rewards = pm.kl_shaped_rewards(exp["logprobs"], exp["ref_logprobs"], exp["scores"], exp["action_mask"],
                                       self.kl_ctl.value, self.s.reward_clip)
        adv, ret = pm.gae(rewards, exp["values"], exp["action_mask"], self.s.gamma, self.s.lam)
        return {"rewards": rewards, "advantages": adv, "returns": ret}

    def train_rlhf(self, exp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One actor step (clipped policy loss) then one critic step (clipped value loss) on ``exp``."""
        if "advantages" not in exp:
            exp = {**exp, **self.advantages(exp)}
        seq, mask, amask = exp["seq"], exp["attention_mask"], exp["action_mask"]
        self.actor.train()
        logprobs = pm.token_logprobs(self._lm_logits(self.actor, seq, mask), seq)
        actor_loss = pm.policy_loss(logprobs, exp["logprobs"], exp["advantages"], amask, self.s.clip_range)
        self.actor.backward(actor_loss)
        self.actor.step()
        self.critic.train()
        values, _ = self.critic(seq, mask, position_ids(mask))
        critic_loss = pm.value_loss(values[:, :-1].float(), exp["values"], exp["returns"], amask,
                                    self.s.clip_range_value)
        self.critic.backward(critic_loss)
        self.critic.step()
        return actor_loss.detach(), critic_loss.detach()

    def train_unsupervised(self, batch: dict[str, torch.Tensor], ptx_coef: float) -> torch.Tensor:
        """The ptx step: ``ptx_coef`` x next-token loss on a pre-training batch, through the actor."""
        batch = {k: v.to(self.actor.device) for k, v in batch.items()}
        self.actor.train()
        out = self.actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        lm_loss = pm.causal_lm_loss(out.logits, batch["labels"])
        self.actor.backward(pm.ptx_loss(lm_loss, ptx_coef))
        self.actor.step()
        return lm_loss.detach()

    def update_kl(self, exp: dict[str, torch.Tensor], n_samples: int) -> float:
        kl = float(pm.sequence_kl(exp["logprobs"], exp["ref_logprobs"], exp["action_mask"]))
        self.kl_ctl.update(kl, n_samples)
        return kl
