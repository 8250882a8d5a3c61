"""DeepSpeed configuration from a stage spec, as a pure function (unit-tested without DeepSpeed).

Mirrors DeepSpeed-Chat's ``get_train_ds_config`` / ``get_eval_ds_config``: the trained models get ZeRO
(0-3), mixed precision, optional CPU offload, gradient accumulation and (actor only, CUDA only) the hybrid
engine; frozen models (reference, reward) get an inference config that shards weights only at ZeRO-3.
Combinations that cannot work raise :class:`DSConfigError` naming the spec field and the fix; the same checks run
before any Job or worker starts (:func:`kuberlhf.contract.preflight.preflight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kuberlhf.contract.spec import CommonStageSpec, DataSpec, spec_default

if TYPE_CHECKING:
    from kuberlhf.contract.preflight import Problem


class DSConfigError(ValueError):
    """A stage setting DeepSpeed cannot run; the message names the manifest field and the fix."""


@dataclass(frozen=True)
class TrainSettings:
    """What the DeepSpeed config needs to know about one trained model of a stage."""

    field: str  # manifest path of the stage, e.g. "spec.stages.sft" (for error messages)
    accelerator: str  # "cuda" | "cpu"
    world_size: int
    micro_batch: int
    grad_accum: int
    zero_stage: int
    dtype: str  # "bf16" | "fp16" | "fp32"
    offload: bool = spec_default(CommonStageSpec, "offload")
    zero_field: str = "zeroStage"
    gradient_clipping: float = 1.0  # DeepSpeed-Chat's GRADIENT_CLIPPING (no spec field)
    hybrid_engine: bool = False  # only the PPO actor's, from spec.stages.ppo.hybridEngine
    max_out_tokens: int = spec_default(DataSpec, "max_seq_len")
    inference_tp_size: int = 1
    tensorboard_dir: str | None = None


def settings_problems(s: TrainSettings) -> list[Problem]:
    """The settings DeepSpeed cannot run, each naming the manifest field and the fix. The accelerator rules (fp16
    and the hybrid engine need CUDA) are cross-field rules of the spec (``kuberlhf.contract.rules``)."""
    from kuberlhf.contract.preflight import Problem

    out: list[Problem] = []
    if s.zero_stage not in (0, 1, 2, 3):
        out.append(Problem(f"{s.field}.{s.zero_field}", f"ZeRO stage {s.zero_stage} does not exist",
                           f"set {s.field}.{s.zero_field} to 0, 1, 2 or 3"))
    if s.world_size < 1 or s.micro_batch < 1 or s.grad_accum < 1:
        out.append(Problem(s.field, "world size, perDeviceBatchSize and gradientAccumulationSteps must be >= 1",
                           f"set {s.field}.nodes, gpusPerNode, perDeviceBatchSize, gradientAccumulationSteps >= 1"))
    if s.dtype not in ("bf16", "fp16", "fp32"):
        out.append(Problem(f"{s.field}.dtype", f"unknown dtype {s.dtype!r}", "use bf16, fp16 (GPU only) or fp32"))
    if s.offload and s.zero_stage == 0:
        out.append(Problem(
            f"{s.field}.offload", f"offload needs ZeRO stage 1, 2 or 3 ({s.field}.{s.zero_field} is 0, which keeps "
            "the optimizer on the device)", f"set {s.field}.{s.zero_field} to 2 or 3, or {s.field}.offload to false"))
    return out


def check_settings(s: TrainSettings) -> None:
    """Raise DSConfigError for settings DeepSpeed cannot run (see :func:`settings_problems`)."""
    problems = settings_problems(s)
    if problems:
        raise DSConfigError("; ".join(str(p) for p in problems))


# ZeRO-3's memory-efficient linear (DeepSpeed's default; DeepSpeed-Chat turns it off): torch's own linear saves the
# gathered weight for the backward, so every parameter gathered in the forward stays resident until the backward
# (measured on OPT-125m, fp32, 2 ranks: ~470 MiB per rank, the ZeRO-3 peak; bench/RESULTS.md section 8). DeepSpeed's
# LinearFunctionForZeroStage3 saves the parameter handle instead, which the backward gathers again. LoRA, gradient
# checkpointing and step 3 (tests/trainer/test_zero3_partitioned.py, test_stages.py) train with it; the hybrid
# engine is CUDA only (hack/gpu-check.sh's ppo-z3-fp16-hybrid-lora case). It replaces
# torch.nn.functional.linear for the whole process, so the frozen models' config sets the same value.
MEMORY_EFFICIENT_LINEAR = True


def _precision(dtype: str) -> dict[str, Any]:
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    if dtype == "fp16":
        return {"fp16": {"enabled": True, "loss_scale_window": 100, "initial_scale_power": 16}}
    return {}


def effective_zero_stage(s: TrainSettings) -> int:
    """The ZeRO stage DeepSpeed runs: ``s.zero_stage``, except that a one-rank fp32 model without offload runs ZeRO 1
    and 2 as ZeRO 0. They partition optimizer state and gradients over the data-parallel ranks, and over one rank there
    is nothing to partition; DeepSpeed still flattens every gradient into its buckets and keeps a flat copy of the
    weights that it copies back each step (bench/sft_bench.py: 0.73x of a bare loop at ZeRO 2 on OPT-125m). ZeRO 0
    computes the same update with less memory. A checkpoint an earlier release wrote at ZeRO 1/2 on one rank still
    resumes (training.zero_resume). bf16/fp16 (their master-weight optimizers differ), offload and the hybrid engine
    keep the configured stage."""
    if (s.world_size == 1 and s.zero_stage in (1, 2) and s.dtype == "fp32" and not s.offload
            and not s.hybrid_engine):
        return 0
    return s.zero_stage


def train_ds_config(s: TrainSettings) -> dict[str, Any]:
    """DeepSpeed config of a trained model (actor, critic, SFT or reward model)."""
    check_settings(s)
    zero: dict[str, Any] = {
        "stage": effective_zero_stage(s),
        "stage3_param_persistence_threshold": 1e4,
        "stage3_max_live_parameters": 3e7,
        "stage3_prefetch_bucket_size": 3e7,
        "memory_efficient_linear": MEMORY_EFFICIENT_LINEAR,
        # without it save_16bit_model writes nothing at ZeRO-3, and the final HF export needs the full weights
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if s.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if s.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_batch_size": s.micro_batch * s.grad_accum * s.world_size,
        "train_micro_batch_size_per_gpu": s.micro_batch,
        "gradient_accumulation_steps": s.grad_accum,
        "steps_per_print": 10**9,  # our own logging (tqdm, metrics.jsonl) reports progress
        "zero_optimization": zero,
        "gradient_clipping": s.gradient_clipping,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        **_precision(s.dtype),
    }
    if s.hybrid_engine:
        config["hybrid_engine"] = {
            "enabled": True,
            "max_out_tokens": s.max_out_tokens,
            "inference_tp_size": s.inference_tp_size,
            "release_inference_cache": False,
            "pin_parameters": True,
            "tp_gather_partition_size": 8,
        }
    if s.tensorboard_dir:
        config["tensorboard"] = {"enabled": True, "output_path": s.tensorboard_dir, "job_name": "deepspeed"}
    return config


# DeepSpeed's default reduce_bucket_size and allgather_bucket_size, in elements
DEEPSPEED_DEFAULT_BUCKET = int(5e8)
# DeepSpeed's default ZeRO-3 sub_group_size, in elements
DEEPSPEED_DEFAULT_SUB_GROUP = int(1e9)
# ZeRO-3 optimizer sub-groups of about this many hidden x hidden weight matrices (a layer or two of a transformer)
SUB_GROUP_MATRICES = 16


def sized_buckets(config: dict[str, Any], hidden_size: int | None) -> dict[str, Any]:
    """``config`` with ZeRO's gradient buckets sized to the model: ``hidden_size ** 2`` elements (transformers'
    rule for ``reduce_bucket_size: auto``), never above DeepSpeed's default; values already set are kept.

    DeepSpeed's fixed 5e8-element buckets suit multi-billion-parameter models; for a small one the ZeRO-3 gradient
    bucket takes every gradient of the step before its first reduce (measured on OPT-125m, fp32, 2 ranks: +744 MiB
    per rank, more than the partitioning saved; ``bench/zero_memory.py``).

    At ZeRO-3 the optimizer's ``sub_group_size`` is sized the same way, ``SUB_GROUP_MATRICES * hidden_size ** 2``
    elements, never above DeepSpeed's 1e9: the step copies each sub-group's gradients into one fp32 buffer, and
    with DeepSpeed's default a small model's whole partition is one sub-group (OPT-125m, fp32, 2 ranks: the copy
    was 209 MiB of the step's peak; ~10 M-element sub-groups cut it to ~40)."""
    zero = dict(config.get("zero_optimization", {}))
    if not hidden_size or int(zero.get("stage", 0)) == 0:
        return config
    size = min(int(hidden_size) ** 2, DEEPSPEED_DEFAULT_BUCKET)
    zero.setdefault("reduce_bucket_size", size)
    if int(zero["stage"]) < 3:  # ZeRO-3 gathers by stage3_prefetch_bucket_size instead
        zero.setdefault("allgather_bucket_size", size)
    else:
        zero.setdefault("sub_group_size", min(SUB_GROUP_MATRICES * int(hidden_size) ** 2, DEEPSPEED_DEFAULT_SUB_GROUP))
    return {**config, "zero_optimization": zero}


def eval_ds_config(s: TrainSettings, offload: bool | None = None) -> dict[str, Any]:
    """DeepSpeed config of a frozen model (reference, reward, EMA): weights sharded only at ZeRO-3, no optimizer.
    ``offload`` (DeepSpeed-Chat's --offload_reference_model / --offload_reward_model; default: the trained twin's
    ``offload``) keeps the ZeRO-3 partitions in CPU memory."""
    check_settings(TrainSettings(**{**s.__dict__, "hybrid_engine": False}))
    offload = s.offload if offload is None else offload
    zero: dict[str, Any] = {"stage": 3 if s.zero_stage == 3 else 0, "stage3_param_persistence_threshold": 1e4,
                            "memory_efficient_linear": MEMORY_EFFICIENT_LINEAR,
                            # the EMA copy is exported and checkpointed from a frozen engine
                            "stage3_gather_16bit_weights_on_model_save": True}
    if offload and s.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": s.micro_batch * s.grad_accum * s.world_size,
        "train_micro_batch_size_per_gpu": s.micro_batch,
        "gradient_accumulation_steps": s.grad_accum,
        "steps_per_print": 10**9,
        "zero_optimization": zero,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        **_precision(s.dtype),
    }


def stage_settings(spec: Any, stage: str, world_size: int, role: str | None = None,
                   tensorboard_dir: str | None = None) -> TrainSettings:
    """TrainSettings of ``stage`` (and for ppo, ``role`` "actor" or "critic"; for grpo "actor" or "reward", the
    frozen reward model) from a PipelineSpec."""
    st = spec.stages.get(stage)
    field = f"spec.stages.{stage}"
    if stage in ("ppo", "grpo"):
        roles = ("actor", "critic") if stage == "ppo" else ("actor", "reward")
        if role not in roles:
            raise ValueError(f"{stage} settings need role={roles[0]!r} or {roles[1]!r}")
        zero_field = f"{role}ZeroStage"
        zero_stage = getattr(st, f"{role}_zero_stage")
        hybrid = _resolved(st.hybrid_engine, f"{field}.hybridEngine") and role == "actor"
        max_out = st.max_prompt_len + st.max_answer_len
        tp_size = st.inference_tp_size
    else:
        zero_field, zero_stage, hybrid, max_out = "zeroStage", st.zero_stage, False, spec.data.max_seq_len
        tp_size = 1
    # every preset-governed value is filled by the spec's validator (kuberlhf.contract.presets): no fallback here
    return TrainSettings(
        field=field, accelerator=spec.accelerator.value, world_size=world_size,
        micro_batch=_resolved(st.per_device_batch_size, f"{field}.perDeviceBatchSize"),
        grad_accum=_resolved(st.gradient_accumulation_steps, f"{field}.gradientAccumulationSteps"),
        zero_stage=_resolved(zero_stage, f"{field}.{zero_field}"), dtype=st.dtype.value, offload=st.offload,
        zero_field=zero_field, hybrid_engine=hybrid, max_out_tokens=max_out, inference_tp_size=tp_size,
        tensorboard_dir=tensorboard_dir)


def _resolved(value: Any, field: str) -> Any:
    if value is None:
        raise DSConfigError(f"{field} is unset: build the spec with PipelineSpec(...)/parse_spec, whose validator "
                            "fills it from the deploymentType preset, or set it")
    return value
