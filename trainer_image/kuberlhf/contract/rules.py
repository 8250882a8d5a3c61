"""Cross-field rules of the RLHFPipeline spec, defined once: the CRD generator turns each rule's ``cel`` into an
``x-kubernetes-validations`` entry at the schema node ``at`` (API servers with CEL reject the spec on write), and
:func:`kuberlhf.contract.preflight.preflight` evaluates the same rule's ``ok`` on the validated spec (the
operator's reconcile on any server, ``kuberlhf run``, ``kuberlhf train``). Both report :attr:`Rule.text`, so a bad
spec gets the same message from ``kubectl apply`` on a current server as from the operator's ``InvalidSpec``.

A rule whose fields the deployment-type presets can fill has ``cel=None``: the API server sees only what the user
wrote, so only the preflight (which sees the resolved spec) can decide it.

CEL expressions see the object after the server applied the CRD defaults, so ``has()`` guards only fields (and
parent objects) without a schema default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kuberlhf.contract.spec import LoraSpec, PipelineSpec


@dataclass(frozen=True)
class Rule:
    field: str  # the manifest field the message is about, e.g. "spec.stages.sft.dtype"
    message: str  # what is wrong
    fix: str  # what to change
    ok: Callable[[PipelineSpec], bool]  # True when the validated (preset-resolved) spec satisfies the rule
    at: str = "spec"  # schema node that carries the CEL rule
    cel: str | None = None  # the same rule in CEL over ``self`` at ``at`` (true = valid); None: preflight only

    @property
    def text(self) -> str:
        """The one message of this rule, in the CRD and in InvalidSpec."""
        return f"{self.field}: {self.message}; fix: {self.fix}"


def _has(*path: str) -> str:
    """CEL guard that every object on ``self.<path>`` exists: has(self.a) && has(self.a.b) ..."""
    return " && ".join(f"has(self.{'.'.join(path[: i + 1])})" for i in range(len(path)))


def _fp16_rule(stage: str) -> Rule:
    field = f"spec.stages.{stage}.dtype"
    return Rule(
        field=field,
        message="fp16 needs CUDA GPUs and spec.accelerator is cpu",
        fix=f"set {field} to bf16 or fp32, or spec.accelerator to cuda",
        ok=lambda s: not (s.accelerator.value == "cpu" and s.stages.get(stage).dtype.value == "fp16"),
        cel=f"self.accelerator == 'cuda' || !({_has('stages', stage, 'dtype')}) || self.stages.{stage}.dtype != 'fp16'",
    )


_LORA_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("sft", "lora", "lora"),
    ("reward", "lora", "lora"),
    ("ppo", "actor_lora", "actorLora"),
    ("ppo", "critic_lora", "criticLora"),
)


def _lora(spec: PipelineSpec, stage: str, attr: str) -> LoraSpec | None:
    return getattr(spec.stages.get(stage), attr)


def _lora_only_needs_dim(stage: str, attr: str, wire: str) -> Rule:
    base = f"spec.stages.{stage}.{wire}"

    def ok(s: PipelineSpec) -> bool:
        lora = _lora(s, stage, attr)
        return lora is None or not lora.only_optimize_lora or lora.dim > 0

    return Rule(
        field=f"{base}.onlyOptimizeLora",
        message="onlyOptimizeLora freezes everything but the LoRA weights, and LoRA is off (dim 0)",
        fix=f"set {base}.dim > 0 (e.g. 128) or {base}.onlyOptimizeLora to false",
        ok=ok,
        at=base,
        cel="!self.onlyOptimizeLora || self.dim > 0",
    )


def _ds_chat_unstable(s: PipelineSpec) -> bool:
    st = s.stages.ppo
    lora = st.actor_lora
    return not (
        st.actor_zero_stage == 2
        and st.critic_zero_stage == 2
        and st.hybrid_engine
        and st.offload
        and (lora is None or lora.dim == 0)
    )


def _split_feeds_every_stage(s: PipelineSpec) -> bool:
    w = s.data.split_weights
    return (w[0] > 0 or bool(s.data.sft_only)) and w[1] > 0 and w[2] > 0


RULES: tuple[Rule, ...] = (
    *(_fp16_rule(stage) for stage in ("sft", "reward", "ppo")),
    Rule(
        field="spec.stages.ppo.hybridEngine",
        message="the DeepSpeed hybrid engine needs CUDA GPUs and spec.accelerator is cpu",
        fix="set spec.stages.ppo.hybridEngine to false (or leave it unset), or spec.accelerator to cuda",
        ok=lambda s: not (s.accelerator.value == "cpu" and s.stages.ppo.hybrid_engine),
        cel=f"self.accelerator == 'cuda' || !({_has('stages', 'ppo', 'hybridEngine')}) || "
        "!self.stages.ppo.hybridEngine",
    ),
    *(_lora_only_needs_dim(*f) for f in _LORA_FIELDS),
    Rule(
        field="spec.stages.ppo",
        message="actorZeroStage 2 + criticZeroStage 2 + hybridEngine + offload without actor LoRA is unsupported "
        "(DeepSpeed-Chat refuses it: training is unstable)",
        fix="give the actor LoRA (spec.stages.ppo.actorLora.dim 128), or use ZeRO stage 3, or set "
        "spec.stages.ppo.offload or hybridEngine to false",
        ok=_ds_chat_unstable,  # ZeRO stages, hybridEngine and actorLora come from the presets: no CEL
    ),
    Rule(
        field="spec.data.split",
        message="every stage needs a positive share of the data (step 1 may instead use data.sftOnly)",
        fix="give steps 2 and 3 (and step 1, unless data.sftOnly is set) a share above 0, e.g. '2,4,4'",
        ok=_split_feeds_every_stage,  # cel: needs the CEL strings library; the CRD generator may add it
    ),
)
