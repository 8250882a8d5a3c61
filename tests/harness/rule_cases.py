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


# the algorithm a stage's rules need: dpo has no reward model (spec.reward set would draw its own message)
ALGORITHM_OF = {"dpo": {"algorithm": "dpo", "reward": None}, "grpo": {"algorithm": "grpo"}}


def _with_algorithm(stage: str, patch: dict[str, Any]) -> dict[str, Any]:
    return {**ALGORITHM_OF.get(stage, {}), **patch}


def _lora_cases() -> list[tuple[str, dict[str, Any], str]]:
    out = []
    for st, key in (("sft", "lora"), ("reward", "lora"), ("ppo", "actorLora"), ("ppo", "criticLora"),
                    ("dpo", "lora"), ("grpo", "actorLora")):
        short = f"{st}-{key.lower()}"
        field = f"spec.stages.{st}.{key}.onlyOptimizeLora"
        only = {"stages": {st: {key: {"dim": 0, "onlyOptimizeLora": True}}}}
        out.append((f"{short}-only-no-dim", _with_algorithm(st, only), field))
        gc = {"stages": {st: {"gradientCheckpointing": True, key: {"dim": 8, "onlyOptimizeLora": True}}}}
        out.append((f"{short}-only-gc", _with_algorithm(st, gc), f"{field}:1"))
    return out


# (name, patch, rule key): the key is Rule.field, plus ":n" for the n-th rule of that field in the table.
_CASES: list[tuple[str, dict[str, Any], str]] = [
    *[
        (f"fp16-cpu-{st}", _with_algorithm(st, {"accelerator": "cpu", "stages": {st: {"dtype": "fp16"}}}),
         f"spec.stages.{st}.dtype")
        for st in ("sft", "reward", "ppo", "dpo", "grpo")
    ],
    *[
        (f"hybrid-engine-cpu-{st}", _with_algorithm(st, {"accelerator": "cpu", "stages": {st: {"hybridEngine": True}}}),
         f"spec.stages.{st}.hybridEngine")
        for st in ("ppo", "grpo")
    ],
    # settings of a stage the algorithm does not run
    ("dpo-with-reward-stage", {"algorithm": "dpo", "reward": None, "stages": {"reward": {"epochs": 2}}},
     "spec.stages.reward"),
    ("dpo-with-ppo-stage", {"algorithm": "dpo", "reward": None, "stages": {"ppo": {"klCoef": 0.2}}},
     "spec.stages.ppo:1"),
    ("ppo-with-dpo-stage", {"stages": {"dpo": {"beta": 0.2}}}, "spec.stages.dpo"),
    ("ppo-with-grpo-stage", {"stages": {"grpo": {"groupSize": 8}}}, "spec.stages.grpo"),
    ("ppo-without-reward-model", {"reward": None}, "spec.reward"),
    ("dpo-with-reward-model", {"algorithm": "dpo"}, "spec.reward:1"),
    ("reward-model-and-init-from-sft", {"stages": {"reward": {"initFromSft": True}}}, "spec.reward:2"),
    ("grpo-group-of-one", {"algorithm": "grpo", "stages": {"grpo": {"groupSize": 1}}}, "spec.stages.grpo.groupSize"),
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
    ("dpo-split-no-pairs", {"algorithm": "dpo", "reward": None, "data": {"split": "2,0,8"}}, "spec.data.split:3"),
    ("grpo-split-no-prompts", {"algorithm": "grpo", "stages": {"grpo": {"rewardFunction": "rewards:score"}},
                               "reward": None, "data": {"split": "2,8,0"}}, "spec.data.split:3"),
    ("grpo-rm-split-no-pairs", {"algorithm": "grpo", "data": {"split": "2,0,8"}}, "spec.data.split:3"),
    ("rollout-not-a-multiple", {"stages": {"ppo": {"rolloutBatchSize": 6}}}, "spec.stages.ppo.rolloutBatchSize"),
    (
        "use-ema-without-ema",
        {"stages": {"ppo": {"ema": {"enabled": False}}}, "serving": {"useEma": True}},
        "spec.serving.useEma",
    ),
    (
        "grpo-use-ema-without-ema",
        {"algorithm": "grpo", "stages": {"grpo": {"ema": {"enabled": False}}}, "serving": {"useEma": True}},
        "spec.serving.useEma:1",
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
