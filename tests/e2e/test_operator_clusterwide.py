"""Cluster-wide mode on the real control plane: the chart rendered with ``watch.allNamespaces=true`` (ClusterRole,
operator started with ``--all-namespaces``), its operator Deployment run by the process kubelet under the chart's
ServiceAccount token, so the rendered ClusterRole is all it has. A pipeline in a namespace created after the
operator started gets its first Job; the pipeline's S3 Secret does not exist, so the stage pod never starts (no
training here) and the pipeline reports Pending with the kubelet's reason. Everything is deleted afterwards so no
second operator is left running beside the namespaced one of test_pipeline.py."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import pytest
import yaml
from harness import KubeREST, wait_for

from kuberlhf_operator.manifests import job_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/kuberlhf.io/v1alpha1"
RELEASE = "kuberlhf-cw"


def test_clusterwide_operator_starts_a_pipeline_in_any_namespace(control_plane, kubelet, operator_install):
    release_ns, team_ns = f"kuberlhf-cw-{uuid.uuid4().hex[:4]}", f"team-{uuid.uuid4().hex[:6]}"
    with operator_install(release_ns, {"watch": {"allNamespaces": True}}, release=RELEASE) as inst:
        api, objs = inst.api, inst.objects
        kinds = {o["kind"] for o in objs}
        assert {"ClusterRole", "ClusterRoleBinding"} <= kinds and "Role" not in kinds, kinds
        args = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--all-namespaces" in args, args
        try:
            # A namespace the operator did not know when it started.
            control_plane.kubectl("create", "namespace", team_ns)
            obj = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
            obj["metadata"] = {"name": "cw"}
            obj["spec"]["storage"] = {"uri": "s3://nowhere/pipelines", "endpoint": "http://127.0.0.1:9",
                                      "secretRef": {"name": "no-such-secret"}}
            control_plane.kubectl("apply", "-n", team_ns, "-f", "-", input=yaml.safe_dump(obj))
            sft1 = job_name("cw", "sft", 1)
            job = wait_for(lambda: api.get(f"/apis/batch/v1/namespaces/{team_ns}/jobs/{sft1}"),
                           "the first Job of the pipeline in a new namespace", 40, 0.3,
                           describe=lambda: _describe(kubelet, api, release_ns))
            pipeline = api.get(f"{GROUP_PATH}/namespaces/{team_ns}/rlhfpipelines/cw")
            owner = job["metadata"]["ownerReferences"][0]
            assert (owner["kind"], owner["uid"], owner["controller"]) == ("RLHFPipeline", pipeline["metadata"]["uid"],
                                                                          True)
            # The Secret is missing, so the pod waits (CreateContainerConfigError): Pending, and the status says why.
            status = wait_for(
                lambda: (st := api.get(f"{GROUP_PATH}/namespaces/{team_ns}/rlhfpipelines/cw").get("status") or {})
                .get("reason") == "CreateContainerConfigError" and st,
                "the pipeline to report why its pod waits", 30, 0.3,
                describe=lambda: _describe(kubelet, api, release_ns))
            assert (status["phase"], status["stage"]) == ("Pending", "sft")
            assert "no-such-secret" in status["message"], status
        finally:
            with contextlib.suppress(Exception):
                control_plane.kubectl("delete", "namespace", team_ns, "--wait=false")


def _describe(kubelet, api: KubeREST, ns: str) -> str:
    pods = api.get(f"/api/v1/namespaces/{ns}/pods")["items"]
    out = []
    for p in pods:
        with contextlib.suppress(KeyError):
            out.append(f"--- {p['metadata']['name']}:\n" + kubelet.logs(ns, p["metadata"]["name"])[-3000:])
    return "\n".join(out)
