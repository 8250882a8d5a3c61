"""Refusals, user errors, disruptions and deletion on the real control plane (kube-apiserver + controller-manager
v1.20.2), lean: no test waits for a stage to train. The chart's operator runs as a pod under its own ServiceAccount
(the process kubelet), one install per test.

- A quota-refused stage shows the reason: the Job controller cannot create the sft pod (FailedCreate, 'exceeded
  quota'); the pipeline stays Pending with reason FailedCreate, the API server's message and one Warning Event.
- Deleting the pipeline while the operator is stopped completes: kopf put no finalizer on it, and the garbage
  collector removes its Job and Service through their ownerReferences.
- A stage that exits with the user-error code fails the pipeline after one attempt (ConfigError).
- A stage pod evicted with a DisruptionTarget condition is retried with backoffLimit 0 (it uses no attempt).
- A Job the API server refuses (422: requests above limits) is InvalidSpec naming the field; in the same install, a
  pipeline whose memory plan cannot fit its GPUs (OPT-66B at ZeRO-0 on one node) is InvalidSpec (DoesNotFit) naming
  the stage, the estimate and the fix, with a Warning Event, and gets no Job."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml
from harness import KubeREST, pipeline_report, wait_for

from kuberlhf_operator import LABEL_PIPELINE
from kuberlhf_operator.manifests import job_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/kuberlhf.io/v1alpha1"
RELEASE = "kuberlhf-rf"
NAME = "refused"
TOO_BIG = "too-big"


def test_a_quota_refused_stage_shows_why_and_deletion_needs_no_operator(control_plane, kubelet, operator_install):
    suffix = uuid.uuid4().hex[:5]
    op_ns, ns = f"kuberlhf-rf-{suffix}", f"quota-{suffix}"
    pipeline = f"{GROUP_PATH}/namespaces/{ns}/rlhfpipelines/{NAME}"
    with operator_install(op_ns, {"watch": {"namespaces": [ns]}}, release=RELEASE, namespaces=[ns],
                          reconcile_interval=3) as inst:
        api = inst.api

        def children() -> list[str]:
            return api.names(ns, ("/apis/batch/v1/namespaces/{ns}/jobs", "/api/v1/namespaces/{ns}/services",
                                  "/api/v1/namespaces/{ns}/pods"), labelSelector=f"{LABEL_PIPELINE}={NAME}")

        control_plane.kubectl("create", "quota", "no-pods", "-n", ns, "--hard=pods=0")
        wait_for(lambda: (api.get(f"/api/v1/namespaces/{ns}/resourcequotas/no-pods").get("status") or {}).get("hard"),
                 "the quota controller to fill the quota's status", 60, 0.5)
        obj = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
        obj["metadata"] = {"name": NAME}
        obj["spec"]["storage"] = {"uri": "s3://nowhere/pipelines", "endpoint": "http://127.0.0.1:9",
                                  "secretRef": {"name": "no-such-secret"}}
        control_plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
        status = wait_for(lambda: (st := api.get(pipeline).get("status") or {}).get("reason") == "FailedCreate" and st,
                          "the pipeline to report the refused pod creation", 90, 0.5,
                          describe=lambda: pipeline_report(api, kubelet, op_ns, ns, pipeline))
        assert (status["phase"], status["stage"]) == ("Pending", "sft"), status
        assert "exceeded quota: no-pods" in status["message"] and job_name(NAME, "sft", 1) in status["message"]
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "FailedCreate" and "exceeded quota" in ready["message"]
        wait_for(lambda: [e for e in api.get(f"/api/v1/namespaces/{ns}/events",
                                             fieldSelector=f"involvedObject.name={NAME}")["items"]
                          if e["reason"] == "FailedCreate" and e["type"] == "Warning"],
                 "the pipeline's FailedCreate Warning Event", 30, 0.5)
        assert api.get(pipeline)["status"]["attempts"] == 1  # no new attempt for a refusal

        # The operator stops; the pipeline carries no finalizer, so deleting it needs nothing from the operator.
        control_plane.kubectl("scale", "deployment", "--all", "-n", op_ns, "--replicas=0")
        wait_for(lambda: not kubelet.active(op_ns), "the operator process to stop", 60, 0.5)
        assert not api.get(pipeline)["metadata"].get("finalizers"), api.get(pipeline)["metadata"]
        assert children(), "the Job and Service should exist before the deletion"
        control_plane.kubectl("delete", "rlhf", NAME, "-n", ns, "--wait=false")
        wait_for(lambda: not api.get(f"{GROUP_PATH}/namespaces/{ns}/rlhfpipelines")["items"],
                 "the pipeline to be deleted with the operator stopped", 30, 0.5)
        wait_for(lambda: not children(), "the garbage collector to delete the pipeline's children", 90, 1.0,
                 describe=lambda: str(children()))


def test_a_user_error_exit_fails_the_pipeline_without_a_retry(control_plane, kubelet, tiny_pipeline_setup, tmp_path):
    """A real `kuberlhf stage sft` process reads a dataset whose second line is not JSON and exits with the
    user-error code (78): the pipeline is Failed (ConfigError) after one attempt, though backoffLimit is 2."""
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    bad = tmp_path / "broken-pairs.jsonl"
    bad.write_text('{"prompt": "Human: hi Assistant:", "chosen": " hello", "rejected": " go"}\nnot json\n')
    with tiny_pipeline_setup("usererr", name=NAME) as (op_ns, ns, obj, pipeline):
        obj["spec"]["data"]["datasets"] = [str(bad)]
        obj["spec"]["stages"]["sft"]["backoffLimit"] = 2
        control_plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
        status = wait_for(lambda: (st := api.get(pipeline).get("status") or {}).get("phase") == "Failed" and st,
                          "the pipeline to fail on the stage's user error", 240, 1.0,
                          describe=lambda: pipeline_report(api, kubelet, op_ns, ns, pipeline))
        assert status["reason"] == "ConfigError" and status["attempts"] == 1, status
        assert "exit code 78" in status["message"] and "line 2 is not valid JSON" in status["message"], status
        jobs = api.get(f"/apis/batch/v1/namespaces/{ns}/jobs", labelSelector=f"{LABEL_PIPELINE}={NAME}")["items"]
        assert [j["metadata"]["name"] for j in jobs] == [job_name(NAME, "sft", 1)]


def test_an_evicted_stage_pod_is_retried_without_using_an_attempt(control_plane, kubelet, tiny_pipeline_setup):
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    with tiny_pipeline_setup("evict", name=NAME) as (op_ns, ns, obj, pipeline):
        obj["spec"]["stages"]["sft"]["backoffLimit"] = 0
        control_plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
        sft1 = job_name(NAME, "sft", 1)
        pods = wait_for(lambda: kubelet.active(ns, {"job-name": sft1}), "the sft pod to run", 120, 0.3)
        assert kubelet.evict_pod(ns, pods[0].name)
        sft2 = job_name(NAME, "sft", 2)
        wait_for(lambda: api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{sft2}"), "the retry's Job", 90, 0.5,
                 describe=lambda: pipeline_report(api, kubelet, op_ns, ns, pipeline))
        # the operator creates the retry's Job inside its handler and kopf patches the status after it returns:
        # wait for the patch rather than read the status in between
        status = wait_for(lambda: (st := api.get(pipeline).get("status") or {}).get("stages", {}).get("sft", {})
                          .get("disruptions") and st, "the status to count the disruption", 30, 0.3,
                          describe=lambda: pipeline_report(api, kubelet, op_ns, ns, pipeline))
        assert status["phase"] != "Failed" and status["stages"]["sft"]["disruptions"] == 1, status
        events = api.get(f"/api/v1/namespaces/{ns}/events", fieldSelector=f"involvedObject.name={NAME}")["items"]
        assert any(e["reason"] == "StageDisrupted" for e in events), [e["reason"] for e in events]


def _does_not_fit(obj: dict) -> dict:
    """``obj`` as OPT-66B trained at ZeRO-0 on one node of 8 x 80 GiB GPUs: the memory planner's refusal. The
    models are hub names the planner sizes from its known configs: nothing is downloaded."""
    big = yaml.safe_load(yaml.safe_dump(obj))
    big["metadata"] = {"name": TOO_BIG}
    big["spec"].update(accelerator="cuda", gpuMemory="80Gi", deploymentType="multi_node",
                       actor={"model": "facebook/opt-66b"}, reward={"model": "facebook/opt-350m"})
    big["spec"]["stages"] = {"sft": {"nodes": 1, "gpusPerNode": 8, "zeroStage": 0}}
    return big


def test_a_refused_child_and_a_plan_that_cannot_fit_are_invalid_spec_naming_the_field(control_plane, kubelet,
                                                                                      tiny_pipeline_setup):
    """Requests above limits pass the spec's checks but the API server refuses the Job (422): InvalidSpec with the
    server's field, not an endless retry. A pipeline the memory planner says cannot fit its GPUs is refused by the
    operator's preflight before it creates anything: InvalidSpec (DoesNotFit) naming the stage, the estimate and
    the cheapest fix, in the status, the Failed condition and a Warning Event."""
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    with tiny_pipeline_setup("invalid", name=NAME) as (op_ns, ns, obj, pipeline):
        big = _does_not_fit(obj)
        obj["spec"]["stages"]["sft"]["resources"] = {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}
        control_plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all([obj, big]))
        status = wait_for(lambda: (st := api.get(pipeline).get("status") or {}).get("reason") == "InvalidSpec" and st,
                          "the pipeline to report the refused Job", 60, 0.5,
                          describe=lambda: pipeline_report(api, kubelet, op_ns, ns, pipeline))
        assert status["phase"] == "Failed" and status["refusedGeneration"] == 1, status
        assert "resources.requests" in status["message"] and "spec.stages.sft" in status["message"], status

        big_path = f"{GROUP_PATH}/namespaces/{ns}/rlhfpipelines/{TOO_BIG}"
        status = wait_for(lambda: (st := api.get(big_path).get("status") or {}).get("reason") == "InvalidSpec" and st,
                          "the operator to refuse the pipeline that cannot fit", 60, 0.5,
                          describe=lambda: pipeline_report(api, kubelet, op_ns, ns, big_path))
        fix = "fix: set spec.stages.sft.zeroStage: 3"
        assert status["phase"] == "Failed", status
        assert "spec.stages.sft: does not fit (DoesNotFit)" in status["message"] and fix in status["message"], status
        assert "GiB per GPU" in status["message"] and "refusedGeneration" not in status, status
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert (failed["status"], failed["reason"]) == ("True", "InvalidSpec") and fix in failed["message"], failed
        events = wait_for(lambda: [e for e in api.get(f"/api/v1/namespaces/{ns}/events",
                                                      fieldSelector=f"involvedObject.name={TOO_BIG}")["items"]
                                   if e["reason"] == "InvalidSpec" and e["type"] == "Warning"],
                          "the pipeline's InvalidSpec Warning Event", 30, 0.5)
        assert "DoesNotFit" in events[0]["message"] and fix in events[0]["message"], events
        assert not api.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
        assert not api.get(f"/api/v1/namespaces/{ns}/services", labelSelector=f"{LABEL_PIPELINE}={TOO_BIG}")["items"]
