"""DeepSpeed-Chat's ``DeepSpeedRLHFEngine``: from the step-1 model (actor path) and the step-2 reward model
(critic path) build

- ``actor``: trained, initialised from step 1 (optional LoRA, hybrid engine on CUDA);
- ``ref``: frozen copy of step 1 (the KL anchor);
- ``critic``: trained, initialised from the reward model;
- ``reward``: frozen reward model;
- ``ema``: exponential moving average of the actor (when enabled), saved separately. It is updated once per
  actor optimizer step (:meth:`RLHFEngine.maybe_update_ema`, OpenRLHF's cadence), so ``beta``'s horizon of
  ``1 / (1 - beta)`` optimizer steps means the same with any gradient accumulation; with ``ema.warmup`` the decay
  follows :func:`~kuberlhf.rlhf.ppo_math.ema_beta`'s warm-up so a short run's EMA does not lag by design.

Trained models get :func:`train_ds_config`, frozen ones :func:`eval_ds_config` (ZeRO-3 sharding only when
their trained twin uses ZeRO-3; ``offloadReferenceModel`` / ``offloadRewardModel`` keep their partitions in CPU
memory). At ZeRO-3 every model is created partitioned as it loads (``kuberlhf.models.partition``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kuberlhf.contract.presets import STEP3_DROPOUT
from kuberlhf.contract.spec import EMASpec, PPOStageSpec, spec_default
from kuberlhf.models.loading import load_causal_lm
from kuberlhf.models.lora import apply_lora
from kuberlhf.models.reward import RewardModel
from kuberlhf.rlhf.ppo_math import ema_beta, ema_update_
from kuberlhf.training.ds_config import TrainSettings, eval_ds_config, train_ds_config
from kuberlhf.training.loop import ds_initialize, make_optimizer, make_scheduler


@dataclass
class EngineOptions:
    """What the engine needs from ``spec.stages.ppo`` (see ``from_spec``). The learning rates and DeepSpeed
    settings come from the deploymentType presets, so they have no default here; every other default is the
    spec's (``PPOStageSpec``), so options built by hand run the same recipe as a manifest."""

    actor_settings: TrainSettings
    critic_settings: TrainSettings
    actor_lr: float
    critic_lr: float
    weight_decay: float = spec_default(PPOStageSpec, "weight_decay")
    lr_scheduler: str = spec_default(PPOStageSpec, "lr_scheduler")
    warmup_steps: int = spec_default(PPOStageSpec, "warmup_steps")
    actor_lora: Any = None
    critic_lora: Any = None
    ema_enabled: bool = spec_default(EMASpec, "enabled")
    ema_beta: float = spec_default(EMASpec, "beta")
    ema_warmup: bool = spec_default(EMASpec, "warmup")
    offload_reference_model: bool = spec_default(PPOStageSpec, "offload_reference_model")  # and the EMA's
    offload_reward_model: bool = spec_default(PPOStageSpec, "offload_reward_model")
    gradient_checkpointing: bool = spec_default(PPOStageSpec, "gradient_checkpointing")
    seed: int = spec_default(PPOStageSpec, "seed")
    dropout: float | None = STEP3_DROPOUT
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: Any, world_size: int, stage: str = "ppo") -> EngineOptions:
        """The options of ``spec.stages.ppo``, or with ``stage="grpo"`` of ``spec.stages.grpo`` (no critic: the
        "critic" settings are the frozen reward model's, ``rewardZeroStage``)."""
        from kuberlhf.training.ds_config import stage_settings

        st = spec.stages.get(stage)
        ppo = stage == "ppo"
        return cls(
            actor_settings=stage_settings(spec, stage, world_size, role="actor"),
            critic_settings=stage_settings(spec, stage, world_size, role="critic" if ppo else "reward"),
            # filled by the presets (or from spec.stages.<stage>.learningRate): kuberlhf.contract.presets
            actor_lr=st.actor_learning_rate, critic_lr=st.critic_learning_rate if ppo else st.actor_learning_rate,
            weight_decay=st.weight_decay, lr_scheduler=st.lr_scheduler, warmup_steps=st.warmup_steps,
            actor_lora=st.actor_lora, critic_lora=st.critic_lora if ppo else None, ema_enabled=st.ema.enabled,
            ema_beta=st.ema.beta,
            ema_warmup=st.ema.warmup,
            offload_reference_model=st.offload_reference_model, offload_reward_model=st.offload_reward_model,
            gradient_checkpointing=st.gradient_checkpointing, seed=st.seed,
            dropout=spec.actor.dropout if spec.actor.dropout is not None else STEP3_DROPOUT,
        )


class RLHFEngine:
    """Builds the four (five with EMA) DeepSpeed engines of step 3. GRPO has no critic (``train_critic=False``)
    and, when a reward function scores the answers, no reward model either (``critic_path=None``)."""

    def __init__(self, actor_path: str, critic_path: str | None, tokenizer: Any, options: EngineOptions,
                 num_total_iters: int, train_critic: bool = True):
        self.tokenizer = tokenizer
        self.options = options
        self.num_total_iters = num_total_iters
        self.actor_zero3 = options.actor_settings.zero_stage == 3
        self.critic_zero3 = options.critic_settings.zero_stage == 3
        self.actor = self._init_actor(actor_path)
        self.ref = self._init_frozen_lm(actor_path)
        self.ema = self._init_frozen_lm(actor_path, lora=True) if options.ema_enabled else None
        self.critic = self._init_critic(critic_path) if train_critic and critic_path else None
        self.reward = self._init_reward(critic_path) if critic_path else None
        # the actor optimizer step the EMA last followed (DeepSpeed's global_steps counts applied steps only)
        self._ema_step = 0
        if self.ema is not None:
            self.update_ema(beta=0.0)  # start the average at the actor (LoRA weights included)

    def _lm(self, path: str, ds_config: dict[str, Any]):
        o = self.options
        return load_causal_lm(path, "spec.actor.model", seed=o.seed, dropout=o.dropout,
                              gradient_checkpointing=o.gradient_checkpointing, ds_config=ds_config,
                              tokenizer=self.tokenizer)

    def _init_actor(self, path: str):
        o = self.options
        config = train_ds_config(o.actor_settings)
        model = apply_lora(self._lm(path, config), o.actor_lora, "spec.stages.ppo.actorLora")
        opt = make_optimizer(model, o.actor_lr, o.weight_decay, o.actor_settings.offload,
                             o.actor_lora.learning_rate if o.actor_lora else None)
        sched = make_scheduler(opt, o.lr_scheduler, o.warmup_steps, self.num_total_iters)
        return ds_initialize(model, config, opt, sched)

    def _init_frozen_lm(self, path: str, lora: bool = False):
        o = self.options
        config = eval_ds_config(o.actor_settings, offload=o.offload_reference_model or o.actor_settings.offload)
        model = self._lm(path, config)
        if lora:  # the EMA mirrors the actor's structure so parameters pair up by name
            apply_lora(model, o.actor_lora, "spec.stages.ppo.actorLora")
        model.requires_grad_(False)
        engine = ds_initialize(model, config)
        engine.eval()
        return engine

    def _init_critic(self, path: str):
        o = self.options
        config = train_ds_config(o.critic_settings)
        model = RewardModel.from_pretrained(path, dropout=o.dropout, ds_config=config)
        if o.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        apply_lora(model, o.critic_lora, "spec.stages.ppo.criticLora")
        opt = make_optimizer(model, o.critic_lr, o.weight_decay, o.critic_settings.offload,
                             o.critic_lora.learning_rate if o.critic_lora else None)
        sched = make_scheduler(opt, o.lr_scheduler, o.warmup_steps, self.num_total_iters)
        return ds_initialize(model, config, opt, sched)

    def _init_reward(self, path: str):
        o = self.options
        config = eval_ds_config(o.critic_settings, offload=o.offload_reward_model or o.critic_settings.offload)
        model = RewardModel.from_pretrained(path, dropout=o.dropout, ds_config=config)
        model.requires_grad_(False)
        engine = ds_initialize(model, config)
        engine.eval()
        return engine

    @torch.no_grad()
    def update_ema(self, beta: float | None = None) -> None:
        """``ema = beta * ema + (1 - beta) * actor`` for every parameter (gathered under ZeRO-3)."""
        if self.ema is None:
            return
        import deepspeed

        beta = self.options.ema_beta if beta is None else beta
        ema_params = dict(self.ema.module.named_parameters())
        for name, p in self.actor.module.named_parameters():
            q = ema_params.get(name)
            if q is None:
                continue
            with deepspeed.zero.GatheredParameters([p, q], modifier_rank=0, enabled=self.actor_zero3):
                ema_update_(q.data, p.data, beta)

    def maybe_update_ema(self) -> bool:
        """Fold the actor into the EMA if its optimizer stepped since the last call (a micro-batch inside a
        gradient-accumulation window does not step it); call after every actor backward/step. The decay is
        ``ema_beta(beta, step, warmup)`` at the actor's optimizer step, which a resumed engine restores with
        its checkpoint, so the schedule continues where it stopped."""
        step = int(self.actor.global_steps)
        if self.ema is None or step == self._ema_step:
            return False
        self._ema_step = step
        self.update_ema(ema_beta(self.options.ema_beta, step, self.options.ema_warmup))
        return True

    def trained_engines(self) -> dict[str, Any]:
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}
