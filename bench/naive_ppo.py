"""The naive step-3 baseline of the PPO benchmark: what a straightforward implementation does, with no
DeepSpeed and no generation tricks.

- rollout: Hugging Face ``generate`` with ``use_cache=False`` (every new token re-runs the whole sequence);
- scoring: four separate forward passes (actor, reference, critic, reward model), each a plain ``nn.Module``;
- training: one actor step and one critic step, each with its own ``torch.optim.AdamW`` and grad clipping.

The PPO math (KL-shaped rewards, GAE, clipped losses) is the project's own ``kuberlhf.rlhf.ppo_math`` so both
sides compute the same thing; only the execution differs."""

from __future__ import annotations

import copy
from typing import Any

import torch

from kuberlhf.rlhf import ppo_math as pm
from kuberlhf.rlhf.trainer import answer_mask, position_ids


class NaivePPO:
    def __init__(self, actor_dir: str, critic_dir: str, tokenizer: Any, settings: Any, actor_lr: float,
                 critic_lr: float, generate_use_cache: bool = False, clip_grad: float = 1.0):
        from transformers import AutoModelForCausalLM

        from kuberlhf.models import RewardModel

        self.actor = AutoModelForCausalLM.from_pretrained(actor_dir, dtype=torch.float32)
        self.ref = copy.deepcopy(self.actor).requires_grad_(False).eval()
        self.critic = RewardModel.from_pretrained(critic_dir, dropout=0.0)
        self.reward = copy.deepcopy(self.critic).requires_grad_(False).eval()
        self.actor_opt = torch.optim.AdamW(self.actor.parameters(), lr=actor_lr, betas=(0.9, 0.95))
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=critic_lr, betas=(0.9, 0.95))
        self.s = settings
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self.use_cache = generate_use_cache
        self.clip_grad = clip_grad

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        self.actor.eval()
        return self.actor.generate(
            input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=self.s.max_answer_len, do_sample=True,
            temperature=self.s.temperature, top_p=self.s.top_p, top_k=0, pad_token_id=self.pad_id,
            eos_token_id=self.eos_id, use_cache=self.use_cache)

    @torch.no_grad()
    def score(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, seq: torch.Tensor) -> dict[str, torch.Tensor]:
        p_len = prompts.shape[1]
        mask = torch.cat([prompt_mask.long(), answer_mask(seq[:, p_len:], self.eos_id, self.pad_id)], dim=1)
        seq = torch.where(mask.bool(), seq, torch.full_like(seq, self.pad_id))
        action_mask = mask[:, 1:].clone()
        action_mask[:, : p_len - 1] = 0
        pos = position_ids(mask)
        logprobs = pm.token_logprobs(self.actor(input_ids=seq, attention_mask=mask, position_ids=pos).logits, seq)
        ref_logprobs = pm.token_logprobs(self.ref(input_ids=seq, attention_mask=mask, position_ids=pos).logits, seq)
        self.critic.eval()
        values, _ = self.critic(seq, mask, pos)
        _, scores = self.reward(seq, mask, pos)
        exp = {"seq": seq, "attention_mask": mask, "action_mask": action_mask, "logprobs": logprobs,
               "ref_logprobs": ref_logprobs, "values": values[:, :-1], "scores": scores}
        rewards = pm.kl_shaped_rewards(logprobs, ref_logprobs, scores, action_mask, self.s.kl_coef,
                                       self.s.reward_clip)
        exp["advantages"], exp["returns"] = pm.gae(rewards, exp["values"], action_mask, self.s.gamma, self.s.lam)
        return exp

    def train(self, exp: dict[str, torch.Tensor]) -> tuple[float, float]:
        seq, mask, amask = exp["seq"], exp["attention_mask"], exp["action_mask"]
        pos = position_ids(mask)
        self.actor.train()
        logprobs = pm.token_logprobs(self.actor(input_ids=seq, attention_mask=mask, position_ids=pos).logits, seq)
        actor_loss = pm.policy_loss(logprobs, exp["logprobs"], exp["advantages"], amask, self.s.clip_range)
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.actor.parameters(), self.clip_grad)
        self.actor_opt.step()
        self.critic.train()
        values, _ = self.critic(seq, mask, pos)
        critic_loss = pm.value_loss(values[:, :-1], exp["values"], exp["returns"], amask, self.s.clip_range_value)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.clip_grad)
        self.critic_opt.step()
        return actor_loss.item(), critic_loss.item()

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prompts, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        exp = self.score(prompts, prompt_mask, self.generate(prompts, prompt_mask))
        self.train(exp)
        return exp
