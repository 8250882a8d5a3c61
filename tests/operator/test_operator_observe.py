"""Summaries of raw API objects, failure text, the object-store probe (real SeaweedFS) and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from operator_sim import FakeKube, secret

from kuberlhf_operator.main import parse_args
from kuberlhf_operator.observe import (
    JobState,
    Observed,
    PodsState,
    failure_detail,
    pod_failure,
    pod_waiting,
    summarize_deployment,
    summarize_job,
    summarize_pods,
)
from kuberlhf_operator.reconcile import PipelineMeta, stages_to_probe
from kuberlhf_operator.storage_probe import probe
from kuberlhf_operator.wakeups import StoreCache
from kuberlhf_operator.writes import status_patch

LABELS = {"kuberlhf.io/pipeline": "tiny", "kuberlhf.io/stage": "sft", "kuberlhf.io/attempt": "2"}


def job(status: dict, spec: dict | None = None, **meta) -> dict:
    return {"metadata": {"name": "tiny-sft-2", "labels": LABELS, **meta},
            "spec": {"completions": 2, "backoffLimit": 0, **(spec or {})}, "status": status}


def pod(name: str, phase: str = "Pending", conditions: list | None = None, waiting: dict | None = None,
        node: str | None = "n1") -> dict:
    statuses = [{"name": "stage", "state": {"waiting": waiting}}] if waiting else []
    return {"metadata": {"name": name}, "spec": {"nodeName": node} if node else {},
            "status": {"phase": phase, "conditions": conditions or [], "containerStatuses": statuses}}


def test_pod_waiting_reasons() -> None:
    unsched = pod("p-0", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                      "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}], node=None)
    assert pod_waiting(unsched) == (
        "Unschedulable", "pod p-0 cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    pull = pod("p-1", waiting={"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x:1"'})
    assert pod_waiting(pull) == ("ImagePullBackOff", 'pod p-1 container stage: ImagePullBackOff: Back-off pulling '
                                                     'image "x:1"')
    assert pod_waiting(pod("p-2", waiting={"reason": "ContainerCreating"}))[0] == "ContainerCreating"
    assert pod_waiting(pod("p-3", node=None)) == ("PodScheduling", "pod p-3 waits to be scheduled")
    assert pod_waiting(pod("p-4", "Running")) is None and pod_waiting(pod("p-5", "Succeeded")) is None


def test_summarize_pods_prefers_the_telling_reason() -> None:
    assert summarize_pods([]) == PodsState()
    creating = pod("a-0", waiting={"reason": "ContainerCreating"})
    bad = pod("b-1", waiting={"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'})
    st = summarize_pods([creating, bad])
    assert (st.total, st.running, st.reason) == (2, 0, "CreateContainerConfigError") and not st.routine
    assert 'secret "s3" not found' in st.message
    assert summarize_pods([creating]).routine
    both = summarize_pods([pod("a-0", "Running"), bad])
    assert (both.total, both.running) == (2, 1)
    gone = {**pod("c-0", "Running"), "metadata": {"name": "c-0", "deletionTimestamp": "t"}}
    assert summarize_pods([gone]) == PodsState()


def test_summarize_job_phases() -> None:
    assert summarize_job(job({"active": 2, "startTime": "t0"})) == JobState(
        "tiny-sft-2", "sft", 2, "Running", start_time="t0")
    done = summarize_job(job({"succeeded": 2, "completionTime": "t1",
                              "conditions": [{"type": "Complete", "status": "True"}]}))
    assert done.phase == "Succeeded" and done.completion_time == "t1"
    assert summarize_job(job({"succeeded": 1, "active": 1})).phase == "Running"  # one of two nodes done
    failed = summarize_job(job({"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the limit"}]}))
    assert failed.phase == "Failed" and failed.failure == "BackoffLimitExceeded: Job has reached the limit"
    assert summarize_job(job({"failed": 1})).phase == "Failed"  # before the controller's condition lands
    assert summarize_job(job({}, {"suspend": True})).suspended
    assert summarize_job(job({}, deletionTimestamp="now")).deleting
    assert summarize_job({"metadata": {"name": "x", "labels": {}}}) is None  # not ours


def test_summarize_deployment() -> None:
    d = summarize_deployment({"metadata": {"name": "tiny-chat"}, "spec": {"replicas": 2},
                              "status": {"readyReplicas": 1}})
    assert d.available and d.ready_replicas == 1
    assert not summarize_deployment({"metadata": {"name": "c"}, "spec": {}, "status": {}}).available
    assert summarize_deployment({"metadata": {"name": "c"}, "spec": {"replicas": 0}, "status": {}}).available


def failed_pod(name: str, message: str = "", code: int = 1) -> dict:
    return {"metadata": {"name": name}, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "stage", "state": {"terminated": {"exitCode": code, "reason": "Error", "message": message}}}]}}


def test_failure_detail_prefers_termination_message_then_log() -> None:
    ok = {"metadata": {"name": "p-ok"}, "status": {"phase": "Succeeded"}}
    assert pod_failure(ok) == (None, False)
    text = failure_detail([ok, failed_pod("p-1", "line\n" * 50 + "CUDA out of memory")])
    assert text.startswith("pod p-1 container stage exited with code 1 (Error)")
    assert text.endswith("CUDA out of memory") and text.count("\n") <= 21  # only the tail
    summary, wants_log = pod_failure(failed_pod("p-2"))
    assert wants_log and "exited with code 1" in summary
    assert "Traceback" in failure_detail([failed_pod("p-2")], {"p-2": "a\nTraceback: boom\n"})
    evicted = {"metadata": {"name": "p-3"}, "status": {"phase": "Failed", "reason": "Evicted", "message": "low memory"}}
    assert failure_detail([evicted]) == "pod p-3: Evicted low memory"
    assert failure_detail([ok]) is None


def test_status_patch_nulls_removed_keys() -> None:
    assert status_patch({"a": 1, "b": 2}, {"a": 3}) == {"a": 3, "b": None}


def test_stages_to_probe() -> None:
    obs = Observed(jobs={"t-sft-1": JobState("t-sft-1", "sft", 1, "Succeeded"),
                         "t-reward-1": JobState("t-reward-1", "reward", 1, "Running")})
    assert stages_to_probe({}, obs) == ["sft"]
    assert stages_to_probe({"stages": {"sft": {"phase": "Succeeded"}}}, obs) == []


def test_probe_reads_complete_marker_and_manifest_digest(s3_bucket, s3_env, tmp_path: Path) -> None:
    """Real SeaweedFS: only a committed stage output counts; the digest is the manifest's."""
    from kuberlhf.contract.spec import StorageSpec
    from kuberlhf.contract.stage import StageLayout
    from kuberlhf.storage import ObjectStore

    meta = PipelineMeta("tiny", "team", "uid-9")
    storage = {"uri": f"{s3_bucket}/runs", "endpoint": s3_env.endpoint, "secretRef": {"name": "s3"}}
    spec = {"storage": storage}
    kube = FakeKube(secret("team", "s3", s3_env.credentials_env()))
    layout = StageLayout(storage_uri=storage["uri"], namespace="team", pipeline="tiny", uid="uid-9")
    store = ObjectStore.from_spec(StorageSpec.model_validate(storage))  # the test's own keys: s3_env
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    manifest = store.upload_dir(tmp_path, layout.stage_uri("sft"), producer="sft")
    store.upload_dir(tmp_path, layout.stage_uri("reward"), producer="reward", commit=False)
    obs = Observed(jobs={"tiny-sft-1": JobState("tiny-sft-1", "sft", 1, "Succeeded"),
                         "tiny-reward-1": JobState("tiny-reward-1", "reward", 1, "Succeeded")})
    got = probe(kube, StoreCache(), meta, spec, {}, obs)  # with the keys of the pipeline's secretRef
    assert got["sft"].complete and got["sft"].manifest_sha256 == manifest.sha256 and not got["sft"].error
    assert got["sft"].checkpoint == layout.stage_uri("sft")
    assert not got["reward"].complete and not got["reward"].error


def test_probe_of_an_unreachable_store_reports_an_error() -> None:
    kube = FakeKube(secret("n", "s3", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}))
    obs = Observed(jobs={"t-sft-1": JobState("t-sft-1", "sft", 1, "Succeeded")})
    storage = {"uri": "s3://b/p", "endpoint": "http://127.0.0.1:9", "secretRef": {"name": "s3"}}
    got = probe(kube, StoreCache(), PipelineMeta("t", "n", "u"), {"storage": storage}, {}, obs)
    assert got["sft"].error and not got["sft"].complete


def test_cli_scopes(monkeypatch) -> None:
    monkeypatch.delenv("KUBERLHF_NAMESPACES", raising=False)
    assert parse_args(["-n", "a", "--namespace", "b"]).namespace == ["a", "b"]
    assert parse_args(["--all-namespaces"]).all_namespaces
    with pytest.raises(SystemExit):
        parse_args([])
    with pytest.raises(SystemExit):
        parse_args(["-n", "a", "-A"])
    monkeypatch.setenv("KUBERLHF_NAMESPACES", "x, y")
    args = parse_args([])
    assert args.namespace == ["x", "y"] and args.liveness_port == 8080 and args.metrics_port == 9090
