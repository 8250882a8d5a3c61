"""DeepSpeed-Chat's recipe presets per deployment type.

Values follow DeepSpeed-Chat's published training scripts (training/step{1,2,3}_*/training_scripts/opt/
{single_gpu,single_node,multi_node}/run_*.sh and the defaults of each step's main.py). They fill only the
fields the user left unset, so any single value can still be overridden in the manifest.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kuberlhf.contract.spec import PipelineSpec

# Keys are Python field names of the stage specs; "lora_dim" is turned into a LoraSpec.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "single_gpu": {
        # one GPU: LoRA on the actor and gradient accumulation instead of data parallelism
        "sft": {"nodes": 1, "gpus_per_node": 1, "zero_stage": 0, "per_device_batch_size": 16,
                "gradient_accumulation_steps": 8, "learning_rate": 1e-3, "lora_dim": 128},
        "reward": {"nodes": 1, "gpus_per_node": 1, "zero_stage": 0, "per_device_batch_size": 16,
                   "gradient_accumulation_steps": 4, "learning_rate": 5e-5},
        "ppo": {"nodes": 1, "gpus_per_node": 1, "actor_zero_stage": 0, "critic_zero_stage": 0,
                "per_device_batch_size": 16, "generation_batch_size": 16, "gradient_accumulation_steps": 2,
                "actor_learning_rate": 9.65e-6, "critic_learning_rate": 5e-6, "hybrid_engine": True,
                "actor_lora_dim": 128},
    },
    "single_node": {
        "sft": {"nodes": 1, "gpus_per_node": 8, "zero_stage": 2, "per_device_batch_size": 4,
                "gradient_accumulation_steps": 1, "learning_rate": 9.65e-6},
        "reward": {"nodes": 1, "gpus_per_node": 8, "zero_stage": 0, "per_device_batch_size": 8,
                   "gradient_accumulation_steps": 1, "learning_rate": 5e-5},
        "ppo": {"nodes": 1, "gpus_per_node": 8, "actor_zero_stage": 2, "critic_zero_stage": 2,
                "per_device_batch_size": 4, "generation_batch_size": 4, "gradient_accumulation_steps": 1,
                "actor_learning_rate": 9.65e-6, "critic_learning_rate": 5e-6, "hybrid_engine": True},
    },
    "multi_node": {
        "sft": {"nodes": 2, "gpus_per_node": 8, "zero_stage": 3, "per_device_batch_size": 4,
                "gradient_accumulation_steps": 1, "learning_rate": 9.65e-6},
        "reward": {"nodes": 2, "gpus_per_node": 8, "zero_stage": 3, "per_device_batch_size": 4,
                   "gradient_accumulation_steps": 1, "learning_rate": 5e-5},
        "ppo": {"nodes": 2, "gpus_per_node": 8, "actor_zero_stage": 3, "critic_zero_stage": 3,
                "per_device_batch_size": 4, "generation_batch_size": 4, "gradient_accumulation_steps": 1,
                "actor_learning_rate": 5e-6, "critic_learning_rate": 5e-6, "hybrid_engine": True},
    },
}

# DPO: DeepSpeed-Chat's step2_dpo_finetuning scripts are its step-2 scripts (same batch layout, ZeRO stage and
# rate), so dpo takes step 2's preset. GRPO: step 3's actor side (no critic), the frozen reward model at the
# critic's ZeRO stage.
_CRITIC_ONLY = ("critic_zero_stage", "critic_learning_rate")
for _table in PRESETS.values():
    _table["dpo"] = dict(_table["reward"])
    _table["grpo"] = {k: v for k, v in _table["ppo"].items() if k not in _CRITIC_ONLY}
    _table["grpo"]["reward_zero_stage"] = _table["ppo"]["critic_zero_stage"]

# DeepSpeed-Chat's scripts are per actor size (training_scripts/opt/<type>/run_<size>.sh) and e2e_rlhf.py picks
# them by --actor-model. The single_node ones from 6.7B on train steps 1 and 3 at ZeRO-3 with gradient
# checkpointing (step 1 run_13b.sh: --zero_stage 3 --gradient_checkpointing; step 3 run_6.7b.sh and run_13b.sh:
# --actor_zero_stage 3 --critic_zero_stage 3 --actor_gradient_checkpointing); smaller actors take PRESETS as
# they are. `kuberlhf train` writes these into the manifest it builds (wire names), where no flag set them;
# a manifest applied as written keeps the table above (and the planner names the fix if it does not fit).
LARGE_ACTOR_PARAMS = 6_000_000_000
LARGE_ACTOR_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "single_node": {
        "sft": {"zeroStage": 3, "gradientCheckpointing": True},
        "ppo": {"actorZeroStage": 3, "criticZeroStage": 3, "gradientCheckpointing": True},
        "dpo": {"zeroStage": 3, "gradientCheckpointing": True},
        "grpo": {"actorZeroStage": 3, "gradientCheckpointing": True},
    },
}


def sized_recipe(deployment_type: str, actor_params: int | None) -> dict[str, dict[str, Any]]:
    """The per-size script's settings for an actor of ``actor_params`` parameters (None: unknown size, none)."""
    if actor_params is None or actor_params < LARGE_ACTOR_PARAMS:
        return {}
    return LARGE_ACTOR_RECIPES.get(deployment_type, {})


_LORA_KEYS = {"lora_dim": "lora", "actor_lora_dim": "actor_lora"}
# DeepSpeed-Chat's step-3 scripts pass --disable_actor_dropout: the PPO actor (and its reference/EMA copies and
# the critic) run without dropout unless spec.actor.dropout says otherwise.
STEP3_DROPOUT = 0.0


def preset_version() -> str:
    """A digest of the preset table: recorded with each started stage, so the pin of a running stage does not
    move when a release changes a preset (kuberlhf_operator.spec_pin)."""
    table = {"presets": PRESETS, "step3_dropout": STEP3_DROPOUT}
    return "ds-chat-" + hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:12]


def apply_preset(spec: PipelineSpec) -> None:
    """Fill every unset (None) preset-governed field of ``spec.stages`` in place."""
    from kuberlhf.contract.spec import Accelerator, LoraSpec

    table = PRESETS[spec.deployment_type.value]
    ppo, grpo = spec.stages.ppo, spec.stages.grpo
    if ppo.learning_rate is not None:  # one rate the user gave for step 3 wins over both preset rates
        ppo.actor_learning_rate = ppo.actor_learning_rate or ppo.learning_rate
        ppo.critic_learning_rate = ppo.critic_learning_rate or ppo.learning_rate
    if grpo.learning_rate is not None:
        grpo.actor_learning_rate = grpo.actor_learning_rate or grpo.learning_rate
    # only the pipeline's own stages: a stage of another algorithm stays as written, so the preflight can tell
    # the user it has no place in this pipeline
    graph = {st.value for st in spec.stage_graph}
    for stage_name, values in table.items():
        if stage_name not in graph:
            continue
        stage = getattr(spec.stages, stage_name)
        for key, value in values.items():
            if key in _LORA_KEYS:
                attr = _LORA_KEYS[key]
                if getattr(stage, attr) is None:
                    setattr(stage, attr, LoraSpec(dim=value))
                continue
            if key == "hybrid_engine" and spec.accelerator is Accelerator.cpu:
                value = False  # the hybrid engine needs CUDA; the CPU path keeps plain generation
            if getattr(stage, key) is None:
                setattr(stage, key, value)
