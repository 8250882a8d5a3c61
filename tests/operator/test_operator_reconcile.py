"""The pure reconcile function: every transition, retry, exhaustion, suspend, restart and spec-change path."""

from __future__ import annotations

import copy
import json
from datetime import timedelta

from operator_sim import T0, Cluster, complete

from kuberlhf.contract.rules import TRANSITION_RULES
from kuberlhf_operator.observe import DeploymentState, JobState, Observed, PodsState
from kuberlhf_operator.reconcile import OperatorConfig, ProbeResult, get_condition, reconcile, transition_events


def cond(status: dict, ctype: str) -> dict:
    c = get_condition(status, ctype)
    assert c is not None, f"no condition {ctype} in {status.get('conditions')}"
    return c


def reasons(cluster: Cluster) -> list[str]:
    return [e.reason for e in cluster.events]


def run_to_serving(cluster: Cluster) -> None:
    cluster.step()
    for stage in ("sft", "reward", "ppo"):
        cluster.finish(f"tiny-{stage}-1")
        cluster.step(complete(stage))


def job_spec(cluster: Cluster, job: str) -> dict:
    env = cluster.bodies[("Job", job)]["spec"]["template"]["spec"]["containers"][0]["env"]
    return json.loads(next(e["value"] for e in env if e["name"] == "KUBERLHF_PIPELINE"))["spec"]


def test_happy_path_pending_to_succeeded(cluster: Cluster) -> None:
    d = cluster.step()
    assert [(a.verb, a.kind, a.name) for a in d.actions] == [
        ("create", "NetworkPolicy", "tiny-sft-1"), ("create", "Service", "tiny-sft-1"), ("create", "Job", "tiny-sft-1")]
    st = cluster.status
    assert (st["phase"], st["stage"], st["attempts"]) == ("Pending", "sft", 1)
    assert st["stages"]["sft"]["jobName"] == "tiny-sft-1" and st["stages"]["sft"]["startTime"]
    assert cond(st, "Ready")["status"] == "False"
    cluster.run_pods("tiny-sft-1")
    d = cluster.step()
    assert (cluster.status["phase"], cluster.status["stages"]["sft"]["phase"]) == ("Running", "Running")
    assert [e.reason for e in d.events] == ["StageRunning"] and cluster.step().events == []

    for stage, nxt in (("sft", "reward"), ("reward", "ppo")):
        cluster.finish(f"tiny-{stage}-1")
        d = cluster.step(complete(stage, sha=stage * 4))
        s = cluster.status["stages"][stage]
        assert s["phase"] == "Succeeded"
        assert s["checkpoint"] == f"s3://bucket/pipelines/team/tiny/0000-uid/{stage}"
        assert s["manifestSha256"] == stage * 4 and s["completionTime"] == "2025-01-01T13:00:00Z"
        assert cluster.status["stage"] == nxt and cluster.status["phase"] == "Pending"
        assert ("create", "Job", f"tiny-{nxt}-1") in [(a.verb, a.kind, a.name) for a in d.actions]
        assert stage in d.stage_durations

    assert cond(cluster.status, "SFTSucceeded")["status"] == "True"
    assert cond(cluster.status, "RewardSucceeded")["reason"] == "CheckpointComplete"
    cluster.finish("tiny-ppo-1")
    d = cluster.step(complete("ppo"))
    assert cluster.status["stage"] == "serving" and cluster.status["phase"] == "Running"
    assert {(a.kind, a.name) for a in d.actions} == {("Service", "tiny-chat"), ("Deployment", "tiny-chat"),
                                                     ("NetworkPolicy", "tiny-chat"), ("Secret", "tiny-chat-api-key")}
    assert cluster.status["chatEndpoint"] == "http://tiny-chat.team.svc:8000/v1"
    assert cond(cluster.status, "Serving")["status"] == "False"
    dep = cluster.bodies[("Deployment", "tiny-chat")]
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:4] == ["kuberlhf", "serve", "--model", "s3://bucket/pipelines/team/tiny/0000-uid/ppo/ema"]

    cluster.deployments["tiny-chat"] = DeploymentState("tiny-chat", 1, 1)
    cluster.step()
    st = cluster.status
    assert (st["phase"], st["stage"]) == ("Succeeded", "done")
    assert cond(st, "Ready")["status"] == "True" and cond(st, "Serving")["status"] == "True"
    assert cond(st, "PPOSucceeded")["status"] == "True"
    assert reasons(cluster) == ["StageStarted", "StageRunning", "StageSucceeded", "StageStarted", "StageSucceeded",
                                "StageStarted", "StageSucceeded", "ServingStarted", "Succeeded"]
    # Steady state: nothing more to do, no new events.
    d = cluster.step()
    assert d.actions == [] and d.events == [] and d.status == st


def test_stage_is_pending_until_a_pod_runs_with_the_waiting_reason(cluster: Cluster) -> None:
    cluster.step()
    st = cluster.status
    assert (st["phase"], st["stages"]["sft"]["phase"], st["reason"]) == ("Pending", "Pending", "StageStarted")
    d = cluster.step()  # the Job exists, its controller made no pod yet: the creation message stays
    assert cluster.status["phase"] == "Pending" and "created Job tiny-sft-1" in cluster.status["message"]
    assert d.events == []
    # Starting normally (ContainerCreating): shown in the message, no Event.
    cluster.pods["tiny-sft-1"] = PodsState(1, 0, "ContainerCreating", "pod tiny-sft-1-abc container stage: "
                                                                        "ContainerCreating")
    d = cluster.step()
    assert (cluster.status["reason"], d.events) == ("ContainerCreating", [])
    # No GPU free: the scheduler's message, one Warning Event, not repeated while it stays so.
    unsched = "pod tiny-sft-1-abc cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    cluster.pods["tiny-sft-1"] = PodsState(1, 0, "Unschedulable", unsched)
    d = cluster.step()
    st = cluster.status
    assert (st["phase"], st["stage"], st["reason"]) == ("Pending", "sft", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in st["message"] and "tiny-sft-1" in st["message"]
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "Unschedulable")]
    assert "Insufficient nvidia.com/gpu" in d.events[0].message
    assert cluster.step().events == []
    # The image cannot be pulled: ErrImagePull and ImagePullBackOff alternate; one Event for both.
    cluster.pods["tiny-sft-1"] = PodsState(1, 0, "ErrImagePull", "pod p container stage: ErrImagePull: not found")
    d = cluster.step()
    assert [e.reason for e in d.events] == ["ImagePullBackOff"] and cluster.status["reason"] == "ImagePullBackOff"
    cluster.pods["tiny-sft-1"] = PodsState(1, 0, "ImagePullBackOff", "pod p container stage: ImagePullBackOff")
    assert cluster.step().events == [] and "ImagePullBackOff" in cluster.status["message"]
    # A pod runs: Running, one Normal Event.
    cluster.run_pods("tiny-sft-1")
    d = cluster.step()
    st = cluster.status
    assert (st["phase"], st["stages"]["sft"]["phase"], st["reason"]) == ("Running", "Running", "StageRunning")
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "StageRunning")]
    assert cluster.step().events == []


def test_a_job_held_by_a_queue_is_queued(cluster: Cluster) -> None:
    cluster.step()
    cluster.jobs["tiny-sft-1"] = JobState("tiny-sft-1", "sft", 1, suspended=True)  # Kueue has not admitted it
    d = cluster.step()
    assert d.actions == [] and [e.reason for e in d.events] == ["Queued"]
    assert (cluster.status["phase"], cluster.status["reason"]) == ("Queued", "WaitingForQuota")
    assert "Kueue" in cluster.status["message"]


def test_conditions_follow_api_conventions(cluster: Cluster) -> None:
    cluster.step()
    first = copy.deepcopy(cond(cluster.status, "Ready"))
    cluster.step(minutes=5)
    again = cond(cluster.status, "Ready")
    assert again["lastTransitionTime"] == first["lastTransitionTime"]  # unchanged status keeps its time
    assert set(again) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
    cluster.step(generation=3)
    assert cluster.status["observedGeneration"] == 3 and cond(cluster.status, "Ready")["observedGeneration"] == 3


def test_failed_job_retries_then_fails_with_pod_message(cluster: Cluster) -> None:
    cluster.step()
    cluster.finish("tiny-sft-1", "Failed", failure="BackoffLimitExceeded: Job has reached the specified backoff limit")
    cluster.failure_details["tiny-sft-1"] = "pod tiny-sft-1-0 container stage exited with code 1 (Error):\nOOM"
    d = cluster.step()
    assert ("create", "Job", "tiny-sft-2") in [(a.verb, a.kind, a.name) for a in d.actions]
    st = cluster.status
    assert st["attempts"] == 2 and st["stages"]["sft"]["jobName"] == "tiny-sft-2" and st["phase"] == "Pending"
    retry = d.events[0]
    assert retry.type == "Warning" and retry.reason == "StageRetrying" and "OOM" in retry.message
    assert "attempt 2/2" in retry.message
    env = {e["name"]: e.get("value") for e in
           cluster.bodies[("Job", "tiny-sft-2")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBERLHF_ATTEMPT"] == "2"

    cluster.finish("tiny-sft-2", "Failed", failure="BackoffLimitExceeded")
    cluster.failure_details["tiny-sft-2"] = "pod tiny-sft-2-0 container stage exited with code 1 (Error):\nboom"
    d = cluster.step()
    st = cluster.status
    assert d.actions == []
    assert (st["phase"], st["stage"], st["reason"]) == ("Failed", "sft", "BackoffLimitExceeded")
    assert "boom" in st["message"] and "after 2 attempt(s)" in st["message"]
    assert st["stages"]["sft"]["phase"] == "Failed"
    assert cond(st, "Failed")["status"] == "True" and "boom" in cond(st, "Failed")["message"]
    assert d.events[-1].reason == "StageFailed"
    # Terminal: later reconciles change nothing.
    d = cluster.step()
    assert d.actions == [] and d.events == []


def test_job_succeeded_without_complete_marker_is_a_failed_attempt(cluster: Cluster) -> None:
    cluster.step()
    cluster.finish("tiny-sft-1")
    d = cluster.step({"sft": ProbeResult(False, checkpoint="s3://x")})
    assert cluster.status["stages"]["sft"]["phase"] == "Pending"
    assert cluster.status["stages"]["sft"]["attempts"] == 2
    assert "_COMPLETE is missing" in d.events[0].message
    assert "_COMPLETE is missing" in cluster.status["stages"]["sft"]["message"]


def test_unreachable_store_waits_instead_of_failing(cluster: Cluster) -> None:
    cluster.step()
    cluster.finish("tiny-sft-1")
    d = cluster.step({"sft": ProbeResult(False, error="StorageUnreachableError: connection refused")})
    assert d.actions == [] and d.requeue_after
    assert cluster.status["stages"]["sft"]["attempts"] == 1
    assert "connection refused" in cluster.status["message"]
    d = cluster.step()  # no probe at all: same
    assert d.actions == [] and cluster.status["stages"]["sft"]["phase"] == "Pending"


def test_suspend_and_resume_patch_the_job(cluster: Cluster) -> None:
    cluster.step()
    cluster.spec["suspend"] = True
    d = cluster.step(generation=2)
    assert [(a.verb, a.name, a.body) for a in d.actions] == [("patch", "tiny-sft-1", {"spec": {"suspend": True}})]
    assert cluster.status["phase"] == "Suspended" and cluster.status["stages"]["sft"]["phase"] == "Suspended"
    assert cond(cluster.status, "Suspended")["status"] == "True"
    assert cluster.step().actions == []  # stays suspended, no repeated patches
    cluster.spec["suspend"] = False
    d = cluster.step(generation=3)
    assert [(a.verb, a.name, a.body) for a in d.actions] == [("patch", "tiny-sft-1", {"spec": {"suspend": False}})]
    assert cluster.status["phase"] == "Pending" and cond(cluster.status, "Suspended")["status"] == "False"
    assert reasons(cluster)[-2:] == ["Suspended", "Resumed"]


def test_suspend_on_a_server_without_job_suspend_deletes_and_recreates(meta, spec) -> None:
    cluster = Cluster(meta, spec, OperatorConfig(job_suspend_supported=False))
    cluster.step()
    cluster.spec["suspend"] = True
    d = cluster.step()
    assert [(a.verb, a.kind, a.name) for a in d.actions] == [("delete", "Job", "tiny-sft-1")]
    assert cluster.status["phase"] == "Suspended"
    assert cluster.step().actions == []
    cluster.spec["suspend"] = False
    d = cluster.step()
    assert ("create", "Job", "tiny-sft-1") in [(a.verb, a.kind, a.name) for a in d.actions]
    assert cluster.status["phase"] == "Pending" and cluster.status["attempts"] == 1


def test_suspended_before_start_starts_nothing(cluster: Cluster) -> None:
    cluster.spec["suspend"] = True
    d = cluster.step()
    assert d.actions == [] and cluster.status["phase"] == "Suspended"
    cluster.spec["suspend"] = False
    d = cluster.step()
    assert ("create", "Job", "tiny-sft-1") in [(a.verb, a.kind, a.name) for a in d.actions]
    assert cond(cluster.status, "Suspended")["status"] == "False"


def test_kueue_suspending_the_job_is_not_overridden(cluster: Cluster) -> None:
    cluster.step()
    cluster.jobs["tiny-sft-1"] = JobState("tiny-sft-1", "sft", 1, suspended=True)  # a queue holds it
    assert cluster.step().actions == []


def test_invalid_spec_fails_without_children_and_recovers(cluster: Cluster) -> None:
    cluster.spec["data"]["datasets"] = [{"name": "a", "path": "./b.jsonl"}]
    d = cluster.step()
    st = cluster.status
    assert d.actions == []
    assert (st["phase"], st["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.data.datasets.0" in st["message"] and "exactly one" in st["message"]
    assert cond(st, "Failed")["reason"] == "InvalidSpec"
    assert [e.reason for e in d.events] == ["InvalidSpec"]
    assert cluster.step().events == []  # reported once
    cluster.spec["data"]["datasets"] = ["kuberlhf/synthetic-pairs"]
    d = cluster.step(generation=2)
    assert cluster.status["phase"] == "Pending" and ("create", "Job", "tiny-sft-1") in [
        (a.verb, a.kind, a.name) for a in d.actions]
    assert cond(cluster.status, "Failed")["status"] == "False"


def test_a_spec_that_does_not_fit_its_gpus_is_refused_before_any_job(cluster: Cluster) -> None:
    """The memory planner in the preflight: OPT-66B at ZeRO-0 on one node of 80 GiB GPUs gets InvalidSpec naming
    the stage, the estimate and the cheapest fix; nothing is created. Fixed (ZeRO-3 on 8 nodes), the first Job
    is created."""
    cluster.spec.update(accelerator="cuda", gpuMemory="80Gi", deploymentType="multi_node",
                        actor={"model": "facebook/opt-66b"}, reward={"model": "facebook/opt-350m"})
    cluster.spec["stages"] = {"sft": {"nodes": 1, "gpusPerNode": 8, "zeroStage": 0}}
    d = cluster.step()
    st = cluster.status
    assert d.actions == []
    assert (st["phase"], st["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.stages.sft: does not fit" in st["message"] and "GiB per GPU" in st["message"]
    assert "fix: set spec.stages.sft.zeroStage: 3" in st["message"]
    cluster.spec["stages"] = {"sft": {"nodes": 8, "gpusPerNode": 8, "zeroStage": 3},
                              "ppo": {"nodes": 8, "gpusPerNode": 8, "inferenceTpSize": 8}}
    d = cluster.step(generation=2)
    assert ("create", "Job", "tiny-sft-1") in [(a.verb, a.kind, a.name) for a in d.actions], cluster.status


def test_offload_beyond_the_pods_memory_limit_is_refused_before_any_job(cluster: Cluster) -> None:
    """ZeRO-3 CPU offload of OPT-13B's optimizer states and parameters needs ~240 GiB of host memory per 8-GPU
    pod: a 64Gi limit is InvalidSpec naming the limit and the one that fits; nothing is created."""
    cluster.spec.update(accelerator="cuda", gpuMemory="40Gi", deploymentType="single_node",
                        actor={"model": "facebook/opt-13b"}, reward={"model": "facebook/opt-350m"})
    cluster.spec["stages"] = {"sft": {"zeroStage": 3, "offload": True, "gradientCheckpointing": True,
                                      "resources": {"limits": {"memory": "64Gi"}}}}
    d = cluster.step()
    st = cluster.status
    assert d.actions == []
    assert (st["phase"], st["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.stages.sft.resources.limits.memory: 64Gi is less than the host memory" in st["message"], st
    assert "fix: set spec.stages.sft.resources.limits.memory: " in st["message"]


def test_spec_change_after_start_applies_only_to_later_stages(cluster: Cluster) -> None:
    cluster.step()
    cluster.spec["stages"]["sft"]["epochs"] = 7
    cluster.spec["stages"]["ppo"]["klCoef"] = 0.5
    cluster.spec["data"]["seed"] = 99
    d = cluster.step(generation=2)
    c = cond(cluster.status, "SpecChangeIgnored")
    assert c["status"] == "True"
    assert "spec.stages.sft.epochs" in c["message"] and "spec.data.seed" in c["message"]
    assert "klCoef" not in c["message"]  # ppo has not started: not a change to a started stage
    assert [e.reason for e in d.events] == ["SpecChangeIgnored"]
    assert cluster.step().events == []  # reported once per change

    # The retry of the started stage keeps the spec it started with ...
    cluster.finish("tiny-sft-1", "Failed", failure="x")
    cluster.step()
    import json

    def pipeline_env(job: str) -> dict:
        env = cluster.bodies[("Job", job)]["spec"]["template"]["spec"]["containers"][0]["env"]
        return json.loads(next(e["value"] for e in env if e["name"] == "KUBERLHF_PIPELINE"))["spec"]

    assert pipeline_env("tiny-sft-2")["stages"]["sft"]["epochs"] == 1
    # ... and the stages not yet started get the new values.
    cluster.finish("tiny-sft-2")
    cluster.step(complete("sft"))
    assert pipeline_env("tiny-reward-1")["data"]["seed"] == 99
    cluster.finish("tiny-reward-1")
    cluster.step(complete("reward"))
    assert pipeline_env("tiny-ppo-1")["stages"]["ppo"]["klCoef"] == 0.5


def test_storage_edit_after_start_is_refused_like_the_crd_rule(cluster: Cluster) -> None:
    """On v1.20 (no CEL) the edit reaches the operator: it refuses it with the text a current API server refuses
    it with on write, creates nothing while it stands (the running Job is left alone) and goes on once reverted."""
    cluster.step()
    cluster.spec["storage"]["uri"] = "s3://elsewhere/x"
    cluster.finish("tiny-sft-1")
    d = cluster.step(complete("sft"), generation=2)
    assert d.actions == [] and ("tiny-sft-1") in cluster.jobs
    assert (cluster.status["phase"], cluster.status["reason"]) == ("Failed", "InvalidSpec")
    assert cluster.status["message"] == TRANSITION_RULES[0].text
    assert [e.reason for e in d.events] == ["InvalidSpec"]
    cluster.spec["storage"]["uri"] = "s3://bucket/pipelines"
    d = cluster.step(complete("sft"), generation=3)
    env = cluster.bodies[("Job", "tiny-reward-1")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert '"uri":"s3://bucket/pipelines"' in next(e["value"] for e in env if e["name"] == "KUBERLHF_PIPELINE")
    assert cluster.status["stages"]["sft"]["phase"] == "Succeeded" and cluster.status["stage"] == "reward"


def test_the_spec_is_read_from_spec_and_a_started_stage_from_its_job(cluster: Cluster) -> None:
    """Status is never configuration: a (legacy or forged) status.stages.*.appliedSpec is not read; a retry of a
    started stage takes what its newest Job runs with, and a stage whose Jobs are all gone the current spec."""
    cluster.step()
    cluster.status["stages"]["sft"]["appliedSpec"] = {"stages": {"sft": {"epochs": 9}}}
    cluster.spec["stages"]["sft"]["epochs"] = 5
    cluster.finish("tiny-sft-1", "Failed", failure="x")
    cluster.step(generation=2)
    assert job_spec(cluster, "tiny-sft-2")["stages"]["sft"]["epochs"] == 1  # attempt 1's record, not 9, not 5
    assert "spec.stages.sft.epochs (started: sft)" in cond(cluster.status, "SpecChangeIgnored")["message"]
    del cluster.jobs["tiny-sft-1"], cluster.jobs["tiny-sft-2"]  # deleted by hand: no record left
    cluster.step()
    assert job_spec(cluster, "tiny-sft-2")["stages"]["sft"]["epochs"] == 5


def test_restart_same_state_gives_same_decision_and_no_duplicates(cluster: Cluster, meta, spec) -> None:
    """An operator killed after creating children but before writing status sees the children on restart."""
    cluster.step()
    first = cluster.decide()
    second = cluster.decide()
    assert first.status == second.status and first.actions == second.actions == []
    # Lost status write: children exist, status is empty -> adopt them, create nothing.
    d = reconcile(meta, spec, {}, cluster.observed(), cluster.now, None, cluster.config)
    assert [a for a in d.actions if a.verb == "create"] == []
    assert d.status["stages"]["sft"]["jobName"] == "tiny-sft-1" and d.status["phase"] == "Pending"
    # Killed mid-retry: attempt 2's Job exists while status still says attempt 1.
    cluster.finish("tiny-sft-1", "Failed", failure="x")
    stale = copy.deepcopy(cluster.status)
    cluster.step()
    d = reconcile(meta, spec, stale, cluster.observed(), cluster.now, None, cluster.config)
    assert [a for a in d.actions if a.verb == "create"] == []
    assert d.status["stages"]["sft"]["attempts"] == 2 and d.status["stages"]["sft"]["jobName"] == "tiny-sft-2"
    # Killed at a stage boundary: reward-1 exists but status still says sft running.
    cluster.finish("tiny-sft-2")
    stale = copy.deepcopy(cluster.status)
    cluster.step(complete("sft"))
    d = reconcile(meta, spec, stale, cluster.observed(), cluster.now, complete("sft"), cluster.config)
    assert [a for a in d.actions if a.verb == "create"] == []
    assert d.status["stage"] == "reward"
    assert sorted(n for k, n in cluster.created if k == "Job") == ["tiny-reward-1", "tiny-sft-1", "tiny-sft-2"]


def test_a_deleted_job_is_recreated_under_the_same_name(cluster: Cluster) -> None:
    cluster.step()
    del cluster.jobs["tiny-sft-1"]
    d = cluster.step()
    assert [(a.verb, a.kind, a.name) for a in d.actions] == [("create", "Job", "tiny-sft-1")]
    cluster.jobs["tiny-sft-1"] = JobState("tiny-sft-1", "sft", 1, deleting=True)  # deleted again, still going
    d = cluster.decide()
    assert d.actions == [] and d.requeue_after  # wait until the old one is gone


def test_serving_disabled_ends_after_ppo(cluster: Cluster) -> None:
    cluster.spec["serving"] = {"enabled": False}
    run_to_serving(cluster)
    assert (cluster.status["phase"], cluster.status["stage"]) == ("Succeeded", "done")
    assert not [k for k, _ in cluster.created if k == "Deployment"]
    assert cond(cluster.status, "Ready")["status"] == "True"


def test_serving_without_ema_serves_the_final_actor(cluster: Cluster) -> None:
    cluster.spec["serving"] = {"useEma": False, "port": 9000, "replicas": 2}
    run_to_serving(cluster)
    dep = cluster.bodies[("Deployment", "tiny-chat")]
    assert dep["spec"]["replicas"] == 2
    assert "s3://bucket/pipelines/team/tiny/0000-uid/ppo/model" in dep["spec"]["template"]["spec"]["containers"][0][
        "command"]
    assert cluster.status["chatEndpoint"] == "http://tiny-chat.team.svc:9000/v1"


def test_deleted_chat_deployment_is_recreated_after_success(cluster: Cluster) -> None:
    run_to_serving(cluster)
    cluster.deployments["tiny-chat"] = DeploymentState("tiny-chat", 1, 1)
    cluster.step()
    assert cluster.status["phase"] == "Succeeded"
    del cluster.deployments["tiny-chat"]
    d = cluster.step()
    assert ("create", "Deployment", "tiny-chat") in [(a.verb, a.kind, a.name) for a in d.actions]
    assert cluster.status["phase"] == "Succeeded" and cond(cluster.status, "Serving")["status"] == "False"


def test_stage_duration_is_measured_from_start(cluster: Cluster) -> None:
    cluster.step()
    cluster.finish("tiny-sft-1")
    d = cluster.step(complete("sft"))
    started = cluster.status["stages"]["sft"]["startTime"]
    assert started == "2025-01-01T12:01:00Z"
    assert d.stage_durations["sft"] == timedelta(minutes=59).total_seconds()


def test_no_status_no_children_creates_the_first_job_and_is_pending(meta, spec) -> None:
    d = reconcile(meta, spec, None, Observed(), T0)
    assert d.status["phase"] == "Pending" and d.status["observedGeneration"] == 1


def test_events_come_only_from_the_old_and_new_status(cluster: Cluster) -> None:
    """transition_events is the one place Events come from: each decision's Events are those of its old -> new
    status, and a status that persists (compared with itself) gives none, at every point of a run."""
    statuses = []

    def step(*args) -> None:
        before = copy.deepcopy(cluster.status)
        d = cluster.step(*args)
        assert d.events == transition_events(before, d.status)
        assert transition_events(d.status, d.status) == []
        statuses.append([e.reason for e in d.events])

    step()
    cluster.pods["tiny-sft-1"] = PodsState(total=1, reason="Unschedulable", message="0/1 nodes: Insufficient cpu")
    step()
    cluster.run_pods("tiny-sft-1")
    step()
    cluster.finish("tiny-sft-1", "Failed", failure="x")
    step()
    for stage in ("sft", "reward", "ppo"):
        cluster.finish(f"tiny-{stage}-{2 if stage == 'sft' else 1}")
        step(complete(stage))
    cluster.deployments["tiny-chat"] = DeploymentState("tiny-chat", 1, 1)
    step()
    assert statuses == [["StageStarted"], ["Unschedulable"], ["StageRunning"], ["StageRetrying"],
                        ["StageSucceeded", "StageStarted"], ["StageSucceeded", "StageStarted"],
                        ["StageSucceeded", "ServingStarted"], ["Succeeded"]]


def test_an_event_message_fits_the_api_servers_limit() -> None:
    """A stage failure's message holds the pod's log tail; over 1024 bytes the API server refuses the Event and
    kopf drops it (the e2e StageRetrying flake). The head and the end survive."""
    from kuberlhf_operator.reconcile import EVENT_MESSAGE_LIMIT, Event

    msg = "stage sft attempt 1 failed: " + "x" * 3000 + " sft: 40%|\u2588\u2588\u2588\u2588 | " * 40 + " last log line"
    e = Event("Warning", "StageRetrying", msg)
    assert len(e.message.encode()) <= EVENT_MESSAGE_LIMIT  # bytes, as the API server counts
    assert e.message.startswith("stage sft attempt 1 failed: ") and e.message.endswith(" last log line")
    assert " ... " in e.message and Event("Normal", "X", "short").message == "short"
