"""DeepSpeed-Chat's ``DeepSpeedPPOTrainer``: ``generate_experience(prompt_batch)`` rolls out the actor and
scores the answers; ``train_rlhf(exp)`` does one actor and one critic step; ``train_unsupervised`` the ptx step.
All constants come from ``spec.stages.ppo`` (:class:`PPOSettings`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from kuberlhf.contract.spec import AdaptiveKLSpec, PPOStageSpec, spec_default
from kuberlhf.rlhf import ppo_math as pm
from kuberlhf.rlhf.decode import Sampling, pick_decoder
from kuberlhf.rlhf.engine import RLHFEngine


@dataclass
class PPOSettings:
    """PPO's constants. Every default is ``spec.stages.ppo``'s (``PPOStageSpec``, ``AdaptiveKLSpec``), so
    ``PPOSettings()`` is the recipe a manifest gets; :meth:`from_spec` takes a manifest's values."""

    kl_coef: float = spec_default(PPOStageSpec, "kl_coef")
    clip_range: float = spec_default(PPOStageSpec, "clip_range")
    clip_range_value: float = spec_default(PPOStageSpec, "clip_range_value")
    gamma: float = spec_default(PPOStageSpec, "gamma")
    lam: float = spec_default(PPOStageSpec, "lam")
    reward_clip: float = spec_default(PPOStageSpec, "reward_clip")
    max_answer_len: int = spec_default(PPOStageSpec, "max_answer_len")
    temperature: float = spec_default(PPOStageSpec, "temperature")
    top_p: float = spec_default(PPOStageSpec, "top_p")
    ptx_coef: float = spec_default(PPOStageSpec, "ptx_coef")
    adaptive_kl: bool = spec_default(AdaptiveKLSpec, "enabled")
    kl_target: float = spec_default(AdaptiveKLSpec, "target")
    kl_horizon: int = spec_default(AdaptiveKLSpec, "horizon")
    # the actor's log-probs of its samples from generation's own logits instead of one more forward pass
    # (identical up to float rounding: see ppo_math.answer_logprobs)
    reuse_generation_logprobs: bool = True
    whiten_advantages: bool = spec_default(PPOStageSpec, "whiten_advantages")
    decoder: str = spec_default(PPOStageSpec, "decoder")
    compile_decoder: bool = spec_default(PPOStageSpec, "compile_decoder")

    @classmethod
    def from_spec(cls, st: Any) -> PPOSettings:
        return cls(kl_coef=st.kl_coef, clip_range=st.clip_range, clip_range_value=st.clip_range_value,
                   gamma=st.gamma, lam=st.lam, reward_clip=st.reward_clip, max_answer_len=st.max_answer_len,
                   temperature=st.temperature, top_p=st.top_p, ptx_coef=st.ptx_coef,
                   adaptive_kl=st.adaptive_kl.enabled, kl_target=st.adaptive_kl.target,
                   kl_horizon=st.adaptive_kl.horizon, whiten_advantages=st.whiten_advantages,
                   decoder=st.decoder, compile_decoder=st.compile_decoder)


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


def _forward_params(module: Any) -> set[str]:
    """Keyword arguments the wrapped causal LM's forward takes (through a peft wrapper, whose own forward is
    ``**kwargs``)."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


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
        params = _forward_params(self.actor.module)
        self._lm_pos = "position_ids" in params
        # transformers' logits_to_keep: the LM head only on the positions that score answer tokens
        self._lm_keep = "logits_to_keep" in params
        # rollouts: kuberlhf.rlhf.decode's static-cache sampler, or None for generate (and the hybrid engine)
        self.decoder = pick_decoder(self.actor.module, settings.decoder, settings.compile_decoder,
                                    hybrid=bool(getattr(engine.options.actor_settings, "hybrid_engine", False)))

    # --- experience ------------------------------------------------------------------------------------
    def _lm_logits(self, engine: Any, seq: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None = None
                   ) -> torch.Tensor:
        kwargs = {"position_ids": position_ids(mask) if pos is None else pos} if self._lm_pos else {}
        return self._frozen_or_engine(engine)(input_ids=seq, attention_mask=mask, use_cache=False, **kwargs).logits

    def _answer_logprobs(self, engine: Any, seq: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                         pos: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs of the answer tokens (zero on the prompt), (B, L-1) like ``token_logprobs``. The LM head
        and log-softmax run only on the ``A + 1`` positions from the last prompt token on (every prompt of a
        batch is left-padded to ``prompt_len``), which is the same per-position computation as slicing full
        logits; the prompt's logits are never needed."""
        if not self._lm_keep:
            return pm.token_logprobs(self._lm_logits(engine, seq, mask, pos), seq)
        kwargs = {"position_ids": position_ids(mask) if pos is None else pos} if self._lm_pos else {}
        tail = self._frozen_or_engine(engine)(input_ids=seq, attention_mask=mask, use_cache=False,
                                              logits_to_keep=seq.shape[1] - prompt_len + 1, **kwargs).logits
        return pm.answer_logprobs(tail[:, :-1], seq, prompt_len)

    def _frozen_or_engine(self, engine: Any) -> Any:
        """Inference forwards (no_grad) of an engine that does not partition weights go straight to its module:
        the DeepSpeed engine's forward wrapper only adds per-call bookkeeping there. Training forwards and
        ZeRO-3 engines (whose wrapper coordinates parameter gathering) keep the engine."""
        if torch.is_grad_enabled() or engine.zero_optimization_partition_weights():
            return engine
        return engine.module

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, return_logits: bool = False):
        """KV-cache sampling from the actor -> the sequences, or ``(sequences, step_logits | None)`` with
        ``return_logits`` (raw logits of each generated position, (B, A, V)). Under ZeRO-3 with several ranks
        every rank keeps stepping until all are done (``synced_gpus``), or the parameter all-gathers would
        deadlock."""
        self.actor.eval()
        synced = self.rlhf.actor_zero3 and self.world_size > 1
        if self.decoder is not None:
            seq, logits = self.decoder.generate(prompts, prompt_mask, Sampling(
                self.s.max_answer_len, self.s.temperature, self.s.top_p, self.eos_id, self.pad_id))
            return (seq, logits) if return_logits else seq
        # Always the wrapped module's generate: the hybrid engine (CUDA only) replaces it with its own (inference
        # kernels, ZeRO-3 gathering) when it found layers its kernels serve; when it found none (decoder layers of
        # a transformers version it does not support) engine.generate fails on a missing ``_generate`` while the
        # module's plain generate is right.
        out = self.actor.module.generate(
            input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=self.s.max_answer_len, do_sample=True,
            temperature=self.s.temperature, top_p=self.s.top_p, top_k=0, pad_token_id=self.pad_id,
            eos_token_id=self.eos_id, synced_gpus=synced, use_cache=True,
            return_dict_in_generate=return_logits, output_logits=return_logits)
        if not return_logits:
            return out
        if isinstance(out, torch.Tensor):  # a generate that ignores output_logits
            return out, None
        logits = getattr(out, "logits", None)
        return out.sequences, (torch.stack(logits, dim=1) if logits else None)

    @torch.no_grad()
    def rollout(self, prompt_batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sample answers from the actor on left-padded prompts: the sequences, their masks and position ids, and
        the log-probs of the answer tokens under the actor and the reference. What every online algorithm needs
        before it scores the answers (PPO: critic values + reward model; GRPO: rewards per group)."""
        device = self.actor.device
        prompts = prompt_batch["prompt_input_ids"].to(device)
        prompt_mask = prompt_batch["prompt_attention_mask"].to(device)
        if self.s.reuse_generation_logprobs:
            seq, step_logits = self.generate(prompts, prompt_mask, return_logits=True)
        else:  # generate returns the sequences alone then
            seq, step_logits = self.generate(prompts, prompt_mask), None
        p_len = prompts.shape[1]
        ans_mask = answer_mask(seq[:, p_len:], self.eos_id, self.pad_id)
        mask = torch.cat([prompt_mask.long(), ans_mask], dim=1)
        seq = torch.where(mask.bool(), seq, torch.full_like(seq, self.pad_id))
        action_mask = mask[:, 1:].clone()
        action_mask[:, : p_len - 1] = 0
        pos = position_ids(mask)
        if step_logits is not None:
            logprobs = pm.answer_logprobs(step_logits, seq, p_len)
        else:
            logprobs = self._answer_logprobs(self.actor, seq, mask, p_len, pos)
        ref_logprobs = self._answer_logprobs(self.ref, seq, mask, p_len, pos)
        return {"prompts": prompts, "seq": seq, "attention_mask": mask, "action_mask": action_mask,
                "position_ids": pos, "logprobs": logprobs.float(), "ref_logprobs": ref_logprobs.float()}

    @torch.no_grad()
    def generate_experience(self, prompt_batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Roll out the actor on left-padded prompts and score everything PPO needs: log-probs of the actor and
        the reference, critic values, reward-model scores, masks."""
        exp = self.rollout(prompt_batch)
        # DeepSpeed-Chat drops answers of at most one token (EOS alone) before scoring; here they stay in the
        # batch (every rank keeps its shapes) with no actions, which takes them out of every loss alike
        exp["action_mask"] = pm.drop_short_answers(exp["action_mask"])
        seq, mask, pos = exp["seq"], exp["attention_mask"], exp.pop("position_ids")
        values, _ = self._frozen_or_engine(self.critic)(seq, mask, pos)
        _, scores = self._frozen_or_engine(self.reward)(seq, mask, pos)
        self.actor.train()
        return {**exp, "values": values[:, :-1].float(), "scores": scores.float()}

    # --- training -------------------------------------------------------------------------------------
    def advantages(self, exp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rewards = pm.kl_shaped_rewards(exp["logprobs"], exp["ref_logprobs"], exp["scores"], exp["action_mask"],
                                       self.kl_ctl.value, self.s.reward_clip)
        adv, ret = pm.gae(rewards, exp["values"], exp["action_mask"], self.s.gamma, self.s.lam)
        if self.s.whiten_advantages:  # after the returns: the critic still regresses on unnormalised returns
            adv = pm.whiten(adv, exp["action_mask"])
        return {"rewards": rewards, "advantages": adv, "returns": ret}

    def train_rlhf(self, exp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One actor step (clipped policy loss) then one critic step (clipped value loss) on ``exp``."""
        if "advantages" not in exp:
            exp = {**exp, **self.advantages(exp)}
        seq, mask, amask = exp["seq"], exp["attention_mask"], exp["action_mask"]
        self.actor.train()
        if "prompts" in exp:
            logprobs = self._answer_logprobs(self.actor, seq, mask, exp["prompts"].shape[1])
        else:  # an experience built by hand: no prompt length to cut at
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

    def train_unsupervised(self, batch: dict[str, torch.Tensor], ptx_coef: float | None = None) -> torch.Tensor:
        """The ptx step: ``ptx_coef`` (default: the settings') x next-token loss on a pre-training batch, through
        the actor."""
        ptx_coef = self.s.ptx_coef if ptx_coef is None else ptx_coef
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
