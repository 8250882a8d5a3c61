"""One source of defaults: the spec models plus the deploymentType presets. The Python API's settings objects
take their defaults from the spec models, and what the stages run (DeepSpeed settings, learning rates, PPO
constants) is the resolved spec's, with no code-level fallback that could disagree."""

from __future__ import annotations

import dataclasses

import pytest

from kuberlhf.contract import spec as S
from kuberlhf.contract.presets import PRESETS, STEP3_DROPOUT
from kuberlhf.rlhf.engine import EngineOptions
from kuberlhf.rlhf.trainer import PPOSettings
from kuberlhf.serving.app import ServeSettings
from kuberlhf.training.ds_config import TrainSettings, stage_settings

# Every defaulted field of a settings object: the spec field whose default it must equal, or why it has none.
SPEC_OF = {
    PPOSettings: {
        **{
            f: (S.PPOStageSpec, f)
            for f in (
                "kl_coef",
                "clip_range",
                "clip_range_value",
                "gamma",
                "lam",
                "reward_clip",
                "max_answer_len",
                "temperature",
                "top_p",
                "ptx_coef",
                "whiten_advantages",
                "decoder",
                "compile_decoder",
            )
        },
        "adaptive_kl": (S.AdaptiveKLSpec, "enabled"),
        "kl_target": (S.AdaptiveKLSpec, "target"),
        "kl_horizon": (S.AdaptiveKLSpec, "horizon"),
        "reuse_generation_logprobs": "an implementation choice with identical results (ppo_math.answer_logprobs)",
    },
    EngineOptions: {
        **{
            f: (S.PPOStageSpec, f)
            for f in ("weight_decay", "lr_scheduler", "warmup_steps", "gradient_checkpointing", "seed")
        },
        "ema_enabled": (S.EMASpec, "enabled"),
        "ema_beta": (S.EMASpec, "beta"),
        "ema_warmup": (S.EMASpec, "warmup"),
        "actor_lora": (S.PPOStageSpec, "actor_lora"),
        "critic_lora": (S.PPOStageSpec, "critic_lora"),
        "offload_reference_model": (S.PPOStageSpec, "offload_reference_model"),
        "offload_reward_model": (S.PPOStageSpec, "offload_reward_model"),
        "dropout": "presets.STEP3_DROPOUT (DeepSpeed-Chat's step-3 --disable_actor_dropout)",
        "extra": "free-form extension slot",
    },
    TrainSettings: {
        "offload": (S.CommonStageSpec, "offload"),
        "max_out_tokens": (S.DataSpec, "max_seq_len"),
        "zero_field": "the name of the field in error messages",
        "gradient_clipping": "DeepSpeed-Chat's constant GRADIENT_CLIPPING, no spec field",
        "hybrid_engine": "only the PPO actor's: stage_settings passes spec.stages.ppo.hybridEngine",
        "inference_tp_size": (S.PPOStageSpec, "inference_tp_size"),
        "tensorboard_dir": "a path the stage chooses",
    },
    ServeSettings: {"max_new_tokens": (S.ServingSpec, "max_new_tokens")},
}


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("cls", list(SPEC_OF), ids=lambda c: c.__name__)
def test_settings_defaults_are_the_spec_defaults(cls) -> None:
    table = SPEC_OF[cls]
    for name, value in _defaults(cls).items():
        if name not in table and cls is ServeSettings:
            continue  # the chat server's own limits (concurrency, queue, body size) have no spec field
        assert name in table, f"{cls.__name__}.{name} has a default with no spec field named for it: add it here"
        source = table[name]
        if isinstance(source, tuple):
            model, field = source
            assert value == S.spec_default(model, field), (
                f"{cls.__name__}.{name}={value!r} but the spec says {S.spec_default(model, field)!r}"
            )
    assert EngineOptions.dropout == STEP3_DROPOUT


def test_ppo_settings_is_the_manifest_recipe() -> None:
    """The issue's example: PPOSettings() had ptx_coef 0.0 while the spec says 27.8."""
    assert PPOSettings().ptx_coef == 27.8 == S.PPOStageSpec().ptx_coef
    assert PPOSettings() == PPOSettings.from_spec(S.PPOStageSpec())


def spec(deployment: str = "single_gpu", accelerator: str = "cuda", **stages):
    return S.parse_spec(
        {
            "deploymentType": deployment,
            "accelerator": accelerator,
            "actor": {"model": "kuberlhf/tiny-opt"},
            "reward": {"model": "kuberlhf/tiny-opt"},
            "data": {"datasets": ["kuberlhf/synthetic-pairs"]},
            "storage": {"uri": "s3://b/p"},
            "stages": stages,
        }
    )


@pytest.mark.parametrize("deployment", list(PRESETS))
def test_what_runs_is_the_preset_when_unset(deployment: str) -> None:
    s = spec(deployment)
    table = PRESETS[deployment]
    opts = EngineOptions.from_spec(s, world_size=table["ppo"]["nodes"] * table["ppo"]["gpus_per_node"])
    assert (opts.actor_lr, opts.critic_lr) == (
        table["ppo"]["actor_learning_rate"],
        table["ppo"]["critic_learning_rate"],
    )
    assert opts.actor_settings.zero_stage == table["ppo"]["actor_zero_stage"]
    assert opts.critic_settings.zero_stage == table["ppo"]["critic_zero_stage"]
    assert opts.actor_settings.micro_batch == table["ppo"]["per_device_batch_size"]
    assert opts.actor_settings.hybrid_engine is table["ppo"]["hybrid_engine"]
    assert opts.dropout == STEP3_DROPOUT
    for stage in ("sft", "reward"):
        st = stage_settings(s, stage, 1)
        assert st.zero_stage == table[stage]["zero_stage"]
        assert st.grad_accum == table[stage]["gradient_accumulation_steps"]
        assert s.stages.get(stage).learning_rate == table[stage]["learning_rate"]  # what training_engine uses


def test_user_values_win_and_ppo_learning_rate_is_not_dead() -> None:
    s = spec(
        ppo={"learningRate": 3e-6, "criticLearningRate": 1e-6, "actorZeroStage": 1},
        sft={"learningRate": 2e-5, "zeroStage": 3},
    )
    opts = EngineOptions.from_spec(s, world_size=1)
    assert (opts.actor_lr, opts.critic_lr, opts.actor_settings.zero_stage) == (3e-6, 1e-6, 1)
    assert (s.stages.sft.learning_rate, stage_settings(s, "sft", 1).zero_stage) == (2e-5, 3)
    assert EngineOptions.from_spec(spec(), 1).actor_lr == PRESETS["single_gpu"]["ppo"]["actor_learning_rate"]


def test_kuberlhf_train_leaves_spec_defaults_to_the_spec() -> None:
    from kuberlhf.runner.deepspeed_chat import build_train_pipeline

    wire = build_train_pipeline(actor_model="1.3b", reward_model="350m").spec.to_wire()
    assert wire["data"]["split"] == S.spec_default(S.DataSpec, "split")
    assert build_train_pipeline(actor_model="1.3b", reward_model="350m", data_split="1,1,1").spec.data.split == "1,1,1"
