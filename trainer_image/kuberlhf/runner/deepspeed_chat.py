"""``kuberlhf train``: DeepSpeed-Chat's ``e2e_rlhf.py`` arguments turned into an RLHFPipeline.

Pure functions: the command line only parses flags and calls :func:`build_train_pipeline`. The recipe values
(batch sizes, LoRA, ZeRO stages, gradient accumulation) come from ``kuberlhf.contract.presets`` through the spec
model's validator, exactly as for a manifest applied with kubectl.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from kuberlhf.contract.presets import sized_recipe
from kuberlhf.contract.spec import RLHFPipeline, SpecError, Stage, parse_pipeline

# e2e_rlhf.py accepts bare OPT sizes (``--actor-model 1.3b``); they mean facebook/opt-<size>.
_OPT_SIZE = re.compile(r"^\d+(\.\d+)?[mb]$", re.IGNORECASE)
DEFAULT_DATASET = "Dahoas/rm-static"  # DeepSpeed-Chat's default --data_path
DEFAULT_STORAGE_URI = "s3://kuberlhf/pipelines"
DEFAULT_STORAGE_ENDPOINT = "http://seaweedfs.kuberlhf:8333"  # the chart's optional in-cluster SeaweedFS
DEFAULT_SECRET = "s3-credentials"
STEP_TO_STAGE: dict[int, Stage] = {1: Stage.sft, 2: Stage.reward, 3: Stage.ppo}
# step N of each algorithm's graph: dpo is DeepSpeed-Chat's step 2 (step2_dpo_finetuning); a grpo pipeline
# without a reward stage has steps 1 and 3
STEPS: dict[str, dict[int, Stage]] = {
    "ppo": STEP_TO_STAGE,
    "dpo": {1: Stage.sft, 2: Stage.dpo},
    "grpo": {1: Stage.sft, 2: Stage.reward, 3: Stage.grpo},
}


def expand_model_name(name: str) -> str:
    """'1.3b' -> 'facebook/opt-1.3b' (DeepSpeed-Chat's shorthand); anything else (any HF causal LM, a local
    directory, an s3:// URI) is kept as given."""
    name = name.strip()
    if not name:
        raise SpecError("the model name is empty: give a hub name (facebook/opt-1.3b), a local directory or s3:// URI")
    return f"facebook/opt-{name.lower()}" if _OPT_SIZE.match(name) else name


def steps_to_stages(steps: Sequence[int], graph: Sequence[Stage] = (Stage.sft, Stage.reward, Stage.ppo)
                    ) -> list[Stage]:
    """DeepSpeed-Chat's ``--step 1 2 3`` as stages of the pipeline's ``graph``, in its order, duplicates removed."""
    final = graph[-1]
    table = {n: st for n, st in STEPS[final.value].items() if st in graph}
    bad = [s for s in steps if s not in table]
    if bad:
        names = ", ".join(f"{n} ({st.value})" for n, st in table.items())
        raise SpecError(f"--step takes {names} for this pipeline ({' -> '.join(st.value for st in graph)}), "
                        f"got {bad}")
    chosen = {table[s] for s in steps}
    return [st for st in graph if st in chosen]


def pipeline_name_for(actor_model: str) -> str:
    """A valid metadata.name from the actor model: 'facebook/opt-1.3b' -> 'opt-1-3b-rlhf'."""
    base = actor_model.rstrip("/").split("/")[-1].lower()
    base = re.sub(r"[^a-z0-9]+", "-", base).strip("-") or "model"
    return f"{base[:35].rstrip('-')}-rlhf"


def build_train_pipeline(
    *,
    actor_model: str,
    reward_model: str | None,
    algorithm: str = "ppo",
    reward_function: str | None = None,
    deployment_type: str = "single_gpu",
    actor_zero_stage: int | None = None,
    reward_zero_stage: int | None = None,
    datasets: Sequence[str] = (DEFAULT_DATASET,),
    data_split: str | None = None,
    unsupervised_dataset: str | None = None,
    accelerator: str = "cuda",
    name: str | None = None,
    namespace: str | None = None,
    storage_uri: str = DEFAULT_STORAGE_URI,
    storage_endpoint: str | None = DEFAULT_STORAGE_ENDPOINT,
    storage_secret: str | None = DEFAULT_SECRET,
    image: str | None = None,
    max_seq_len: int | None = None,
    max_prompt_seq_len: int | None = None,
    max_answer_seq_len: int | None = None,
    max_steps: int | None = None,
) -> RLHFPipeline:
    """The RLHFPipeline equivalent to ``e2e_rlhf.py --actor-model A --reward-model R --deployment-type T``.

    As in DeepSpeed-Chat, ``--actor-zero-stage`` sets step 1's and the PPO actor's ZeRO stage and
    ``--reward-zero-stage`` step 2's and the PPO critic's; unset ones come from the deployment-type preset, or
    for an actor of 6.7B and more from DeepSpeed-Chat's per-size script (``presets.sized_recipe``: single_node
    13B trains steps 1 and 3 at ZeRO-3 with gradient checkpointing, as its run_13b.sh do).
    Validation goes through the same spec models as ``kubectl apply`` (errors name the field).
    ``max_seq_len`` / ``max_prompt_seq_len`` / ``max_answer_seq_len`` are DeepSpeed-Chat's flags of the same names
    (data.maxSeqLen, the PPO stage's maxPromptLen / maxAnswerLen); ``max_steps`` caps every chosen stage's
    optimizer steps (a quick try on a CPU; DeepSpeed-Chat has no such flag).

    ``algorithm`` ``dpo`` trains sft -> dpo (``--actor-zero-stage`` is both's, no reward model: ``reward_model``
    is ignored); ``grpo`` trains sft -> reward -> grpo, or sft -> grpo with ``reward_function`` (then no reward
    model either).
    """
    last = {"ppo": "ppo", "dpo": "dpo", "grpo": "grpo"}.get(algorithm)
    if last is None:
        raise SpecError(f"--algorithm {algorithm!r}: use ppo, dpo or grpo")
    has_reward = algorithm == "ppo" or (algorithm == "grpo" and not reward_function)
    if reward_function and algorithm != "grpo":
        raise SpecError("--reward-function scores GRPO's answers: give --algorithm grpo with it")
    stages: dict[str, dict[str, Any]] = {"sft": {}, **({"reward": {}} if has_reward else {}), last: {}}
    if reward_function:
        stages[last]["rewardFunction"] = reward_function
    actor_key = "zeroStage" if last == "dpo" else "actorZeroStage"
    if actor_zero_stage is not None:
        stages["sft"]["zeroStage"] = actor_zero_stage
        stages[last][actor_key] = actor_zero_stage
    if reward_zero_stage is not None and has_reward:
        stages["reward"]["zeroStage"] = reward_zero_stage
        stages[last]["criticZeroStage" if last == "ppo" else "rewardZeroStage"] = reward_zero_stage
    if last != "dpo":
        if max_prompt_seq_len is not None:
            stages[last]["maxPromptLen"] = max_prompt_seq_len
        if max_answer_seq_len is not None:
            stages[last]["maxAnswerLen"] = max_answer_seq_len
    if max_steps is not None:
        for stage in stages.values():
            stage["maxSteps"] = max_steps
    data: dict[str, Any] = {"datasets": list(datasets) or [DEFAULT_DATASET]}
    if data_split is not None:
        data["split"] = data_split
    if max_seq_len is not None:
        data["maxSeqLen"] = max_seq_len
    if unsupervised_dataset:
        data["unsupervised"] = unsupervised_dataset
    storage: dict[str, Any] = {"uri": storage_uri}
    if storage_endpoint:
        storage["endpoint"] = storage_endpoint
    if storage_secret:
        storage["secretRef"] = {"name": storage_secret}
    actor = expand_model_name(actor_model)
    for stage, values in sized_recipe(deployment_type, _actor_params(actor)).items():
        if stage in stages:  # a flag the user gave wins
            stages[stage] = {**values, **stages[stage]}
    spec: dict[str, Any] = {
        "deploymentType": deployment_type,
        "accelerator": accelerator,
        "algorithm": algorithm,
        "actor": {"model": actor},
        "data": data,
        "storage": storage,
        "stages": stages,
    }
    if has_reward:
        if not reward_model:
            raise SpecError(f"--algorithm {algorithm} trains a reward model: give --reward-model")
        spec["reward"] = {"model": expand_model_name(reward_model)}
    if image:
        spec["image"] = image
    metadata: dict[str, Any] = {"name": name or pipeline_name_for(actor)}
    if namespace:
        metadata["namespace"] = namespace
    return parse_pipeline({"apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFPipeline", "metadata": metadata,
                           "spec": spec})


def _actor_params(actor: str) -> int | None:
    """The actor's parameter count from what needs no download (the known OPT configs, a local config.json, the
    tiny model); None when only a download could tell."""
    from kuberlhf.planner.check import offline_shape

    shape = offline_shape(actor, "--actor-model", local=True)
    return None if shape is None else shape.causal_lm_params


def emit_yaml(pipeline: RLHFPipeline) -> str:
    """The manifest for ``kubectl apply -f``: the resolved spec (presets written out, so the cluster runs
    exactly the recipe shown), with only the pipeline's own stages under ``spec.stages``."""
    import yaml

    return yaml.safe_dump(pipeline.to_wire(), sort_keys=False, default_flow_style=False)
