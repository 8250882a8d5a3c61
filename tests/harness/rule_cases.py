"""Bad specs, one per cross-field rule of ``kuberlhf.contract.rules``, each with the messages it must draw.

Shared by the unit tests (kuberlhf's own checks) and the two-server CRD tier (the API servers), so both judge the
very same documents. Every case is a valid pipeline plus one patch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from kuberlhf.contract.rules import RULES, TRANSITION_RULES, Rule

# single_node: its presets leave no ZeRO stage at 0, so the preset values cannot draw extra offload messages.
VALID: dict[str, Any] = {
    "apiVersion": "kuberlhf.io/v1alpha1",
    "kind": "RLHFPipeline",
    "metadata": {"name": "rules"},
    "spec": {
        "deploymentType": "single_node",
        "actor": {"model": "facebook/opt-1.3b"},
        "reward": {"model": "facebook/opt-350m"},
        "data": {"datasets": ["Dahoas/rm-static"], "split": "2,4,4"},
        "storage": {"uri": "s3://bucket/prefix", "secretRef": {"name": "s3-credentials"}},
    },
}


@dataclass(frozen=True)
class Case:
    name: str
    patch: dict[str, Any]  # deep-merged into spec

    def doc(self) -> dict[str, Any]:
        doc = copy.deepcopy(VALID)
        doc["metadata"]["name"] = self.name
        _merge(doc["spec"], self.patch)
        return doc


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


def _lora_cases() -> list[tuple[str, dict[str, Any], str]]:
    out = []
    for st, key in (("sft", "lora"), ("reward", "lora"), ("ppo", "actorLora"), ("ppo", "criticLora")):
        short = f"{st}-{key.lower()}"
        field = f"spec.stages.{st}.{key}.onlyOptimizeLora"
        out.append((f"{short}-only-no-dim", {"stages": {st: {key: {"dim": 0, "onlyOptimizeLora": True}}}}, field))
        gc = {"stages": {st: {"gradientCheckpointing": True, key: {"dim": 8, "onlyOptimizeLora": True}}}}
        out.append((f"{short}-only-gc", gc, f"{field}:1"))
    return out


# (name, patch, rule key): the key is Rule.field, plus ":n" for the n-th rule of that field in the table.
_CASES: list[tuple[str, dict[str, Any], str]] = [
    *[
        (f"fp16-cpu-{st}", {"accelerator": "cpu", "stages": {st: {"dtype": "fp16"}}}, f"spec.stages.{st}.dtype")
        for st in ("sft", "reward", "ppo")
    ],
    (
        "hybrid-engine-cpu",
        {"accelerator": "cpu", "stages": {"ppo": {"hybridEngine": True}}},
        "spec.stages.ppo.hybridEngine",
    ),
    *_lora_cases(),
    # ZeRO-2 both sides + hybrid engine + offload, actor without LoRA: DeepSpeed-Chat's refusal (no CEL: presets)
    (
        "ds-chat-unstable",
        {
            "stages": {
                "ppo": {
                    "offload": True,
                    "actorZeroStage": 2,
                    "criticZeroStage": 2,
                    "hybridEngine": True,
                    "actorLora": {"dim": 0},
                }
            }
        },
        "spec.stages.ppo",
    ),
    ("split-format", {"data": {"split": "2;4;4"}}, "spec.data.split"),
    ("split-no-reward", {"data": {"split": "2,0,4"}}, "spec.data.split:1"),
    ("split-no-ppo", {"data": {"split": "2,4,0"}}, "spec.data.split:1"),
    ("split-no-sft", {"data": {"split": "0,4,4"}}, "spec.data.split:2"),
    ("rollout-not-a-multiple", {"stages": {"ppo": {"rolloutBatchSize": 6}}}, "spec.stages.ppo.rolloutBatchSize"),
    (
        "use-ema-without-ema",
        {"stages": {"ppo": {"ema": {"enabled": False}}}, "serving": {"useEma": True}},
        "spec.serving.useEma",
    ),
]


def rule_for(key: str) -> Rule:
    """The rule named ``field`` or ``field:n`` (the n-th rule of that field, table order)."""
    field, _, n = key.partition(":")
    matches = [r for r in RULES if r.field == field]
    return matches[int(n or 0)]


CASES: list[tuple[Case, Rule]] = [(Case(name, patch), rule_for(key)) for name, patch, key in _CASES]


def messages_in(text: str) -> set[str]:
    """The rule texts that occur in an error text (a server's 422, a SpecError, the preflight's problems)."""
    return {r.text for r in (*RULES, *TRANSITION_RULES) if r.text in text}
