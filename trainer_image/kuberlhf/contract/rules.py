"""Cross-field rules of the RLHFPipeline spec, defined once: the CRD generator turns each rule's ``cel`` into an
``x-kubernetes-validations`` entry at the schema node ``at`` (API servers with CEL reject the spec on write), and
:func:`kuberlhf.contract.preflight.preflight` evaluates the same rule's ``ok`` on the validated spec (the
operator's reconcile on any server, ``kuberlhf run``, ``kuberlhf train``). Both report :attr:`Rule.text`, so a bad
spec gets the same message from ``kubectl apply`` on a current server as from the operator's ``InvalidSpec``.

A rule whose fields the deployment-type presets can fill has ``cel=None``: the API server sees only what the user
wrote, so only the preflight (which sees the resolved spec) can decide it.

CEL expressions see the object after the server applied the CRD defaults, so ``has()`` guards only fields (and
parent objects) without a schema default. A rule also has ``cel=None`` where CEL cannot type a field it needs
(``data.sftOnly``: its entries are a string or an object).

:data:`TRANSITION_RULES` judge an update (``oldSelf`` in CEL): what may not change once the pipeline started. The
server enforces them on every write; kuberlhf's half, :func:`update_problems`, takes the old and new objects.

``tests/contract/test_rules.py`` and the two-server tier ``tests/e2e/test_crd_servers.py`` feed the same bad
specs (``tests/harness/rule_cases.py``) to both halves and compare the messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

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
        cel=(f"self.accelerator == 'cuda' || !({_has('stages', stage, 'dtype')}) || "
             f"self.stages.{stage}.dtype != 'fp16'"),
    )


_LORA_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("sft", "lora", "lora"),
    ("reward", "lora", "lora"),
    ("ppo", "actor_lora", "actorLora"),
    ("ppo", "critic_lora", "criticLora"),
    ("dpo", "lora", "lora"),
    ("grpo", "actor_lora", "actorLora"),
)


def _hybrid_cpu_rule(stage: str) -> Rule:
    field = f"spec.stages.{stage}.hybridEngine"
    return Rule(
        field=field,
        message="the DeepSpeed hybrid engine needs CUDA GPUs and spec.accelerator is cpu",
        fix=f"set {field} to false (or leave it unset), or spec.accelerator to cuda",
        ok=lambda s: not (s.accelerator.value == "cpu" and s.stages.get(stage).hybrid_engine),
        cel=(f"self.accelerator == 'cuda' || !({_has('stages', stage, 'hybridEngine')}) || "
             f"!self.stages.{stage}.hybridEngine"),
    )


def _graph(s: PipelineSpec) -> str:
    from kuberlhf.contract.spec import graph_text

    return graph_text(s.stage_graph)


def _cel_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # always with a '.' or an exponent: a CEL double
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return "'" + value + "'"
    raise TypeError(f"no CEL literal for {value!r}")


def untouched_cel(model: type[BaseModel], path: str) -> list[str]:
    """CEL conditions, true when the object at ``self.<path>`` holds only what the server's defaults put there (the
    CRD's defaults are the model's): a field without a schema default is absent (or, for a list or map, empty),
    a scalar with one equals it, a nested model with a default factory (schema default ``{}``) is untouched in
    turn. Mirrors ``model == type(model)()`` of the preflight, except that an explicitly empty free-form map
    (``resources: {}``) counts as written on the server."""
    from pydantic_core import PydanticUndefined

    out = []
    for name, f in model.model_fields.items():
        ref = f"self.{path}.{f.alias or name}"
        if f.default is PydanticUndefined:
            made = f.default_factory()  # type: ignore[misc]
            if isinstance(made, BaseModel):
                out.extend(untouched_cel(type(made), f"{path}.{f.alias or name}"))
            elif isinstance(made, list):  # no schema default
                out.append(f"(!has({ref}) || size({ref}) == 0)")
            else:  # a free-form map (resources): CEL has no size() of it, so an explicit {} counts as written
                out.append(f"!has({ref})")
        elif f.default is None:
            out.append(f"!has({ref})")
        elif f.default == "":
            out.append(f"(!has({ref}) || {ref} == '')")  # the CRD drops an empty-string default
        else:
            default = f.default.value if isinstance(f.default, Enum) else f.default
            out.append(f"{ref} == {_cel_literal(default)}")
    return out


# When each stage outside ppo's graph runs (CEL over spec): the graph of algorithm ppo | dpo | grpo
_IN_GRAPH_CEL = {
    "reward": "self.algorithm == 'ppo' || (self.algorithm == 'grpo' && !(" + _has("stages", "grpo", "rewardFunction")
              + "))",
    "ppo": "self.algorithm == 'ppo'",
    "dpo": "self.algorithm == 'dpo'",
    "grpo": "self.algorithm == 'grpo'",
}


def _stage_outside_graph(stage: str) -> Rule:
    """Settings of a stage the algorithm does not run (``dpo`` with reward-stage settings, ``ppo`` with grpo
    settings...) would be silently ignored: refuse them. The presets fill only the pipeline's own stages, so a
    stage outside the graph differs from its defaults only where the user wrote something; on the server, the
    CRD's defaults (the models' own) are all a stage outside the graph may hold, so CEL can tell what the user
    wrote apart from them field by field (``untouched_cel``; writing a default's own value passes both halves)."""
    from kuberlhf.contract.spec import StagesSpec

    field = f"spec.stages.{stage}"
    runs = {"reward": "ppo, or grpo without stages.grpo.rewardFunction", "ppo": "ppo", "dpo": "dpo", "grpo": "grpo"}

    def ok(s: PipelineSpec) -> bool:
        from kuberlhf.contract.spec import Stage

        st = s.stages.get(stage)
        return Stage(stage) in s.stage_graph or st == type(st)()

    model = StagesSpec.model_fields[stage].annotation
    untouched = " && ".join(untouched_cel(model, f"stages.{stage}"))  # type: ignore[arg-type]
    return Rule(
        field=field,
        message=f"is set, but spec.algorithm's pipeline has no {stage} stage (only algorithm {runs[stage]} runs "
        "one), so these settings would be ignored",
        fix=f"remove {field}, or set spec.algorithm to the algorithm they are for",
        ok=ok,
        cel=f"{_IN_GRAPH_CEL[stage]} || !({_has('stages', stage)}) || ({untouched})",
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


# data.split as written: three non-negative numbers. CEL's matches() is RE2; no backslashes, so no quoting issues.
_NUMBER = "[0-9]+([.][0-9]+)?"
SPLIT_PATTERN = f"^ *{_NUMBER} *, *{_NUMBER} *, *{_NUMBER} *$"


def split_shares(split: str) -> tuple[float, float, float] | None:
    """The three numbers of data.split, or None when it is not three non-negative numbers."""
    if not re.match(SPLIT_PATTERN, split):
        return None
    a, b, c = (float(p) for p in split.split(","))
    return a, b, c


def _shares_cel(*indices: int) -> str:
    return " && ".join(f"double(self.data.split.split(',')[{i}].trim()) > 0.0" for i in indices)


def _share_cel(*indices: int) -> str:
    return f"!self.data.split.matches('{SPLIT_PATTERN}') || ({_shares_cel(*indices)})"


# The shares a dpo/grpo pipeline trains on after step 1 (as _graph_shares): dpo step 2's pairs; grpo step 3's
# prompts, and step 2's pairs too when a reward model scores it (no stages.grpo.rewardFunction).
_GRAPH_SHARES_CEL = (
    f"self.algorithm == 'ppo' || !self.data.split.matches('{SPLIT_PATTERN}') || "
    f"(self.algorithm == 'dpo' ? {_shares_cel(1)} : ({_has('stages', 'grpo', 'rewardFunction')}) ? "
    f"{_shares_cel(2)} : ({_shares_cel(1, 2)}))"
)


def _graph_shares(s: PipelineSpec) -> tuple[int, ...]:
    """The data.split shares the pipeline's stages after step 1 train on (step 1's has its own rule)."""
    from kuberlhf.contract.spec import STAGE_INDEX, Stage

    return tuple(sorted({STAGE_INDEX[st] for st in s.stage_graph if st is not Stage.sft}))


def _shares_ok(s: PipelineSpec, *indices: int) -> bool:
    shares = split_shares(s.data.split)
    return shares is None or all(shares[i] > 0 for i in indices)


def _lora_vs_checkpointing(stage: str, attr: str, wire: str) -> Rule:
    base = f"spec.stages.{stage}"

    def ok(s: PipelineSpec) -> bool:
        lora = _lora(s, stage, attr)
        return (
            lora is None
            or not lora.only_optimize_lora
            or lora.dim == 0
            or not s.stages.get(stage).gradient_checkpointing
        )

    return Rule(
        field=f"{base}.{wire}.onlyOptimizeLora",
        message=f"onlyOptimizeLora with {base}.gradientCheckpointing leaves the checkpointed LoRA layers without "
        "gradients (their frozen inputs need none; DeepSpeed-Chat refuses the pair)",
        fix=f"set {base}.{wire}.onlyOptimizeLora or {base}.gradientCheckpointing to false",
        ok=ok,
        at=base,
        cel=(f"!has(self.{wire}) || !self.{wire}.onlyOptimizeLora || self.{wire}.dim == 0 || "
             "!self.gradientCheckpointing"),
    )


def _use_ema_rule(stage: str) -> Rule:
    # dpo keeps no EMA: serving.useEma does not apply to it (it serves dpo/model/)
    return Rule(
        field="spec.serving.useEma",
        message=f"serving the EMA weights ({stage}/ema/) needs spec.stages.{stage}.ema.enabled, which is false",
        fix=f"set spec.stages.{stage}.ema.enabled to true, or spec.serving.useEma to false to serve {stage}/model/",
        ok=lambda s: not (s.algorithm.value == stage and s.serving.enabled and s.serving.use_ema
                          and not s.stages.get(stage).ema.enabled),
        cel=(f"self.algorithm != '{stage}' || !self.serving.enabled || !self.serving.useEma || "
             f"!({_has('stages', stage, 'ema', 'enabled')}) || self.stages.{stage}.ema.enabled"),
    )


RULES: tuple[Rule, ...] = (
    *(_fp16_rule(stage) for stage in ("sft", "reward", "ppo", "dpo", "grpo")),
    _hybrid_cpu_rule("ppo"),
    _hybrid_cpu_rule("grpo"),
    *(_lora_only_needs_dim(*f) for f in _LORA_FIELDS),
    Rule(
        field="spec.stages.ppo",
        message="actorZeroStage 2 + criticZeroStage 2 + hybridEngine + offload without actor LoRA is unsupported "
        "(DeepSpeed-Chat refuses it: training is unstable)",
        fix="give the actor LoRA (spec.stages.ppo.actorLora.dim 128), or use ZeRO stage 3, or set "
        "spec.stages.ppo.offload or hybridEngine to false",
        ok=_ds_chat_unstable,  # ZeRO stages, hybridEngine and actorLora come from the presets: no CEL
    ),
    *(_lora_vs_checkpointing(*f) for f in _LORA_FIELDS),
    Rule(
        field="spec.data.split",
        message="must be three comma-separated non-negative numbers, the shares of step 1 (SFT), step 2 (reward "
        "model) and step 3 (PPO)",
        fix="write e.g. '2,4,4'",
        ok=lambda s: split_shares(s.data.split) is not None,  # the model refuses it first, with this text
        at="spec.data",
        cel=f"self.split.matches('{SPLIT_PATTERN}')",
    ),
    Rule(
        field="spec.data.split",
        message="steps 2 (reward model) and 3 (PPO) each need a positive share of the data",
        fix="give the second and third numbers of spec.data.split a value above 0, e.g. '2,4,4'",
        ok=lambda s: s.algorithm.value != "ppo" or _shares_ok(s, 1, 2),
        cel=f"self.algorithm != 'ppo' || {_share_cel(1, 2)}",
    ),
    Rule(
        field="spec.data.split",
        message="step 1 (SFT) gets no data: its share is 0 and spec.data.sftOnly lists no datasets",
        fix="give the first number of spec.data.split a value above 0, e.g. '2,4,4', or list step-1 datasets in "
        "spec.data.sftOnly",
        ok=lambda s: _shares_ok(s, 0) or bool(s.data.sft_only),  # CEL cannot type sftOnly's entries: no CEL
    ),
    Rule(
        field="spec.data.split",
        message="a stage of spec.algorithm's pipeline gets no data: dpo (like the reward model) trains on the "
        "second share, step 2's pairs, and grpo on the third, step 3's prompts",
        fix="give that stage's share of spec.data.split a value above 0, e.g. '2,8,0' for dpo, '2,0,8' for grpo "
        "with a rewardFunction, '2,4,4' for grpo with a reward model",
        ok=lambda s: s.algorithm.value == "ppo" or _shares_ok(s, *_graph_shares(s)),
        cel=_GRAPH_SHARES_CEL,
    ),
    *(_use_ema_rule(stage) for stage in ("ppo", "grpo")),
    *(_stage_outside_graph(stage) for stage in ("reward", "ppo", "dpo", "grpo")),
    Rule(
        field="spec.stages.ppo.rolloutBatchSize",
        message="must be a multiple of spec.stages.ppo.generationBatchSize (a rollout is split into experience "
        "batches of generationBatchSize prompts, one PPO update each)",
        fix="set rolloutBatchSize to a multiple of generationBatchSize, or leave it unset (= generationBatchSize)",
        # generationBatchSize comes from the presets: no CEL
        ok=lambda s: s.stages.ppo.rollout_batch_size is None
        or s.stages.ppo.rollout_batch_size % (s.stages.ppo.generation_batch_size or 1) == 0,
    ),
    Rule(
        field="spec.reward",
        message="is missing, and the pipeline trains a reward model from it (algorithm ppo, or grpo without "
        "spec.stages.grpo.rewardFunction)",
        fix="give spec.reward.model (e.g. facebook/opt-350m), or start it from step 1's model with "
        "spec.stages.reward.initFromSft: true, or score grpo answers with spec.stages.grpo.rewardFunction, or set "
        "spec.algorithm to dpo",
        ok=lambda s: s.reward is not None or s.reward_from_sft or "reward" not in {st.value for st in s.stage_graph},
    ),
    Rule(
        field="spec.reward",
        message="is set, but the pipeline has no reward stage (algorithm dpo, or grpo with "
        "spec.stages.grpo.rewardFunction), so it would be ignored",
        fix="remove spec.reward, or set spec.algorithm to ppo (or unset spec.stages.grpo.rewardFunction)",
        ok=lambda s: s.reward is None or "reward" in {st.value for st in s.stage_graph},
    ),
    Rule(
        field="spec.reward",
        message="is set, but spec.stages.reward.initFromSft starts the reward model from step 1's model, so it "
        "would be ignored",
        fix="remove spec.reward, or set spec.stages.reward.initFromSft to false",
        ok=lambda s: s.reward is None or not s.reward_from_sft,  # preflight only: the CRD's size
    ),
    Rule(
        field="spec.stages.grpo.groupSize",
        message="must be 2 or more: GRPO normalises each answer's reward within its prompt's group, and a group "
        "of one answer gives every advantage 0 (nothing is learned)",
        fix="set spec.stages.grpo.groupSize to 2 or more (DeepSeekMath samples 64; 4-16 is common)",
        ok=lambda s: s.algorithm.value != "grpo" or s.stages.grpo.group_size >= 2,
        cel=f"self.algorithm != 'grpo' || !({_has('stages', 'grpo', 'groupSize')}) || self.stages.grpo.groupSize >= 2",
    ),
)
SPLIT_FORMAT = next(r for r in RULES if r.cel and "matches" in r.cel and r.field == "spec.data.split")


# --- what may not change once the pipeline has started ------------------------------------------------------------

_WATCHED = ("sft", "reward", "ppo", "serving")  # sft starts first in every algorithm's graph


@dataclass(frozen=True)
class TransitionRule:
    """A rule on an update: ``ok(new, old)`` over the whole objects as plain dicts; ``cel`` uses ``oldSelf``."""

    field: str
    message: str
    fix: str
    ok: Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
    at: str
    cel: str

    @property
    def text(self) -> str:
        return f"{self.field}: {self.message}; fix: {self.fix}"


def started(obj: Mapping[str, Any]) -> bool:
    """The operator records a stage's startTime in status when it first starts it."""
    stages = (obj.get("status") or {}).get("stages") or {}
    return any((stages.get(st) or {}).get("startTime") for st in _WATCHED)


_STARTED_CEL = " || ".join(
    f"(has(oldSelf.status.stages.{st}) && has(oldSelf.status.stages.{st}.startTime))" for st in _WATCHED
)

TRANSITION_RULES: tuple[TransitionRule, ...] = (
    TransitionRule(
        field="spec.storage",
        message="cannot change once the pipeline has started (status.stages.*.startTime is set): its checkpoints "
        "are in the old storage",
        fix="put the old spec.storage back, or create a new RLHFPipeline for the new storage",
        ok=lambda new, old: (
            not started(old) or (new.get("spec") or {}).get("storage") == (old.get("spec") or {}).get("storage")
        ),
        at="",
        cel=f"!has(oldSelf.status) || !has(oldSelf.status.stages) || !({_STARTED_CEL}) || "
        "self.spec.storage == oldSelf.spec.storage",
    ),
)


def update_problems(new: Mapping[str, Any], old: Mapping[str, Any]) -> list[TransitionRule]:
    """The transition rules an update from ``old`` to ``new`` (whole objects) breaks."""
    return [r for r in TRANSITION_RULES if not r.ok(new, old)]


# --- for the CRD generator and the docs ------------------------------------------------------------------------

DOCS_BEGIN, DOCS_END = "<!-- rules table: begin (generated) -->", "<!-- rules table: end -->"


def cel_rules_at(at: str) -> list[dict[str, str]]:
    """The x-kubernetes-validations of the schema node ``at``: every rule there that CEL can express."""
    return [{"rule": r.cel, "message": r.text} for r in (*RULES, *TRANSITION_RULES) if r.at == at and r.cel]


def rule_nodes() -> list[str]:
    """The schema nodes that carry CEL rules, in table order."""
    return list(dict.fromkeys(r.at for r in (*RULES, *TRANSITION_RULES) if r.cel))


def docs_block() -> str:
    """The docs' list of the rules (between DOCS_BEGIN and DOCS_END in docs/kubernetes.md)."""
    lines = [DOCS_BEGIN, "", "| Rule | Checked by |", "|---|---|"]
    for r in (*RULES, *TRANSITION_RULES):
        by = "API server (CEL) and kuberlhf" if r.cel else "kuberlhf (preflight)"
        lines.append(f"| {r.text.replace('|', '/')} | {by} |")
    return "\n".join([*lines, "", DOCS_END])
