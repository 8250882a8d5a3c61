"""The planner as a preflight check: a stage whose per-GPU estimate exceeds ``spec.gpuMemory`` is a problem
naming the stage, the estimate and the cheapest change that makes it fit.

Candidate fixes, cheapest first (each tried alone, then together, on a copy of the spec): a higher ZeRO stage
(more communication, same results), the hybrid engine's tensor-parallel generation, gradient checkpointing (~30 % more compute), CPU offload (slower steps),
LoRA on the trained models (a different fine-tune), and last more nodes (more hardware) at ZeRO-3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from kuberlhf.planner.estimate import GiB, PipelinePlan, StageEstimate, estimate_pipeline, parse_quantity
from kuberlhf.planner.shapes import KNOWN_CONFIGS, ModelShape, read_model_shape, shape_from_config

MAX_NODES = 64


def offline_shape(source: str, field: str, local: bool) -> ModelShape | None:
    """A shape found without the network: the tiny model, the known OPT configs, and (``local``) a local
    directory's config.json; None when only a download could tell (an s3:// model, an unknown hub name)."""
    import os

    from kuberlhf.models.loading import is_tiny

    if is_tiny(source):
        return read_model_shape(source, field)
    if local and os.path.isdir(os.path.expanduser(source)):
        try:
            return read_model_shape(source, field)
        except ValueError:
            return None  # the reference check reports a broken directory
    if source in KNOWN_CONFIGS:
        return shape_from_config(KNOWN_CONFIGS[source], "known OPT config")
    return None


def offline_shapes(spec: Any, local: bool = False) -> dict[str, ModelShape] | None:
    actor = offline_shape(spec.actor.model, "spec.actor.model", local)
    if spec.reward_from_sft:  # step 1's model: the actor's shape
        return None if actor is None else {"actor": actor, "reward": actor}
    if spec.reward is None:  # a pipeline without a reward stage (with one, the rules report the missing model)
        return None if actor is None or "reward" in {st.value for st in spec.stage_graph} else {"actor": actor}
    reward = offline_shape(spec.reward.model, "spec.reward.model", local)
    return None if actor is None or reward is None else {"actor": actor, "reward": reward}


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _set(stage: str, **values: Any) -> Callable[[Any], None]:
    def apply(spec: Any) -> None:
        st = spec.stages.get(stage)
        for k, v in values.items():
            setattr(st, k, v)

    return apply


def _lora_attrs(stage: str) -> tuple[tuple[str, str], ...]:
    """(attribute, wire name) of the stage's LoRA settings."""
    if stage == "ppo":
        return ("actor_lora", "actorLora"), ("critic_lora", "criticLora")
    return (("actor_lora", "actorLora"),) if stage == "grpo" else (("lora", "lora"),)


def _lora(stage: str) -> Callable[[Any], None]:
    def apply(spec: Any) -> None:
        from kuberlhf.contract.spec import LoraSpec

        st = spec.stages.get(stage)
        lora = LoraSpec(dim=128, only_optimize_lora=True)
        for attr, _ in _lora_attrs(stage):
            setattr(st, attr, lora)

    return apply


def _candidates(spec: Any, stage: str) -> list[tuple[str, Callable[[Any], None]]]:
    st = spec.stages.get(stage)
    field = f"spec.stages.{stage}"
    out: list[tuple[str, Callable[[Any], None]]] = []
    policy = stage in ("ppo", "grpo")
    # the second model of ppo/grpo that ZeRO shards: ppo's critic (and reward model), grpo's reward model if any
    has_rm = "reward" in {s.value for s in spec.stage_graph}
    second = {"ppo": ("critic_zero_stage", "criticZeroStage"), "grpo": ("reward_zero_stage", "rewardZeroStage")}
    if policy:
        zeros = {"actor_zero_stage": 3}
        what = f"{field}.actorZeroStage: 3"
        if stage == "ppo" or has_rm:
            attr, wire = second[stage]
            zeros[attr] = 3
            what += f" and {wire}: 3"
        if any((getattr(st, a) or 0) < 3 for a in zeros):
            out.append((what, _set(stage, **zeros)))
    elif (st.zero_stage or 0) < 3:
        out.append((f"{field}.zeroStage: 3", _set(stage, zero_stage=3)))
    if policy and st.hybrid_engine and st.inference_tp_size < (st.gpus_per_node or 1):
        out.append((f"{field}.inferenceTpSize: {st.gpus_per_node}", _set(stage, inference_tp_size=st.gpus_per_node)))
    if not st.gradient_checkpointing:
        out.append((f"{field}.gradientCheckpointing: true", _set(stage, gradient_checkpointing=True)))
    if not st.offload:
        out.append((f"{field}.offload: true", _set(stage, offload=True)))
    if policy and has_rm and not (st.offload_reference_model and st.offload_reward_model):
        out.append(
            (
                f"{field}.offloadReferenceModel: true and offloadRewardModel: true",
                _set(stage, offload_reference_model=True, offload_reward_model=True),
            )
        )
    elif (policy or stage == "dpo") and not has_rm and not st.offload_reference_model:
        out.append((f"{field}.offloadReferenceModel: true", _set(stage, offload_reference_model=True)))
    attrs = _lora_attrs(stage)
    if not all((lr := getattr(st, a)) and lr.dim and lr.only_optimize_lora for a, _ in attrs):
        name = "/".join(w for _, w in attrs)
        out.append((f"{field}.{name}: {{dim: 128, onlyOptimizeLora: true}}", _lora(stage)))
    if policy and (st.generation_batch_size or 1) > 1:  # last: fewer answers decoded together (grpo's groups)
        out.append((f"{field}.generationBatchSize: 1", _set(stage, generation_batch_size=1)))
    return out


def _fits(spec: Any, shapes: dict[str, ModelShape], stage: str) -> StageEstimate:
    return estimate_pipeline(spec, shapes).stage(stage)


def _allowed(spec: Any) -> bool:
    """A suggested spec must pass the cross-field rules (e.g. onlyOptimizeLora excludes gradient checkpointing)."""
    from kuberlhf.contract.rules import RULES

    return all(r.ok(spec) for r in RULES)


def cheapest_fix(spec: Any, shapes: dict[str, ModelShape], stage: str) -> str:
    """The first change (see the module docstring) under which ``stage`` fits, with its estimate."""
    candidates = _candidates(spec, stage)
    for what, apply in candidates:
        trial = spec.model_copy(deep=True)
        apply(trial)
        est = _fits(trial, shapes, stage)
        if est.fits and _allowed(trial):
            return f"set {what} (estimate {_gib(est.per_gpu_bytes)} per GPU)"
    trial = spec.model_copy(deep=True)
    applied = []
    for what, apply in candidates:
        step = trial.model_copy(deep=True)
        apply(step)
        if not _allowed(step):  # e.g. onlyOptimizeLora after gradientCheckpointing: skip it, try the next
            continue
        trial = step
        applied.append(what)
        est = _fits(trial, shapes, stage)
        if est.fits and _allowed(trial):
            return f"set {'; '.join(applied)} (estimate {_gib(est.per_gpu_bytes)} per GPU)"
    base = spec.model_copy(deep=True)
    for _, apply in candidates[:1]:  # more nodes at ZeRO-3 (only ZeRO-3 partitions the weights)
        apply(base)
    st = base.stages.get(stage)
    nodes = st.nodes or 1
    while nodes < MAX_NODES:
        nodes *= 2
        st.nodes = nodes
        est = _fits(base, shapes, stage)
        if est.fits:
            extra = f" with {candidates[0][0]}" if candidates and "ZeroStage" in candidates[0][0] else ""
            return f"set spec.stages.{stage}.nodes: {nodes}{extra} (estimate {_gib(est.per_gpu_bytes)} per GPU)"
    return "use GPUs with more memory (spec.gpuMemory), a smaller model, or shorter sequences"


def pod_memory_limit(spec: Any, stage: str) -> tuple[str, int] | None:
    """``spec.stages.<stage>.resources.limits.memory`` as (the value written, bytes); None when there is none (or
    it is not a quantity: the resource check reports that)."""
    limits = (spec.stages.get(stage).resources or {}).get("limits")
    value = limits.get("memory") if isinstance(limits, dict) else None
    if value is None:
        return None
    try:
        return str(value), parse_quantity(str(value))
    except ValueError:
        return None


def host_problem(spec: Any, shapes: dict[str, ModelShape], est: StageEstimate) -> Any | None:
    """A stage whose CPU offload (optimizer states, ZeRO-3 parameters, frozen offloaded models) cannot fit in its
    pod's memory limit: the kernel would OOM-kill the pod while the optimizer states are created, after the
    models were downloaded and loaded. The fix names the limit that fits, or turning offload off if the GPUs
    hold the stage without it."""
    from kuberlhf.contract.preflight import Problem

    limit = pod_memory_limit(spec, est.stage)
    if not est.cpu_offload_bytes_per_node or limit is None or est.host_bytes_per_pod <= limit[1]:
        return None
    written, _ = limit
    field = f"spec.stages.{est.stage}.resources.limits.memory"
    message = (
        f"{written} is less than the host memory the stage's CPU offload needs (DoesNotFit): the memory planner "
        f"estimates {_gib(est.host_bytes_per_pod)} per pod ({_gib(est.cpu_offload_bytes_per_node)} offloaded "
        f"model states + {_gib(est.host_bytes_per_pod - est.cpu_offload_bytes_per_node)} for "
        f"{est.gpus_per_node} rank processes); the pod would be OOM-killed"
    )
    fix = f"set {field}: {math.ceil(est.host_bytes_per_pod / GiB)}Gi or more"
    trial = spec.model_copy(deep=True)
    st = trial.stages.get(est.stage)
    for attr in ("offload", "offload_reference_model", "offload_reward_model"):
        if hasattr(st, attr):
            setattr(st, attr, False)
    without = _fits(trial, shapes, est.stage)
    if without.fits and _allowed(trial):
        fix += f", or turn CPU offload off (the GPUs hold it: {_gib(without.per_gpu_bytes)} per GPU)"
    return Problem(field, message, fix)


def plan_problems(spec: Any, shapes: dict[str, ModelShape], plan: PipelinePlan | None = None) -> list[Any]:
    """Preflight problems (``kuberlhf.contract.preflight.Problem``) of every stage that does not fit its GPUs,
    or whose CPU offload does not fit its pod's memory limit."""
    from kuberlhf.contract.preflight import Problem

    plan = plan or estimate_pipeline(spec, shapes)
    out = []
    for est in plan.stages:
        host = host_problem(spec, shapes, est)
        if host is not None:
            out.append(host)
        if est.fits is not False:
            continue
        message = (
            f"does not fit (DoesNotFit): the memory planner estimates {_gib(est.per_gpu_bytes)} per GPU "
            f"(model states {_gib(est.states_bytes)}, activations/generation {_gib(est.working_bytes)}, "
            f"runtime {_gib(est.reserve)}) on {est.nodes} x {est.gpus_per_node} GPUs of "
            f"{_gib(est.gpu_memory or 0)} (spec.gpuMemory)"
        )
        out.append(Problem(f"spec.stages.{est.stage}", message, cheapest_fix(spec, shapes, est.stage)))
    return out


def memory_problems(spec: Any, options: Any) -> Iterable[Any]:
    """The preflight check (``kuberlhf.contract.preflight.CHECKS``): pure, so model shapes come only from what
    needs no download (:func:`offline_shapes`); a model it cannot size is left to ``kuberlhf plan``."""
    shapes = offline_shapes(spec, local=getattr(options, "local", False))
    if shapes is None:
        return []
    return plan_problems(spec, shapes)
