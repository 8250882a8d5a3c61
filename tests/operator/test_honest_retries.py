"""Honest retries and visible refusals in the pure reconcile: a stage's user-error exit fails the pipeline at once, a
disrupted pod (preemption, eviction, drain) is retried without using up backoffLimit, the Job carries the same rules
as a podFailurePolicy for servers that have it, and a Job whose pods the API server refuses says why."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from operator_sim import Cluster, FakeKube

from kuberlhf.contract.stage import EXIT_INTERRUPTED, EXIT_STORAGE_UNAVAILABLE, EXIT_USER_ERROR
from kuberlhf_operator.cluster import gather
from kuberlhf_operator.observe import classify_failure, create_refusal
from kuberlhf_operator.reconcile import PipelineMeta


def pod(name: str, exit_code: int | None, *, conditions: list[dict[str, Any]] | None = None, reason: str | None = None,
        container: str = "trainer", labels: dict[str, str] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Failed" if exit_code else "Running", "conditions": conditions or []}
    if reason:
        status["reason"] = reason
    if exit_code is not None:
        status["containerStatuses"] = [{"name": container, "state": {"terminated": {"exitCode": exit_code,
                                                                                   "reason": "Error"}}}]
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "team", "labels": labels or {}},
            "status": status}


DISRUPTION = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]


def test_failed_pods_are_classified_by_whose_fault() -> None:
    assert classify_failure([pod("a", EXIT_USER_ERROR)]) == "user_error"
    # a user error on one rank decides even when another rank was stopped by SIGTERM afterwards
    assert classify_failure([pod("a", EXIT_INTERRUPTED), pod("b", EXIT_USER_ERROR)]) == "user_error"
    assert classify_failure([pod("a", 137, conditions=DISRUPTION)]) == "disruption"
    assert classify_failure([pod("a", 137, reason="Evicted")]) == "disruption"
    assert classify_failure([pod("a", EXIT_INTERRUPTED)]) == "disruption"  # SIGTERM after a checkpoint (1.20: no
    # DisruptionTarget condition exists there)
    assert classify_failure([pod("a", 1), pod("b", EXIT_INTERRUPTED)]) == "failure"  # rank b was stopped for a's crash
    assert classify_failure([pod("a", EXIT_STORAGE_UNAVAILABLE)]) == "failure"  # transient store outage: retried
    assert classify_failure([pod("a", 137)]) == "failure"  # OOM-killed
    assert classify_failure([]) == "failure"
    assert classify_failure([pod("a", EXIT_USER_ERROR, container="sidecar")]) == "failure"  # not the stage's code


def test_a_user_error_exit_fails_the_pipeline_at_once(cluster: Cluster) -> None:
    cluster.step()
    assert cluster.spec["stages"]["sft"]["backoffLimit"] == 1
    cluster.finish("tiny-sft-1", "Failed", failure="BackoffLimitExceeded")
    cluster.failure_details["tiny-sft-1"] = ("pod tiny-sft-1-0 container trainer exited with code 78 (Error):\n"
                                             "error: spec.data.datasets[0]: line 2 is not valid JSON")
    cluster.failure_kinds["tiny-sft-1"] = "user_error"
    d = cluster.step()
    st = cluster.status
    assert d.actions == []  # no second attempt
    assert (st["phase"], st["reason"], st["stages"]["sft"]["phase"]) == ("Failed", "ConfigError", "Failed")
    assert "line 2 is not valid JSON" in st["message"] and "not retried" in st["message"]
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "StageFailed")] and "exit code 78" in d.events[0].message
    assert cluster.step().actions == [] and cluster.status["phase"] == "Failed"  # terminal


def test_a_disruption_is_retried_without_using_an_attempt(cluster: Cluster) -> None:
    cluster.spec["stages"]["sft"]["backoffLimit"] = 0
    cluster.step()
    for attempt in (1, 2):  # two preemptions in a row, backoffLimit 0: both retried
        job = f"tiny-sft-{attempt}"
        cluster.finish(job, "Failed", failure="BackoffLimitExceeded")
        cluster.failure_kinds[job] = "disruption"
        d = cluster.step()
        assert ("create", "Job", f"tiny-sft-{attempt + 1}") in [(a.verb, a.kind, a.name) for a in d.actions]
        assert [(e.type, e.reason) for e in d.events] == [("Warning", "StageDisrupted")]
        assert f"attempt {attempt + 1}/{attempt + 1}" in d.events[0].message  # the budget grew by the disruption
        assert cluster.status["stages"]["sft"]["disruptions"] == attempt and cluster.status["phase"] == "Pending"
    # a real failure now uses the one attempt backoffLimit 0 allows: the pipeline fails
    cluster.finish("tiny-sft-3", "Failed", failure="BackoffLimitExceeded")
    d = cluster.step()
    st = cluster.status
    assert (st["phase"], st["reason"]) == ("Failed", "BackoffLimitExceeded"), st
    assert "2 disrupted attempt(s) not counted" in st["message"]


def test_the_disruption_count_survives_a_lost_status_write(cluster: Cluster) -> None:
    """The count comes from the failed Jobs themselves: a status that forgot it (a write that lost a conflict,
    an operator restart mid-decision) still does not charge the disruption to backoffLimit."""
    cluster.spec["stages"]["sft"]["backoffLimit"] = 0
    cluster.step()
    cluster.finish("tiny-sft-1", "Failed")
    cluster.failure_kinds["tiny-sft-1"] = "disruption"
    cluster.step()
    cluster.status["stages"]["sft"].pop("disruptions")
    cluster.finish("tiny-sft-2", "Failed")
    d = cluster.step()
    assert cluster.status["phase"] == "Failed" and d.actions == []  # attempt 2 was the one allowed failure
    assert "1 disrupted attempt(s) not counted" in cluster.status["message"]


def test_the_job_tells_the_job_controller_the_same_rules(cluster: Cluster) -> None:
    cluster.step()
    job = cluster.bodies[("Job", "tiny-sft-1")]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"] == {
        "containerName": "trainer", "operator": "In", "values": [EXIT_USER_ERROR]}
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


class _VersionedKube:
    """What configure_kopf asks of the API client: the server's version (and whether writes can be strict)."""

    def __init__(self, minor: int) -> None:
        self.minor = minor

    def server_version(self) -> tuple[int, int]:
        return 1, self.minor

    def strict_writes(self) -> bool:
        return self.minor >= 25


@pytest.mark.parametrize("minor, sent", [(20, False), (25, False), (26, True), (31, True)])
def test_the_pod_failure_policy_goes_only_to_servers_that_have_it(spec, meta, minor: int, sent: bool,
                                                                   monkeypatch) -> None:
    """The operator reads the server's version at startup: podFailurePolicy is beta and on by default from 1.26
    (alpha, off, in 1.25; absent before), so older servers get a Job without the field (the e2e tier's 1.20 shows
    the operator's own classification doing the job) and 1.26+ get one that validates, strictly, against the
    published schema of 1.26 and of the newest version kubernetes-validate has. No 1.26+ Job controller runs here
    (the e2e server is 1.20; the 1.36 apiextensions-apiserver serves CRDs only), so what the Job controller does
    with the rules is not exercised; the server-side rules of the field that a schema cannot express
    (k8s.io/kubernetes pkg/apis/batch/validation) are checked by hand below."""
    import kopf
    import kubernetes_validate

    from kuberlhf_operator.controller import Operator

    monkeypatch.delenv("KUBERLHF_POD_FAILURE_POLICY", raising=False)
    op = Operator(_VersionedKube(minor), emit=lambda body, ev: None)
    op.configure_kopf(kopf.OperatorSettings(), logging.getLogger("test"))
    assert op.config.pod_failure_policy_supported is sent and op.config.job_suspend_supported is (minor >= 22)
    cluster = Cluster(meta, spec, op.config)
    cluster.step()
    job = cluster.bodies[("Job", "tiny-sft-1")]
    assert ("podFailurePolicy" in job["spec"]) is sent
    assert ("suspend" in job["spec"]) is (minor >= 22)
    if not sent:
        return
    newest = ".".join(kubernetes_validate.utils.latest_version().split(".")[:2])
    for version in ("1.26", newest):
        assert kubernetes_validate.validate(job, version, strict=True) == version
    pod_spec = job["spec"]["template"]["spec"]
    containers = {c["name"] for c in pod_spec["containers"]}
    assert pod_spec["restartPolicy"] == "Never"  # a podFailurePolicy needs it
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        codes, conds = rule.get("onExitCodes"), rule.get("onPodConditions")
        assert bool(codes) != bool(conds), rule  # exactly one of the two non-empty
        if codes:
            assert codes["containerName"] in containers and 0 not in codes["values"], rule


def test_the_operator_override_forces_the_pod_failure_policy(spec, meta, monkeypatch) -> None:
    import kopf

    from kuberlhf_operator.controller import Operator

    monkeypatch.setenv("KUBERLHF_POD_FAILURE_POLICY", "true")  # e.g. a 1.25 server with the alpha gate on
    op = Operator(_VersionedKube(25), emit=lambda body, ev: None)
    op.configure_kopf(kopf.OperatorSettings(), logging.getLogger("test"))
    assert op.config.pod_failure_policy_supported is True


def test_a_job_whose_pods_are_refused_says_why(cluster: Cluster) -> None:
    cluster.step()
    cluster.create_refusals["tiny-sft-1"] = ('Error creating: pods "tiny-sft-1-0-x" is forbidden: exceeded quota: '
                                             "team-quota, requested: pods=1, used: pods=4, limited: pods=4")
    d = cluster.step()
    st = cluster.status
    assert (st["phase"], st["reason"]) == ("Pending", "FailedCreate"), st
    assert "exceeded quota: team-quota" in st["message"] and "tiny-sft-1" in st["message"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "FailedCreate") and "exceeded quota" in ready["message"]
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "FailedCreate")]
    assert d.actions == [] and d.requeue_after  # no new attempt; look again soon (the Job does not change)
    assert cluster.step().events == []  # one Event per episode
    del cluster.create_refusals["tiny-sft-1"]
    cluster.run_pods("tiny-sft-1")
    cluster.step()
    assert cluster.status["phase"] == "Running"


def test_gather_reads_the_job_controllers_refusal_and_classifies_failed_jobs() -> None:
    meta = PipelineMeta(name="tiny", namespace="team", uid="u1")
    owner = [{"uid": "u1"}]

    def job(name: str, attempt: int, failed: bool) -> dict[str, Any]:
        return {"kind": "Job", "metadata": {"name": name, "namespace": "team", "ownerReferences": owner, "labels": {
            "kuberlhf.io/pipeline": "tiny", "kuberlhf.io/stage": "sft", "kuberlhf.io/attempt": str(attempt)}},
            "spec": {"completions": 1, "backoffLimit": 0},
            "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]} if failed else {}}

    def event(message: str, at: str) -> dict[str, Any]:
        return {"kind": "Event", "metadata": {"name": f"e-{at}", "namespace": "team"}, "reason": "FailedCreate",
                "involvedObject": {"kind": "Job", "name": "tiny-sft-2"}, "message": message, "lastTimestamp": at}

    labels = {"kuberlhf.io/pipeline": "tiny", "kuberlhf.io/component": "stage", "kuberlhf.io/stage": "sft",
              "kuberlhf.io/attempt": "1"}
    kube = FakeKube(job("tiny-sft-1", 1, True), job("tiny-sft-2", 2, False),
                    pod("tiny-sft-1-0", 137, conditions=DISRUPTION, labels=labels),
                    event("old refusal", "2025-01-01T10:00:00Z"), event("pods is forbidden: exceeded quota: q",
                                                                        "2025-01-01T11:00:00Z"))
    observed = gather(kube, meta, {"stages": {"sft": {"phase": "Pending", "attempts": 2}}})
    assert observed.failure_kinds == {"tiny-sft-1": "disruption"}  # an earlier attempt, still counted
    assert observed.create_refusals == {"tiny-sft-2": "pods is forbidden: exceeded quota: q"}  # the newest


def test_create_refusal_ignores_other_events() -> None:
    assert create_refusal([]) is None
    assert create_refusal([{"reason": "SuccessfulCreate", "message": "Created pod: x"}]) is None


class RefusingKube(FakeKube):
    """Takes the operator's writes; creating a Job is answered with ``code`` and a Status body like the API
    server's."""

    def __init__(self, *objects: dict[str, Any], code: int, message: str) -> None:
        super().__init__(*objects)
        self.code, self.message, self.created, self.job_posts = code, message, [], 0

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
        import json

        from kubernetes.client.exceptions import ApiException

        if kind == "Job":
            self.job_posts += 1
            e = ApiException(status=self.code, reason="Refused")
            e.body = json.dumps({"kind": "Status", "code": self.code, "message": self.message,
                                 "details": {"name": body["metadata"]["name"], "kind": "jobs"}})
            raise e
        self.created.append((kind, body["metadata"]["name"]))
        return True

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any], sub: str | None = None) -> Any:
        obj = self.objects[(kind, namespace, name)]
        new = {**(obj.get("status") or {}), **body["status"]}
        obj["status"] = {k: v for k, v in new.items() if v is not None}
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)
        return obj


def _pipeline(spec: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {"kind": "RLHFPipeline", "metadata": {"name": "tiny", "namespace": "team", "uid": "u1",
                                                 "generation": generation, "resourceVersion": "1"}, "spec": spec}


INVALID = ('Job.batch "tiny-sft-1" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: '
           '"2": must be less than or equal to cpu limit')


def test_a_child_the_api_server_refuses_as_invalid_is_invalid_spec_and_not_sent_again(spec) -> None:
    from kuberlhf_operator.controller import Operator

    kube = RefusingKube(_pipeline(spec), code=422, message=INVALID)
    events: list = []
    op = Operator(kube, emit=lambda body, ev: events.append(ev))
    op.reconcile_pipeline("team", "tiny")
    st = kube.objects[("RLHFPipeline", "team", "tiny")]["status"]
    assert (st["phase"], st["reason"], st["refusedGeneration"]) == ("Failed", "InvalidSpec", 1), st
    assert "containers[0].resources.requests" in st["message"] and "spec.stages.sft" in st["message"]
    assert "stages" not in st or not (st["stages"].get("sft") or {}).get("appliedSpec")  # the stage did not start
    assert [(e.type, e.reason) for e in events] == [("Warning", "InvalidSpec")]
    op.reconcile_pipeline("team", "tiny")  # the safety net's next look: nothing sent, nothing new
    assert kube.job_posts == 1 and len(events) == 1
    # a new generation (the user fixed something) is tried again
    kube.objects[("RLHFPipeline", "team", "tiny")]["metadata"]["generation"] = 2
    op.reconcile_pipeline("team", "tiny")
    assert kube.job_posts == 2


def test_a_quota_refusal_of_a_child_keeps_waiting_and_says_why(spec) -> None:
    from kuberlhf_operator.controller import Operator

    quota = 'jobs.batch "tiny-sft-1" is forbidden: exceeded quota: q, requested: count/jobs.batch=1'
    kube = RefusingKube(_pipeline(spec), code=403, message=quota)
    events: list = []
    op = Operator(kube, emit=lambda body, ev: events.append(ev))
    decision = op.reconcile_pipeline("team", "tiny")
    st = kube.objects[("RLHFPipeline", "team", "tiny")]["status"]
    assert (st["phase"], st["reason"]) == ("Pending", "CreateRefused") and "exceeded quota: q" in st["message"]
    assert decision is not None and decision.requeue_after and "refusedGeneration" not in st
    op.reconcile_pipeline("team", "tiny")
    assert kube.job_posts == 2 and [e.reason for e in events] == ["CreateRefused"]  # retried, one Event


def test_a_bad_quantity_is_invalid_spec_naming_the_field_before_any_child(cluster: Cluster) -> None:
    """The API server would answer the Job with a 400 that names no field; the preflight names it first."""
    cluster.spec["shmSize"] = "8 GB"
    cluster.spec["stages"]["reward"]["resources"] = {"limits": {"memory": "lots", "cpu": 2}, "requests": {"cpu": "500m"}}
    cluster.spec["serving"] = {"resources": {"requests": {"nvidia.com/gpu": 1, "memory": "1.5Gi"}}}
    d = cluster.step()
    st = cluster.status
    assert (st["phase"], st["reason"]) == ("Failed", "InvalidSpec") and d.actions == []
    assert "spec.shmSize: '8 GB' is not a Kubernetes quantity" in st["message"]
    assert "spec.stages.reward.resources.limits.memory: 'lots'" in st["message"]
    assert "cpu" not in st["message"] and "spec.serving" not in st["message"]  # 2, 500m, 1 and 1.5Gi are quantities
