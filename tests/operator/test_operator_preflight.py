"""The preflight in reconcile: a spec that validates but cannot run (DeepSpeed combinations, dtype vs accelerator,
LoRA settings, dataset and model references) is InvalidSpec with the field and the fix, before any child
exists, reported once, never retried; fixing the spec starts the pipeline."""

from __future__ import annotations

from typing import Any

import pytest
from operator_sim import Cluster

from kuberlhf_operator.reconcile import get_condition


def _set(path: str, value: Any):
    def mutate(spec: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


BAD = [
    (_set("stages.sft.dtype", "fp16"), "spec.stages.sft.dtype"),  # the fixture runs on cpu
    (_set("stages.ppo.hybridEngine", True), "spec.stages.ppo.hybridEngine"),
    (_set("stages.reward.lora", {"onlyOptimizeLora": True}), "spec.stages.reward.lora.onlyOptimizeLora"),
    (_set("stages.ppo.offload", True), "spec.stages.ppo"),  # + cuda below: DeepSpeed-Chat's unstable combination
    (_set("stages.sft.zeroStage", 0), "spec.stages.sft.offload"),  # + offload below
    (_set("data.split", "10,0,0"), "spec.data.split"),
    (_set("data.datasets", ["kuberlhf/synthetic-typo"]), "spec.data.datasets[0].name"),
    (_set("data.datasets", [{"path": "s3://bucket"}]), "spec.data.datasets[0].path"),
    (_set("actor.model", "s3://a/m"), "spec.actor.model"),
]


@pytest.mark.parametrize(("mutate", "field"), BAD, ids=[f for _, f in BAD])
def test_a_spec_that_cannot_run_creates_nothing(spec: dict[str, Any], meta, mutate, field: str) -> None:
    mutate(spec)
    if field == "spec.stages.ppo":
        spec["accelerator"] = "cuda"
    if field == "spec.stages.sft.offload":
        spec["stages"]["sft"]["offload"] = True
    cluster = Cluster(meta, spec)
    d = cluster.step()
    st = cluster.status
    assert d.actions == [], "no Service or Job may exist for a spec that cannot run"
    assert (st["phase"], st["reason"]) == ("Failed", "InvalidSpec")
    assert f"{field}:" in st["message"] and "fix:" in st["message"]
    assert get_condition(st, "Failed")["message"] == st["message"]
    assert [e.reason for e in d.events] == ["InvalidSpec"] and field in d.events[0].message
    # not retried: the same spec decides the same, with no new event and still no children
    d = cluster.step()
    assert d.actions == [] and d.events == [] and cluster.status["reason"] == "InvalidSpec"


def test_fixing_the_spec_starts_the_pipeline(cluster: Cluster) -> None:
    cluster.spec["stages"]["sft"]["dtype"] = "fp16"
    cluster.step()
    assert cluster.status["reason"] == "InvalidSpec"
    cluster.spec["stages"]["sft"]["dtype"] = "bf16"
    d = cluster.step(generation=2)
    assert ("create", "Job", "tiny-sft-1") in [(a.verb, a.kind, a.name) for a in d.actions]
    assert cluster.status["phase"] == "Pending" and get_condition(cluster.status, "Failed")["status"] == "False"
