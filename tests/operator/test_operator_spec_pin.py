"""Upgrades don't cry wolf: the pin of a started stage covers what the user wrote plus the preset version, so a
release that adds a defaulted field or changes a preset leaves running pipelines quiet, while a real edit of a
started stage is still reported (SpecChangeIgnored) in both situations."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from operator_sim import Cluster, complete

from kuberlhf.contract import presets
from kuberlhf.contract.spec import parse_spec
from kuberlhf_operator.reconcile import get_condition
from kuberlhf_operator.spec_pin import relevant_spec


def ignored(cluster: Cluster) -> str | None:
    """The SpecChangeIgnored message while the condition is True, else None."""
    c = get_condition(cluster.status, "SpecChangeIgnored")
    return c["message"] if c and c["status"] == "True" else None


def job_spec(cluster: Cluster, job: str) -> dict:
    env = cluster.bodies[("Job", job)]["spec"]["template"]["spec"]["containers"][0]["env"]
    return json.loads(next(e["value"] for e in env if e["name"] == "KUBERLHF_PIPELINE"))["spec"]


def test_a_release_that_adds_a_defaulted_field_is_quiet(cluster: Cluster) -> None:
    cluster.step()
    # What the previous release made when sft started: a Job whose resolved spec had no data.evalFraction and no
    # stages.sft.tensorboard yet, and a status hash that covered the whole resolved spec.
    job = cluster.jobs["tiny-sft-1"]
    old = json.loads(job.pipeline)
    del old["spec"]["data"]["evalFraction"], old["spec"]["stages"]["sft"]["tensorboard"]
    cluster.jobs["tiny-sft-1"] = dataclasses.replace(job, pipeline=json.dumps(old))
    old_applied = old["spec"]
    old_hash = hashlib.sha256(
        json.dumps(relevant_spec(old_applied, "sft"), sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    sft = cluster.status["stages"]["sft"]
    for key in ("presetVersion", "writtenSpec"):
        sft.pop(key)
    sft.update(specHash=old_hash)
    # After the upgrade the API server fills the new fields' CRD defaults into the stored spec.
    cluster.spec["data"]["evalFraction"] = 0.1
    cluster.spec["stages"]["sft"]["tensorboard"] = False
    new_resolved = relevant_spec(parse_spec(cluster.spec).to_wire(), "sft")
    assert new_resolved != relevant_spec(old_applied, "sft")  # a hash of the resolved spec would have moved
    d = cluster.step(generation=2)
    assert ignored(cluster) is None and "SpecChangeIgnored" not in [e.reason for e in d.events]
    assert cluster.status["stages"]["sft"]["presetVersion"] == presets.preset_version()  # re-pinned
    # ... and a real edit is still caught, through the new pin
    cluster.spec["stages"]["sft"]["epochs"] = 3
    d = cluster.step(generation=3)
    assert "spec.stages.sft.epochs (started: sft)" in ignored(cluster)
    assert [e.reason for e in d.events] == ["SpecChangeIgnored"]


def test_a_release_that_changes_a_preset_is_quiet(cluster: Cluster, monkeypatch) -> None:
    cluster.step()
    started_with = cluster.status["stages"]["sft"]["presetVersion"]
    monkeypatch.setitem(presets.PRESETS["single_node"]["sft"], "per_device_batch_size", 8)
    monkeypatch.setitem(presets.PRESETS["single_node"]["reward"], "learning_rate", 1e-5)
    assert presets.preset_version() != started_with
    d = cluster.step(generation=2)
    assert ignored(cluster) is None and d.events == []
    # the running stage keeps the recipe it started with (a retry too); a stage that starts later gets the new one
    cluster.finish("tiny-sft-1", "Failed", failure="x")
    cluster.step()
    assert job_spec(cluster, "tiny-sft-2")["stages"]["sft"]["perDeviceBatchSize"] == 4
    cluster.finish("tiny-sft-2")
    cluster.step(complete("sft"))
    assert job_spec(cluster, "tiny-reward-1")["stages"]["reward"]["learningRate"] == 1e-5
    assert cluster.status["stages"]["reward"]["presetVersion"] == presets.preset_version() != started_with
    assert ignored(cluster) is None
    # ... and a real edit of a started stage is still caught under the changed preset
    cluster.spec["deploymentType"] = "multi_node"
    cluster.step(generation=3)
    assert "spec.deploymentType (started: sft, reward)" in ignored(cluster)


def test_what_counts_as_an_edit(cluster: Cluster) -> None:
    cluster.step()
    # writing out a value the stage already runs with is not a change, even where the user did not write it
    cluster.spec["stages"]["sft"]["epochs"] = 1  # the default
    cluster.spec["stages"]["sft"]["perDeviceBatchSize"] = 4  # the single_node preset
    cluster.step(generation=2)
    assert ignored(cluster) is None
    # removing a written field whose resolved value then differs is a change (backoffLimit 1 -> default 2)
    del cluster.spec["stages"]["sft"]["backoffLimit"]
    cluster.step(generation=3)
    assert "spec.stages.sft.backoffLimit" in ignored(cluster)
    cluster.spec["stages"]["sft"]["backoffLimit"] = 1  # put back: in sync again
    cluster.step(generation=4)
    assert ignored(cluster) is None
    assert get_condition(cluster.status, "SpecChangeIgnored")["reason"] == "SpecInSync"
