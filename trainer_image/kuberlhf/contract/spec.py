"""Pydantic models of the RLHFPipeline custom resource (kuberlhf.io/v1alpha1).

These models are the single source of truth: the CRD's openAPIV3Schema is generated from them
(``kuberlhf_operator.crd``), the operator and the local runner validate with them, and
``kuberlhf train --emit`` writes them. Field names are camelCase as in every Kubernetes API.

Fields that DeepSpeed-Chat's recipes decide per deployment type (batch sizes, ZeRO stages, LoRA, gradient
accumulation) are optional here and filled from ``kuberlhf.contract.presets`` after validation, so a user
who sets ``deploymentType`` gets the published recipe and can still override any single value.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

API_GROUP = "kuberlhf.io"
API_VERSION = "v1alpha1"
KIND = "RLHFPipeline"
PLURAL = "rlhfpipelines"
SHORT_NAME = "rlhf"


class SpecModel(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields are errors (typos must not pass)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict as it appears in YAML/JSON, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def spec_default(model: type[BaseModel], name: str) -> Any:
    """The default of field ``name`` (Python name) of a spec model: what settings objects of the Python API take
    as their own defaults, so there is one source of each default."""
    return model.model_fields[name].get_default(call_default_factory=True)


class DeploymentType(str, Enum):
    single_gpu = "single_gpu"
    single_node = "single_node"
    multi_node = "multi_node"


class Accelerator(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


class DType(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Stage(str, Enum):
    sft = "sft"
    reward = "reward"
    ppo = "ppo"
    dpo = "dpo"
    grpo = "grpo"


# Every stage kind, in pipeline order. A pipeline runs the subsequence ``PipelineSpec.stage_graph`` picks for its
# ``algorithm``; iterate that wherever a pipeline's own stages are meant.
ALL_STAGES: tuple[Stage, ...] = (Stage.sft, Stage.reward, Stage.ppo, Stage.dpo, Stage.grpo)
# The stages of the default algorithm (ppo): DeepSpeed-Chat's three steps.
STAGE_ORDER: tuple[Stage, ...] = (Stage.sft, Stage.reward, Stage.ppo)
# Which share of ``data.split`` (0, 1, 2: step 1, 2, 3) each stage trains on: dpo on step 2's pairs (DeepSpeed-Chat's
# step2_dpo), grpo on step 3's prompts.
STAGE_INDEX: dict[Stage, int] = {Stage.sft: 0, Stage.reward: 1, Stage.ppo: 2, Stage.dpo: 1, Stage.grpo: 2}


class Algorithm(str, Enum):
    """What follows step 1: ``ppo`` (sft -> reward -> ppo, DeepSpeed-Chat's pipeline), ``dpo`` (sft -> dpo, on
    step 2's preference pairs, no reward model) or ``grpo`` (sft -> [reward ->] grpo: the reward stage only
    when no ``stages.grpo.rewardFunction`` scores the answers)."""

    ppo = "ppo"
    dpo = "dpo"
    grpo = "grpo"


# the last stage of each algorithm: its model is what the pipeline serves
FINAL_STAGE: dict[Algorithm, Stage] = {Algorithm.ppo: Stage.ppo, Algorithm.dpo: Stage.dpo, Algorithm.grpo: Stage.grpo}


class ModelRef(SpecModel):
    """A model: a hub name (facebook/opt-1.3b), a local directory (local runner) or an s3:// / file:// URI."""

    model: str = Field(min_length=1, description="Hub name, local path, or s3:// / file:// URI of an HF model.")
    tokenizer: str | None = Field(default=None, description="Tokenizer location when it differs from model.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) of a hub model "
                                 "name, passed to from_pretrained; also the tokenizer's unless tokenizer is set.")
    dropout: float | None = Field(default=None, ge=0, le=1, description="Override the model's dropout (unset: the "
                                  "model's own in steps 1-2, 0 in step 3 as DeepSpeed-Chat's --disable_actor_dropout).")


class DatasetRef(SpecModel):
    """One dataset. Give ``name`` (a hub dataset, e.g. Dahoas/rm-static) or ``path`` (a local json/jsonl/parquet
    file, a directory laid out like a hub dataset, or an s3:// URI)."""

    name: str | None = Field(default=None, description="Hub dataset name, e.g. Dahoas/rm-static.")
    path: str | None = Field(default=None, description="Local file/directory or s3:// URI with prompt/chosen/rejected.")
    config: str | None = Field(default=None, description="Dataset configuration name (hub datasets).")
    adapter: str | None = Field(default=None, description="For a local copy of a hub dataset: the hub name whose "
                                "columns it has (e.g. Dahoas/rm-static); default: from the path, else the columns.")

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetRef:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of 'name' (hub dataset) or 'path' (file, directory or s3:// URI)")
        return self

    @property
    def key(self) -> str:
        """A stable identifier used for split seeding and caching."""
        return self.name or self.path or ""


_PATHLIKE = re.compile(r"^(\.{0,2}/|~|s3://|file://)|\.(jsonl?|parquet)$")


def _coerce_dataset(value: Any) -> Any:
    # A bare string is a hub name unless it looks like a path or URI.
    if isinstance(value, str):
        return {"path": value} if _PATHLIKE.search(value) else {"name": value}
    return value


class DataSpec(SpecModel):
    datasets: list[DatasetRef] = Field(min_length=1, description="Preference datasets, blended: each a hub name or "
                                       "a path / URI string, or an object {name or path, config, adapter}.")
    split: str = Field(default="2,4,4", description="Share of each dataset for step 1, 2, 3, e.g. '2,4,4'.")
    sft_only: list[DatasetRef] = Field(default_factory=list, description="Datasets used 100% in step 1.")
    unsupervised: DatasetRef | None = Field(default=None, description="Pre-training corpus for ptx in step 3.")
    unsupervised_text_field: str = Field(default="text", description="Column holding the ptx corpus text.")
    max_seq_len: int = Field(default=512, ge=8, description="Max tokens for steps 1 and 2.")
    max_samples: int | None = Field(default=None, ge=1, description="Cap on rows per dataset (quick runs).")
    eval_fraction: float = Field(default=0.1, ge=0, lt=1, description="Held-out share of each stage's slice.")
    seed: int = Field(default=1234, description="Seed for the deterministic split.")
    true_reward: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="Reporting only, never trained on: 'module:function' importable in the stage image, "
        "f(prompt, answer) -> float in [0, 1], the preference the data was made from. Step 3 logs its mean over "
        "each rollout batch (true_reward) and kuberlhf run prints and plots it.")

    @field_validator("datasets", "sft_only", mode="before")
    @classmethod
    def _coerce_list(cls, value: Any) -> Any:
        return [_coerce_dataset(v) for v in value] if isinstance(value, list) else value

    @field_validator("unsupervised", mode="before")
    @classmethod
    def _coerce_one(cls, value: Any) -> Any:
        return _coerce_dataset(value)

    @field_validator("split")
    @classmethod
    def _check_split(cls, value: str) -> str:
        parse_split(value)
        return value

    @property
    def split_weights(self) -> tuple[float, float, float]:
        return parse_split(self.split)


def parse_split(split: str) -> tuple[float, float, float]:
    """'2,4,4' -> (0.2, 0.4, 0.4). Exactly three non-negative numbers with a positive sum."""
    from kuberlhf.contract.rules import SPLIT_FORMAT, split_shares  # the CRD's CEL says the same

    nums = split_shares(split)
    if nums is None or sum(nums) <= 0:
        raise ValueError(f"{SPLIT_FORMAT.text} (got {split!r})")
    total = sum(nums)
    return (nums[0] / total, nums[1] / total, nums[2] / total)


class SecretRef(SpecModel):
    name: str = Field(min_length=1, description="Name of the Secret, in the pipeline's namespace.")


class SecretKeyRef(SpecModel):
    name: str = Field(min_length=1, description="Name of the Secret, in the pipeline's namespace.")
    key: str = Field(default="HF_TOKEN", min_length=1, description="Key of the Secret holding the value.")


class StorageSpec(SpecModel):
    uri: str = Field(pattern=r"^(s3|file)://.+", description="Where every stage's checkpoint goes: s3://bucket/prefix or file:///dir.")
    endpoint: str | None = Field(default=None, description="S3-compatible endpoint URL; omit for AWS S3.")
    region: str | None = Field(default=None, description="S3 region.")
    secret_ref: SecretRef | None = Field(default=None, description="Secret holding the S3 credentials (keys "
                                         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).")
    path_style: bool = Field(default=True, description="Path-style addressing (needed by most S3-compatible stores).")


class LoraSpec(SpecModel):
    dim: int = Field(default=0, ge=0, description="LoRA rank; 0 disables LoRA.")
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha (default: dim).")
    module_name: str = Field(default="decoder.layers.", description="Substring of module names that get LoRA.")
    only_optimize_lora: bool = Field(default=False, description="Freeze everything but the LoRA weights.")
    learning_rate: float | None = Field(default=None, gt=0, description="Learning rate of the LoRA weights.")


class EnvVar(SpecModel):
    name: str = Field(min_length=1, description="Variable name.")
    value: str = Field(default="", description="Variable value.")


POD_SPEC_MARKER = "x-kuberlhf-pod-spec"  # the CRD generator puts the upstream PodSpec schema here


class PodTemplateMetadata(SpecModel):
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")


class PodTemplate(SpecModel):
    """A Kubernetes PodTemplateSpec merged into the pods the pipeline makes (rules: kuberlhf.contract.pod)."""

    metadata: PodTemplateMetadata = Field(default_factory=PodTemplateMetadata)
    spec: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={POD_SPEC_MARKER: True},
        description="A Kubernetes PodSpec (every field of core/v1 PodSpec). The operator's container is named "
                    "'trainer'; lists merge by name (containers, initContainers, env, volumes) or path "
                    "(volumeMounts); the trainer's command/args, the contract env and /dev/shm are the operator's.")

    @model_validator(mode="after")
    def _not_owned(self) -> PodTemplate:
        from kuberlhf.contract.pod import owned_conflicts, shape_errors
        from kuberlhf.contract.podspec import pod_spec_errors

        wire = self.to_wire()
        for path, why in shape_errors(wire) + pod_spec_errors(wire.get("spec") or {}):
            raise PydanticCustomError("pod_shape", "{path} {why}", {"path": path, "why": why})
        for path, why in owned_conflicts(wire):
            raise PydanticCustomError("operator_owned", "{path} is set by the operator ({why}); remove it",
                                      {"path": path, "why": why})
        return self


class CommonStageSpec(SpecModel):
    """Settings every stage takes."""

    nodes: int | None = Field(default=None, ge=1, description="Pods (Kubernetes nodes) of this stage.")
    gpus_per_node: int | None = Field(default=None, ge=1, description="Ranks per pod (GPUs, or CPU processes).")
    epochs: int = Field(default=1, ge=1, description="Passes over the stage's data.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    per_device_batch_size: int | None = Field(default=None, ge=1, description="Micro batch per rank.")
    gradient_accumulation_steps: int | None = Field(default=None, ge=1,
                                                    description="Micro batches per optimizer step.")
    learning_rate: float | None = Field(default=None, gt=0, description="Peak learning rate; in ppo, the rate of "
                                        "actor and critic unless actorLearningRate / criticLearningRate are set.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule: linear, cosine, constant or constant_with_warmup.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps.")
    dtype: DType = Field(default=DType.bf16, description="bf16 | fp16 (GPU only) | fp32.")
    offload: bool = Field(default=False, description="ZeRO CPU offload of optimizer state (and params at stage 3).")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward (less "
                                         "memory, about 30% slower).")
    checkpoint_every_steps: int = Field(default=0, ge=0, description="Resumable checkpoint period; 0 = only at the end.")
    background_checkpoint_upload: bool = Field(default=True, description="Save each periodic checkpoint while "
                                               "training continues: training only copies the state to host memory "
                                               "(one checkpoint's share per rank), writing and upload run in a "
                                               "thread, committed once all its files are up; false: training waits "
                                               "for every write and upload.")
    eval_every_steps: int = Field(default=0, ge=0, description="Eval period; 0 = at the end of each epoch.")
    backoff_limit: int = Field(default=2, ge=0, description="Retries of a failed stage (each resumes).")
    seed: int = Field(default=1234, description="Seed of the stage (init, shuffling, sampling).")
    resources: dict[str, Any] = Field(default_factory=dict, description="Kubernetes resources of each stage pod.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables of the stage pods "
                              "(valueFrom: podTemplate.spec.containers[trainer].env).")
    tensorboard: bool = Field(default=False, description="Also write TensorBoard scalars (stored as <stage>/tensorboard/).")
    pod_template: PodTemplate | None = Field(default=None, description="Merged over spec.podTemplate into this "
                                             "stage's pods.")

    @field_validator("env")
    @classmethod
    def _env_not_owned(cls, value: list[EnvVar]) -> list[EnvVar]:
        from kuberlhf.contract.pod import is_owned_env

        for item in value:
            if is_owned_env(item.name):
                raise PydanticCustomError("operator_owned", "{path} is set by the operator ({why}); remove it",
                                          {"path": f"[{item.name}]", "why": "part of the stage contract"})
        return value


class SFTStageSpec(CommonStageSpec):
    zero_stage: int | None = Field(default=None, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3.")
    lora: LoraSpec | None = Field(default=None, description="LoRA of the trained model (dim 0 = off).")
    mask_prompt: bool = Field(default=False, description="SFT loss on the assistant's turns only, not the human's.")


class RewardStageSpec(CommonStageSpec):
    zero_stage: int | None = Field(default=None, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3.")
    lora: LoraSpec | None = Field(default=None, description="LoRA of the trained model (dim 0 = off).")
    # InstructGPT (Ouyang et al. 2022, 3.5) starts its RM from the SFT model; DeepSpeed-Chat from a base model
    init_from_sft: bool = Field(default=False, description="Start from step 1's model (InstructGPT) instead of "
                                "spec.reward, which must then be unset. DeepSpeed-Chat: false.")


class EMASpec(SpecModel):
    enabled: bool = Field(default=True, description="Keep an exponential moving average of the actor (ppo/ema/).")
    beta: float = Field(default=0.992, gt=0, lt=1, description="Decay per actor optimizer step (DeepSpeed-Chat's "
                        "0.992): the average spans about 1 / (1 - beta) optimizer steps whatever the batch settings.")
    warmup: bool = Field(default=True, description="Decay min(beta, (1 + t) / (10 + t)) at optimizer step t "
                         "(TensorFlow's ExponentialMovingAverage num_updates), so a run shorter than the horizon "
                         "does not end with an EMA dominated by the SFT weights; false = DeepSpeed-Chat's constant "
                         "beta.")


class AdaptiveKLSpec(SpecModel):
    enabled: bool = Field(default=False, description="Adapt the KL coefficient towards target.")
    target: float = Field(default=6.0, gt=0, description="Target KL per sequence.")
    horizon: int = Field(default=10000, ge=1, description="Samples over which the KL coefficient adapts.")


class PolicyStageSpec(CommonStageSpec):
    """What the two online step-3 algorithms share (ppo, grpo): the trained actor with its frozen reference and
    EMA copies, experience generation, the clipped policy ratio, the KL anchor and mixed training (ptx)."""

    actor_zero_stage: int | None = Field(default=None, ge=0, le=3, description="ZeRO stage of the actor (and its "
                                         "reference and EMA copies).")
    actor_learning_rate: float | None = Field(default=None, gt=0, description="Actor learning rate.")
    actor_lora: LoraSpec | None = Field(default=None, description="LoRA of the actor.")
    ema: EMASpec = Field(default_factory=EMASpec, description="Exponential moving average of the actor; serving "
                         "uses it.")
    offload_reference_model: bool = Field(default=False, description="Keep the frozen reference model's ZeRO-3 "
                                          "partitions in CPU memory (DeepSpeed-Chat's --offload_reference_model).")
    offload_reward_model: bool = Field(default=False, description="Keep the frozen reward model's ZeRO-3 partitions "
                                       "in CPU memory (DeepSpeed-Chat's --offload_reward_model).")
    ptx_coef: float = Field(default=27.8, ge=0, description="Weight of the pre-training loss (needs data.unsupervised).")
    kl_coef: float = Field(default=0.1, ge=0, description="KL penalty coefficient against the SFT (reference) "
                           "policy.")
    clip_range: float = Field(default=0.2, gt=0, description="Clip range of the policy ratio.")
    reward_clip: float = Field(default=5.0, gt=0, description="Clip of the reward-model score.")
    hybrid_engine: bool | None = Field(default=None, description="DeepSpeed hybrid engine (CUDA only).")
    inference_tp_size: int = Field(default=1, ge=1, description="Tensor parallelism of the hybrid engine's "
                                   "generation (DeepSpeed-Chat's --inference_tp_size; its OPT-66B recipe uses 8): "
                                   "each GPU gathers 1/inferenceTpSize of the actor to generate instead of all of it.")
    generation_batch_size: int | None = Field(default=None, ge=1, description="Prompts per rank per experience batch.")
    max_prompt_len: int = Field(default=256, ge=1, description="Prompt tokens (left-truncated).")
    max_answer_len: int = Field(default=256, ge=1, description="Generated tokens per answer.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of the experience generation.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling of the experience generation.")
    decoder: Literal["auto", "generate", "static"] = Field(
        default="auto", description="How rollouts are sampled: static = kuberlhf's sampling loop over a "
        "pre-allocated KV cache (kuberlhf.rlhf.decode; OPT-family actors at ZeRO 0-2, the same distribution as "
        "generate), generate = transformers' generate (DeepSpeed's when hybridEngine is on); auto = generate "
        "under the hybrid engine, static where the actor supports it, generate otherwise.")
    compile_decoder: bool = Field(
        default=False, description="torch.compile the static decoder's step (on CUDA as a CUDA graph). Off by "
        "default: on a CPU its compile time is not earned back (bench/RESULTS.md), on a GPU it is not measured yet.")


class PPOStageSpec(PolicyStageSpec):
    critic_zero_stage: int | None = Field(default=None, ge=0, le=3, description="ZeRO stage of the critic (and "
                                          "the reward model).")
    critic_learning_rate: float | None = Field(default=None, gt=0, description="Critic learning rate.")
    critic_lora: LoraSpec | None = Field(default=None, description="LoRA of the critic.")
    adaptive_kl: AdaptiveKLSpec = Field(default_factory=AdaptiveKLSpec, description="Adaptive KL controller.")
    clip_range_value: float = Field(default=0.2, gt=0, description="Value-function clip range.")
    gamma: float = Field(default=1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda.")
    ppo_epochs: int = Field(default=1, ge=1, description="PPO epochs per experience batch.")
    whiten_advantages: bool = Field(
        default=False, description="Normalise the advantages of each experience batch to zero mean and unit "
        "variance (PPO implementations' advantage normalisation; DeepSpeed-Chat: off).")
    rollout_batch_size: int | None = Field(
        default=None, ge=1, description="Prompts per rank decoded together, a multiple of generationBatchSize: "
        "the rollout is split into experience batches of generationBatchSize, each one PPO update (OpenRLHF's "
        "rollout batch); default: the largest that fits spec.gpuMemory, at most 4 updates (CPU: "
        "generationBatchSize).")


# ``module:function`` importable in the stage image, or ``<file>.py:function`` with the file a path in the stage
# pod, a file:// URI or an s3:// URI in the pipeline's storage (kuberlhf.rlhf.code_reward)
REWARD_FUNCTION_PATTERN = r"^([A-Za-z_][\w.]*|\S+\.py):[A-Za-z_]\w*$"


class GRPOStageSpec(PolicyStageSpec):
    """Group-relative policy optimisation (DeepSeekMath, Shao et al. 2024): ``groupSize`` answers per prompt,
    each answer's advantage its reward normalised within its group, no critic; the KL to the reference is the
    k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` per token, in the loss with coefficient ``klCoef``."""

    group_size: int = Field(default=4, ge=1, description="Answers sampled per prompt; advantages are normalised "
                            "within each group (2 or more).")
    kl_coef: float = Field(default=0.04, ge=0, description="Coefficient of the k3 KL estimate to the reference "
                           "policy in the loss (DeepSeekMath's beta, 0.04).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group", description="What each answer's reward minus its group's mean is divided by: the group's "
        "standard deviation (DeepSeekMath), the rank's whole batch's (a group whose answers differ only by "
        "reward-model noise is not scaled up to unit advantages), or nothing (Dr. GRPO).")
    reward_zero_stage: int | None = Field(default=None, ge=0, le=3, description="ZeRO stage of the frozen reward "
                                          "model (when no rewardFunction is set).")
    reward_function: str | None = Field(
        default=None, pattern=REWARD_FUNCTION_PATTERN,
        description="f(prompt, answer) -> number scoring answers instead of a reward model (no reward stage then): "
        "'module:function' in the trainer image, or 'FILE.py:function' (a pod path, file:// or s3:// URI). Runs "
        "in the stage pod with its rights.")
    reward_timeout_seconds: float = Field(default=10.0, gt=0, description="Time limit of one rewardFunction "
                                          "call.")


class DPOStageSpec(CommonStageSpec):
    """Direct preference optimisation (Rafailov et al. 2023) as DeepSpeed-Chat's step2_dpo_finetuning: the SFT
    model trained on step 2's (chosen, rejected) pairs against a frozen copy of itself, no reward model."""

    zero_stage: int | None = Field(default=None, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3 (the frozen "
                                   "reference is sharded too at 3).")
    lora: LoraSpec | None = Field(default=None, description="LoRA of the trained model (dim 0 = off).")
    beta: float = Field(default=0.1, gt=0, description="DPO's beta: how far the policy may move from the reference.")
    # le, not lt: a 1.20-1.2x API server checks an integer value (the default 0) against an exclusive maximum
    # truncated to an integer (0.5 -> 0) and refuses the whole CRD.
    label_smoothing: float = Field(default=0.0, ge=0, le=0.5, description="Share of pairs assumed mislabelled "
                                   "(conservative DPO); 0 = plain DPO.")
    offload_reference_model: bool = Field(default=False, description="Keep the frozen reference model's ZeRO-3 "
                                          "partitions in CPU memory (DeepSpeed-Chat's --offload_reference_model).")
    rpo_alpha: float = Field(default=0.0, ge=0, description="Weight of a negative log-likelihood term on the chosen "
                             "answers, per token, added to the DPO loss (RPO, Pang et al. 2024; TRL's rpo_alpha): "
                             "keeps DPO from lowering the chosen answers with the rejected ones. 0 = DeepSpeed-Chat's "
                             "plain DPO.")


class StagesSpec(SpecModel):
    sft: SFTStageSpec = Field(default_factory=SFTStageSpec, description="Step 1: supervised fine-tuning.")
    reward: RewardStageSpec = Field(default_factory=RewardStageSpec, description="Step 2: reward model.")
    ppo: PPOStageSpec = Field(default_factory=PPOStageSpec, description="Step 3: PPO with EMA and ptx.")
    dpo: DPOStageSpec = Field(default_factory=DPOStageSpec, description="After step 1 with algorithm dpo: DPO.")
    grpo: GRPOStageSpec = Field(default_factory=GRPOStageSpec, description="Step 3 with algorithm grpo: GRPO with "
                                "EMA and ptx.")

    def get(self, stage: Stage | str) -> CommonStageSpec:
        return getattr(self, Stage(stage).value)


class ServingSpec(SpecModel):
    enabled: bool = Field(default=True, description="Deploy the chat server after the last stage.")
    replicas: int = Field(default=1, ge=0, description="Chat server replicas.")
    use_ema: bool = Field(default=True, description="Serve the last stage's EMA (ppo/ema/, grpo/ema/: needs "
                            "its ema.enabled), else its model/; dpo keeps no EMA and serves dpo/model/.")
    resources: dict[str, Any] = Field(default_factory=dict, description="Kubernetes resources of the chat pod "
                                     "(add nvidia.com/gpu to serve on a GPU).")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API.")
    max_new_tokens: int = Field(default=256, ge=1, description="Cap on max_tokens per request.")
    api_key_secret_ref: SecretRef | None = Field(default=None, description="Secret with key API_KEY: the key clients "
                                                 "send (Authorization: Bearer). Unset: the operator generates a "
                                                 "Secret <pipeline>-chat-api-key (unless auth is false).")
    auth: bool = Field(default=True, description="Require an API key on /v1 and /metrics (the chat page asks for it); "
                       "false serves without one and the pipeline carries a Warning condition (AuthDisabled).")
    ingress_from: list[dict[str, Any]] = Field(
        default_factory=list, description="NetworkPolicyPeers (podSelector / namespaceSelector / ipBlock) that may "
        "reach the chat port when spec.network.policies is on; empty: the pods of the pipeline's namespace.")
    pod_template: PodTemplate | None = Field(default=None, description="Merged over spec.podTemplate into the chat "
                                             "pods.")

    @model_validator(mode="after")
    def _one_auth(self) -> ServingSpec:
        if not self.auth and self.api_key_secret_ref is not None:
            raise ValueError("auth is false but apiKeySecretRef is set: remove one (auth: false serves without a key)")
        return self


class NetworkSpec(SpecModel):
    """The NetworkPolicies of a pipeline's pods (enforced where the cluster's network plugin supports them)."""

    policies: bool = Field(default=True, description="Isolate the pipeline's pods: a stage attempt's pods talk only "
                           "to each other (rendezvous, NCCL), DNS, the storage endpoint's port and, for hub models or "
                           "datasets, HTTPS; the chat pods accept only their port (serving.ingressFrom).")
    egress: list[dict[str, Any]] = Field(default_factory=list, description="Extra NetworkPolicyEgressRules for every "
                                         "pod of the pipeline, e.g. [{to: [{ipBlock: {cidr: 10.0.0.0/8}}], ports: "
                                         "[{port: 3128}]}] for a proxy.")


class ScratchSpec(SpecModel):
    size: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?([KMGT]i?|k)?$",
                             description="Scratch disk of each stage pod (model downloads, local checkpoints, the "
                             "export) as a quantity; default: the memory planner's estimate for the stage, at least "
                             "2Gi (unsized when the models' configs cannot be read without a download).")
    storage_class_name: str | None = Field(default=None, min_length=1, description="Put the scratch on a generic "
                                           "ephemeral volume of this StorageClass (a PVC made and deleted with the "
                                           "pod; Kubernetes >= 1.21) instead of an emptyDir on the node's disk.")


class PipelineSpec(SpecModel):
    image: str | None = Field(default=None, description="Trainer image; default from the operator's config.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Always / IfNotPresent / Never for every pod of the pipeline.")
    deployment_type: DeploymentType = Field(default=DeploymentType.single_gpu, description="DeepSpeed-Chat preset.")
    accelerator: Accelerator = Field(default=Accelerator.cuda, description="cuda (GPUs) or cpu (tiny models, kind).")
    gpu_memory: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?([KMGT]i?|k)?$",
                                   description="Memory of one GPU as a quantity (48Gi, 40Gi, 80Gi); default 80Gi "
                                   "on cuda. The memory planner checks every stage against it before any Job.")
    actor: ModelRef = Field(description="The model steps 1 and 3 train (the policy).")
    reward: ModelRef | None = Field(default=None, description="The reward model's (and critic's) starting point "
                                    "(algorithms with a reward stage, unless stages.reward.initFromSft).")
    algorithm: Algorithm = Field(default=Algorithm.ppo, description="What follows step 1: ppo (sft -> reward -> "
                                 "ppo), dpo (sft -> dpo) or grpo (sft -> [reward ->] grpo).")
    data: DataSpec = Field(description="Datasets and how they are split across the steps.")
    storage: StorageSpec = Field(description="Object store of every stage's checkpoint.")
    stages: StagesSpec = Field(default_factory=StagesSpec, description="Settings of each stage (only the stages "
                               "of spec.algorithm may be set).")
    pod_template: PodTemplate = Field(default_factory=PodTemplate, description="A Kubernetes PodTemplateSpec "
                                      "merged into every pod of the pipeline (stages and chat).")
    shm_size: str = Field(default="8Gi", description="Size of the memory-backed /dev/shm of every pod (NCCL needs it).")
    scratch: ScratchSpec = Field(default_factory=ScratchSpec, description="The stage pods' scratch volume (their "
                                 "HOME), sized so a checkpoint cannot evict the pod through DiskPressure.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="The chat server after the last stage.")
    network: NetworkSpec = Field(default_factory=NetworkSpec, description="NetworkPolicies of the pipeline's pods.")
    suspend: bool = Field(default=False, description="Suspend the running stage (Kueue-compatible).")
    hf_token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a Hugging Face token (gated hub models and datasets): the "
        "stage pods get it as HF_TOKEN by reference (secretKeyRef), the chat pod does not.")

    @model_validator(mode="after")
    def _hf_token_once(self) -> PipelineSpec:
        if self.hf_token_secret_ref is None:
            return self
        from kuberlhf.contract.pod import TRAINER_CONTAINER
        from kuberlhf.contract.stage import ENV_HF_TOKEN

        templates = [("podTemplate", self.pod_template)]
        templates += [(f"stages.{st.value}.podTemplate", self.stages.get(st).pod_template) for st in STAGE_ORDER]
        for at, template in templates:
            for c in ((template.to_wire().get("spec") or {}).get("containers") or []) if template else []:
                if c.get("name") == TRAINER_CONTAINER and any(e.get("name") == ENV_HF_TOKEN for e in c.get("env") or []):
                    raise PydanticCustomError("operator_owned", "{path} is set by the operator ({why}); remove it", {
                        "path": f"{at}.spec.containers[{TRAINER_CONTAINER}].env[{ENV_HF_TOKEN}]",
                        "why": "from spec.hfTokenSecretRef"})
        for st in STAGE_ORDER:
            if any(e.name == ENV_HF_TOKEN for e in self.stages.get(st).env):
                raise PydanticCustomError("operator_owned", "{path} is set by the operator ({why}); remove it", {
                    "path": f"stages.{st.value}.env[{ENV_HF_TOKEN}]", "why": "from spec.hfTokenSecretRef"})
        return self

    @model_validator(mode="after")
    def _fill_presets(self, info: ValidationInfo) -> PipelineSpec:
        from kuberlhf.contract.presets import apply_preset

        if (info.context or {}).get("presets", True):
            apply_preset(self)
        return self

    def to_wire(self) -> dict[str, Any]:
        """As :meth:`SpecModel.to_wire`, with only this pipeline's own stages under ``stages`` (the others can only
        hold their defaults: the preflight refuses anything else)."""
        wire = super().to_wire()
        graph = {st.value for st in self.stage_graph}
        wire["stages"] = {k: v for k, v in wire.get("stages", {}).items() if k in graph}
        return wire

    @property
    def stage_graph(self) -> tuple[Stage, ...]:
        """The stages this pipeline runs, in order (then serving)."""
        if self.algorithm is Algorithm.dpo:
            return (Stage.sft, Stage.dpo)
        if self.algorithm is Algorithm.grpo:
            return (Stage.sft, Stage.grpo) if self.stages.grpo.reward_function else (Stage.sft, Stage.reward,
                                                                                     Stage.grpo)
        return (Stage.sft, Stage.reward, Stage.ppo)

    @property
    def reward_from_sft(self) -> bool:
        """Whether the reward stage starts from step 1's output (``stages.reward.initFromSft``), not spec.reward:
        its model then has the actor's shape and tokenizer, and it runs after (and depends on) step 1."""
        return self.stages.reward.init_from_sft and Stage.reward in self.stage_graph

    @property
    def final_stage(self) -> Stage:
        """The stage whose model the pipeline serves."""
        return FINAL_STAGE[self.algorithm]

    @property
    def final_ema_enabled(self) -> bool:
        """Whether the final stage keeps an EMA of its model (``<stage>/ema/``): ppo and grpo when enabled."""
        st = self.stages.get(self.final_stage)
        return bool(getattr(st, "ema", None) and st.ema.enabled)


def graph_text(stages: tuple[Stage, ...] | list[Stage]) -> str:
    """'sft -> reward -> ppo': how status and ``kubectl get rlhf`` show a stage graph."""
    return " -> ".join(st.value for st in stages)


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class RLHFPipeline(BaseModel):
    """The whole manifest (apiVersion, kind, metadata, spec); status is the operator's business."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: Literal["kuberlhf.io/v1alpha1"] = Field(default="kuberlhf.io/v1alpha1", alias="apiVersion")
    kind: Literal["RLHFPipeline"] = "RLHFPipeline"
    metadata: ObjectMeta
    spec: PipelineSpec
    status: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"apiVersion": self.api_version, "kind": self.kind}
        out["metadata"] = self.metadata.model_dump(exclude_none=True, exclude_defaults=True)
        out["metadata"]["name"] = self.metadata.name
        out["spec"] = self.spec.to_wire()
        return out


# Fields earlier versions documented but never used: the error says what to do instead of "unknown field".
REMOVED_FIELDS = {
    "extraArgs": "removed: it never reached the stage. Every DeepSpeed-Chat option is a typed field of the stage "
                 "(see `kubectl explain rlhfpipeline.spec.stages`); environment variables go in env",
}


class SpecError(ValueError):
    """A manifest that does not validate; the message names every bad field and how to fix it."""


def format_validation_error(err: ValidationError, root: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after[_fill_presets(), PipelineSpec]",))
        field = f"{root}.{loc}" if root and loc else (loc or root or "<root>")
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and e["loc"] and e["loc"][-1] in REMOVED_FIELDS:
            msg = REMOVED_FIELDS[str(e["loc"][-1])]
        elif e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `kubectl explain rlhfpipeline.spec`)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] in ("operator_owned", "pod_shape"):  # a path inside the field: .spec.containers[trainer]...
            path = e["ctx"]["path"]
            field += path if path.startswith("[") else f".{path}"
            msg = e["ctx"]["why"] if e["type"] == "pod_shape" else f"set by the operator ({e['ctx']['why']}); remove it"
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def parse_pipeline(doc: dict[str, Any] | str) -> RLHFPipeline:
    """Validate a manifest (dict, YAML or JSON text). Raises SpecError naming every bad field."""
    if isinstance(doc, str):
        try:
            # JSON first: the operator reads each stage Job's KUBERLHF_PIPELINE (JSON) on every probe, and the
            # pure-Python YAML loader was 12 % of its CPU at 100 pipelines (bench/operator_bench.py, py-spy)
            doc = json.loads(doc)
        except ValueError:
            try:
                doc = yaml.safe_load(doc)
            except yaml.YAMLError as e:
                raise SpecError(f"the manifest is not valid YAML/JSON: {e}") from None
    if not isinstance(doc, dict):
        raise SpecError("the manifest must be a mapping with apiVersion, kind, metadata and spec")
    try:
        return RLHFPipeline.model_validate(doc)
    except ValidationError as e:
        raise SpecError("invalid RLHFPipeline:\n" + format_validation_error(e)) from None


def parse_spec(spec: dict[str, Any]) -> PipelineSpec:
    """Validate only a spec (what the operator receives from kopf)."""
    try:
        return PipelineSpec.model_validate(spec)
    except ValidationError as e:
        raise SpecError("invalid RLHFPipeline spec:\n" + format_validation_error(e, "spec")) from None


def written_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """What the user wrote, normalised: the spec validated without the presets, dumped without the fields that
    equal their model default (so a default an API server filled in, or a field a release adds with a default,
    is not "written"). Raises SpecError like :func:`parse_spec`."""
    try:
        model = PipelineSpec.model_validate(spec, context={"presets": False})
    except ValidationError as e:
        raise SpecError("invalid RLHFPipeline spec:\n" + format_validation_error(e, "spec")) from None
    return model.model_dump(by_alias=True, exclude_defaults=True, mode="json")


def load_pipeline_file(path: str) -> RLHFPipeline:
    """Read and validate a manifest file; errors say which file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"cannot read pipeline manifest {path}: {e.strerror}") from None
    try:
        return parse_pipeline(text)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
