"""Issue 13's findings 1, 2 and 8 on the real control plane (kube-apiserver + controller-manager v1.20.2), read back
from the server: one chart install (its operator runs as a pod under the chart's ServiceAccount and RBAC, with the
chart's image and ServiceAccount allowlists set) watching its own namespace and a tenant namespace. Nothing trains:
every pipeline's pods select a node label no node has, so they stay Pending (no process runs) while the Job, the
Pod the real Job controller made and the real ServiceAccount admission plugin admitted are all on the server.

- A pipeline naming the operator's ServiceAccount, mounting its token Secret, or using an image or ServiceAccount
  outside the allowlists is Failed/InvalidSpec naming the field, with one Warning Event, and nothing is created.
- A hostile spec the policy allows (its own image, in the operator's namespace) gets a Job and Pod without an API
  token (the admission plugin mounts none; the operator's own pod has one, so the plugin is on) and passing the Pod
  Security Standards restricted profile (tests/scan/pss.py: 1.20 has no PodSecurity admission to ask).
- Kueue on 1.20: there is no Job.spec.suspend before 1.22, so no Kueue can run here. A queued stage's Job is held at
  parallelism 0 (the real Job controller makes no pod) and the pipeline is Queued/WaitingForQuota; the test plays
  the queue: setting parallelism admits it (the Job controller makes the pod), setting it back to 0 preempts it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import KubeREST, wait_for

from kuberlhf_operator import LABEL_PIPELINE
from kuberlhf_operator.manifests import QUEUE_NAME_LABEL, job_name

try:
    from scan.pss import violations
except ImportError:  # run with the repository root on sys.path
    from tests.scan.pss import violations

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/kuberlhf.io/v1alpha1"
RELEASE = "kuberlhf-sec"
TEAM_IMAGES = "registry.example.com/team-a/*"
TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.fixture(scope="module")
def install(operator_install) -> Iterator[dict[str, Any]]:
    suffix = uuid.uuid4().hex[:5]
    op_ns, ns = f"kuberlhf-sec-{suffix}", f"tenant-{suffix}"
    values = {
        "watch": {"namespaces": [op_ns, ns]},
        "policy": {"allowedImages": [TEAM_IMAGES, "ghcr.io/kuberlhf/*"], "allowedServiceAccounts": ["trainer"]},
    }
    with operator_install(op_ns, values, release=RELEASE, namespaces=[ns], reconcile_interval=3) as inst:
        sa = next(o["metadata"]["name"] for o in inst.objects if o["kind"] == "ServiceAccount")
        token_secret = next(
            s["metadata"]["name"]
            for s in inst.api.get(f"/api/v1/namespaces/{op_ns}/secrets")["items"]
            if s["type"] == "kubernetes.io/service-account-token"
            and s["metadata"]["annotations"]["kubernetes.io/service-account.name"] == sa
        )
        yield {"api": inst.api, "op_ns": op_ns, "ns": ns, "sa": sa, "token_secret": token_secret,
               "operator_pod": inst.pod}


def pipeline(name: str, *, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """examples/tiny-cpu.yaml that never gets a node (the pods stay Pending), plus ``spec``'s fields (``stages``
    merged per stage)."""
    obj = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    obj["metadata"] = {"name": name, "labels": labels or {}}
    obj["spec"]["storage"] = {"uri": "s3://nowhere/p", "endpoint": "http://127.0.0.1:9", "secretRef": {"name": "s3"}}
    obj["spec"]["stages"]["sft"].update(gpusPerNode=1, resources={})
    template = spec.pop("podTemplate", {"spec": {}})
    template["spec"]["nodeSelector"] = {"kuberlhf.io/e2e-no-such-pool": "true"}
    for stage, fields in spec.pop("stages", {}).items():
        obj["spec"]["stages"][stage].update(fields)
    obj["spec"].update(podTemplate=template, **spec)
    return obj


def children(api: KubeREST, ns: str, name: str) -> list[str]:
    paths = (
        "/apis/batch/v1/namespaces/{ns}/jobs",
        "/api/v1/namespaces/{ns}/services",
        "/api/v1/namespaces/{ns}/pods",
        "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
    )
    return api.names(ns, paths, labelSelector=f"{LABEL_PIPELINE}={name}")


def status_of(api: KubeREST, ns: str, name: str) -> dict[str, Any]:
    return api.get(f"{GROUP_PATH}/namespaces/{ns}/rlhfpipelines/{name}").get("status") or {}


def test_a_pipeline_acting_as_the_operator_or_outside_the_allowlists_is_refused(install, control_plane):
    api, op_ns, ns, sa = install["api"], install["op_ns"], install["ns"], install["sa"]
    token_volume = {"name": "t", "secret": {"secretName": install["token_secret"]}}
    cases = [  # (namespace, pipeline, the field the refusal names)
        (
            op_ns,
            pipeline("as-operator", podTemplate={"spec": {"serviceAccountName": sa}}),
            "spec.podTemplate.spec.serviceAccountName: ",
        ),
        (
            op_ns,
            pipeline("operator-token", podTemplate={"spec": {"volumes": [token_volume]}}),
            "spec.podTemplate.spec.volumes[0].secret.secretName: ",
        ),
        (ns, pipeline("foreign-image", image="docker.io/evil/miner:latest"), "spec.image: "),
        (
            ns,
            pipeline("foreign-sa", stages={"sft": {"podTemplate": {"spec": {"serviceAccountName": "admin"}}}}),
            "spec.stages.sft.podTemplate.spec.serviceAccountName: ",
        ),
    ]
    for where, obj, _ in cases:
        control_plane.kubectl("apply", "-n", where, "-f", "-", input=yaml.safe_dump(obj))
    for where, obj, field in cases:
        name = obj["metadata"]["name"]
        st = wait_for(
            lambda where=where, name=name: (s := status_of(api, where, name)).get("reason") == "InvalidSpec" and s,
            f"{name} to be InvalidSpec",
            60,
            0.3,
        )
        assert st["phase"] == "Failed" and st["message"].startswith(field), st
    # (that a refused spec is not retried later is test_pipeline.py's preflight test, which waits two reconciles)
    for where, obj, field in cases:
        name = obj["metadata"]["name"]
        assert children(api, where, name) == [], name
        events_path = f"/api/v1/namespaces/{where}/events"
        refusals = wait_for(
            lambda where=events_path, name=name: [
                e
                for e in api.get(where, fieldSelector=f"involvedObject.name={name}")["items"]
                if e["reason"] == "InvalidSpec"
            ],
            f"{name}'s InvalidSpec Event",
            30,
            0.3,
        )
        events = refusals
        assert [(e["type"], e.get("count", 1)) for e in refusals] == [("Warning", 1)], events
        assert field.rstrip(": ") in refusals[0]["message"]
    assert "the kuberlhf operator's own ServiceAccount" in status_of(api, op_ns, "as-operator")["message"]
    assert "not in this install's allowlist" in status_of(api, ns, "foreign-image")["message"]


def test_a_hostile_spec_within_the_policy_gets_a_hardened_pod_without_a_token(install, control_plane, kubelet):
    """Its own image, in the operator's namespace (where the operator's token Secret lives): the stored Job's pod
    template and the Pod the Job controller made carry no API token and pass the restricted profile."""
    api, op_ns = install["api"], install["op_ns"]
    name = "own-image"
    control_plane.kubectl(
        "apply", "-n", op_ns, "-f", "-", input=yaml.safe_dump(pipeline(name, image="registry.example.com/team-a/own:1"))
    )
    job = wait_for(
        lambda: api.get(f"/apis/batch/v1/namespaces/{op_ns}/jobs/{job_name(name, 'sft', 1)}"), "the stage Job", 60, 0.3
    )
    pod = wait_for(
        lambda: next(
            iter(
                api.get(f"/api/v1/namespaces/{op_ns}/pods", labelSelector=f"job-name={job['metadata']['name']}")[
                    "items"
                ]
            ),
            None,
        ),
        "the Job controller's pod",
        60,
        0.3,
    )
    for what, spec in (("Job template", job["spec"]["template"]["spec"]), ("Pod", pod["spec"])):
        assert spec["automountServiceAccountToken"] is False, what
        assert spec.get("serviceAccountName", "default") == "default", what
        assert violations(spec) == [], (what, violations(spec))
        assert {c["image"] for c in spec["containers"]} == {"registry.example.com/team-a/own:1"}, what
    # what the ServiceAccount admission plugin added: no token volume or mount (it did for the operator's own pod)
    assert not [v for v in pod["spec"]["volumes"] if "secret" in v or "projected" in v], pod["spec"]["volumes"]
    assert all(m["mountPath"] != TOKEN_MOUNT for c in pod["spec"]["containers"] for m in c.get("volumeMounts", []))
    operator = install["operator_pod"]["spec"]
    assert any(m["mountPath"] == TOKEN_MOUNT for c in operator["containers"] for m in c.get("volumeMounts", []))
    # the Job fields follow the real server's version (1.20): no podFailurePolicy sent, queued Jobs held instead
    log = kubelet.logs(install["op_ns"], install["operator_pod"]["metadata"]["name"])
    assert "Job podFailurePolicy off (server < 1.26" in log and "held at parallelism 0 (server < 1.22)" in log, log[
        -2000:
    ]


def test_a_queued_stage_waits_at_parallelism_zero_until_the_queue_admits_it(install, control_plane):
    api, ns = install["api"], install["ns"]
    name = "queued"
    sft1 = job_name(name, "sft", 1)
    job_path = f"/apis/batch/v1/namespaces/{ns}/jobs/{sft1}"
    pods = f"/api/v1/namespaces/{ns}/pods"
    control_plane.kubectl(
        "apply", "-n", ns, "-f", "-", input=yaml.safe_dump(pipeline(name, labels={QUEUE_NAME_LABEL: "team-a-gpus"}))
    )
    st = wait_for(
        lambda: (s := status_of(api, ns, name)).get("phase") == "Queued" and s, "the pipeline to queue", 60, 0.3
    )
    assert st["reason"] == "WaitingForQuota" and "LocalQueue 'team-a-gpus'" in st["message"], st
    assert "parallelism 0" in st["message"] and st["stages"]["sft"]["phase"] == "Queued", st
    job = api.get(job_path)
    assert job["metadata"]["labels"][QUEUE_NAME_LABEL] == "team-a-gpus"
    assert (job["spec"]["parallelism"], job["spec"]["completions"]) == (0, 1) and "suspend" not in job["spec"]
    time.sleep(2)  # the Job controller syncs a new Job at once: still no pod
    assert not api.get(pods, labelSelector=f"job-name={sft1}")["items"] and not job.get("status", {}).get("active")
    assert status_of(api, ns, name)["phase"] == "Queued"
    queued = wait_for(
        lambda: [
            e
            for e in api.get(f"/api/v1/namespaces/{ns}/events", fieldSelector=f"involvedObject.name={name}")["items"]
            if e["reason"] == "Queued"
        ],
        "the Queued Event",
        30,
        0.3,
    )
    assert [(e["type"], e.get("count", 1)) for e in queued] == [("Normal", 1)], queued

    api.merge_patch(job_path, {"spec": {"parallelism": 1}})  # the queue admits the stage
    wait_for(lambda: api.get(pods, labelSelector=f"job-name={sft1}")["items"], "the admitted Job's pod", 60, 0.3)
    # Pending while the pod is being created, then with the (process kubelet's) scheduler's reason
    st = wait_for(
        lambda: (s := status_of(api, ns, name)).get("reason") == "Unschedulable" and s,
        "the admitted stage to report its unschedulable pod",
        60,
        0.3,
    )
    assert st["phase"] == "Pending" and st["stages"]["sft"]["phase"] == "Pending", st
    # the reconcile that saw the admission (the status above) changed nothing back
    assert api.get(job_path)["spec"]["parallelism"] == 1

    api.merge_patch(job_path, {"spec": {"parallelism": 0}})  # preempted
    wait_for(lambda: status_of(api, ns, name).get("phase") == "Queued", "the preempted stage to queue again", 60, 0.3)
    wait_for(
        lambda: (
            not [
                p
                for p in api.get(pods, labelSelector=f"job-name={sft1}")["items"]
                if not p["metadata"].get("deletionTimestamp")
            ]
        ),
        "the Job controller to remove the pod",
        60,
    )
    assert status_of(api, ns, name)["attempts"] == 1  # a preemption is no attempt
