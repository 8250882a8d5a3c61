"""A simulated cluster for the operator's unit tier: it turns a Decision's create/patch/delete actions into the
Observed state the next reconcile sees (pure: no API server; the e2e tier runs the same code against the real
kube-apiserver). A plain module rather than conftest so that test files can import it unambiguously."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ConflictError

from kuberlhf_operator.manifests import job_held
from kuberlhf_operator.observe import DeploymentState, JobState, Observed, PodsState, job_pipeline
from kuberlhf_operator.reconcile import Decision, OperatorConfig, PipelineMeta, ProbeResult, reconcile

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


class Cluster:
    """Children as the API server would hold them after each decision; tests flip Job phases by hand."""

    def __init__(self, meta: PipelineMeta, spec: dict[str, Any], config: OperatorConfig | None = None) -> None:
        self.meta, self.spec = meta, copy.deepcopy(spec)
        self.config = config or OperatorConfig(default_image="trainer:test")
        self.status: dict[str, Any] = {}
        self.jobs: dict[str, JobState] = {}
        self.services: set[str] = set()
        self.network_policies: set[str] = set()
        self.deployments: dict[str, DeploymentState] = {}
        self.failure_details: dict[str, str] = {}
        self.failure_kinds: dict[str, str] = {}  # by Job name: user_error | disruption | failure (default)
        self.create_refusals: dict[str, str] = {}  # by Job name: the Job controller's FailedCreate message
        self.pods: dict[str, PodsState] = {}  # by Job name; tests set them (no kubelet here)
        self.created: list[tuple[str, str]] = []
        self.bodies: dict[tuple[str, str], dict[str, Any]] = {}
        self.now = T0
        self.events: list = []

    def observed(self) -> Observed:
        return Observed(jobs=dict(self.jobs), services=frozenset(self.services), deployments=dict(self.deployments),
                        failure_details=dict(self.failure_details), pods=dict(self.pods),
                        network_policies=frozenset(self.network_policies),
                        failure_kinds=dict(self.failure_kinds), create_refusals=dict(self.create_refusals))

    def decide(self, probes: dict[str, ProbeResult] | None = None, generation: int | None = None) -> Decision:
        meta = replace(self.meta, generation=generation or self.meta.generation)
        return reconcile(meta, self.spec, self.status, self.observed(), self.now, probes, self.config)

    def step(self, probes: dict[str, ProbeResult] | None = None, minutes: int = 1, **kw: Any) -> Decision:
        self.now += timedelta(minutes=minutes)
        d = self.decide(probes, **kw)
        self.apply(d)
        return d

    def apply(self, d: Decision) -> None:
        for a in d.actions:
            if a.verb == "create":
                self.created.append((a.kind, a.name))
                self.bodies[(a.kind, a.name)] = a.body
                labels = a.body["metadata"]["labels"]
                if a.kind == "Job":
                    assert a.name not in self.jobs, f"duplicate Job {a.name}"
                    self.jobs[a.name] = JobState(a.name, labels["kuberlhf.io/stage"],
                                                 int(labels["kuberlhf.io/attempt"]),
                                                 suspended=job_held(a.body["spec"]), pipeline=job_pipeline(a.body))
                elif a.kind == "Service":
                    self.services.add(a.name)
                elif a.kind == "NetworkPolicy":
                    self.network_policies.add(a.name)
                elif a.kind == "Deployment":
                    self.deployments[a.name] = DeploymentState(a.name, a.body["spec"]["replicas"], 0)
            elif a.verb == "patch":
                self.jobs[a.name] = replace(self.jobs[a.name], suspended=job_held(a.body["spec"]))
            elif a.verb == "delete":
                self.jobs.pop(a.name)
        self.status = copy.deepcopy(d.status)
        self.events += d.events

    def run_pods(self, job: str, running: int = 1) -> None:
        """The Job's pods were scheduled and run (what a kubelet reports)."""
        self.pods[job] = PodsState(total=running, running=running)

    def finish(self, job: str, phase: str = "Succeeded", failure: str | None = None) -> None:
        self.jobs[job] = replace(self.jobs[job], phase=phase, failure=failure,
                                 completion_time="2025-01-01T13:00:00Z" if phase == "Succeeded" else None)


def complete(stage: str, sha: str = "ab" * 32) -> dict[str, ProbeResult]:
    return {stage: ProbeResult(True, checkpoint=f"s3://bucket/pipelines/team/tiny/0000-uid/{stage}",
                               manifest_sha256=sha)}


class FakeKube:
    """Objects by (kind, namespace, name) for the handler functions that only get and list (the probe); label
    selectors are the ``k=v,k2=v2`` equality form the operator uses."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.objects = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objects}
        self.calls: list[tuple[str, str]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind))
        return copy.deepcopy(self.objects.get((kind, namespace, name)))

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        self.calls.append(("list", kind))
        want = dict(part.split("=", 1) for part in selector.split(",")) if selector else {}
        return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items() if k == kind and ns == namespace
                and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in want.items())]

    def list_events(self, namespace: str, kind: str, name: str, reason: str) -> list[dict[str, Any]]:
        self.calls.append(("list", "Event"))
        return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items() if k == "Event" and ns == namespace
                and o.get("involvedObject", {}).get("kind") == kind and o["involvedObject"].get("name") == name
                and o.get("reason") == reason]


def secret(namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    import base64

    return {"kind": "Secret", "metadata": {"namespace": namespace, "name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


class RecordingKube(FakeKube):
    """FakeKube that also takes the writes the operator makes."""

    def __init__(self, *objects: dict[str, Any], status_conflicts: int = 0) -> None:
        super().__init__(*objects)
        self.writes: list[tuple[str, str, str, Any]] = []
        self.status_conflicts = status_conflicts  # the next N status writes lose to a concurrent writer

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
        key = (kind, namespace, body["metadata"]["name"])
        self.writes.append(("create", kind, key[2], body))
        if key in self.objects:
            return False
        self.objects[key] = copy.deepcopy({"kind": kind, **body})
        return True

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any], sub: str | None = None) -> Any:
        self.writes.append(("patch", f"{kind}/{sub}" if sub else kind, name, body))
        obj = self.objects[(kind, namespace, name)]
        if sub == "status" and self.status_conflicts:
            self.status_conflicts -= 1
            obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)
            raise ConflictError(ApiException(status=409, reason="Conflict"))
        if sub == "status":
            new = {**(obj.get("status") or {}), **body["status"]}
            obj["status"] = {k: v for k, v in new.items() if v is not None}
        return obj


def pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFPipeline",
            "metadata": {"name": "tiny", "namespace": "team", "uid": "uid-1", "generation": 1,
                         "resourceVersion": "7"}, "spec": spec}
