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

try:
    from chart.helm import render_chart
except ImportError:  # run with the repository root on sys.path
    from tests.chart.helm import render_chart

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/kuberlhf.io/v1alpha1"
RELEASE = "kuberlhf-cw"


def _operator_objects(release_ns: str, values_dir: Path) -> list[dict]:
    values = values_dir / "clusterwide-values.yaml"
    values.write_text(yaml.safe_dump({
        "watch": {"allNamespaces": True},
        "crds": {"install": False},  # the crd fixture applied crds/rlhfpipelines.yaml
        "extraEnv": [{"name": "KUBERLHF_LIVENESS_PORT", "value": "8080"},
                     {"name": "KUBERLHF_METRICS_PORT", "value": "9090"}],
    }))
    return [o for o in render_chart(release=RELEASE, namespace=release_ns, values_files=[values])
            if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})]


def test_clusterwide_operator_starts_a_pipeline_in_any_namespace(control_plane, kubelet, crd, tmp_path):
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    release_ns, team_ns = f"kuberlhf-cw-{uuid.uuid4().hex[:4]}", f"team-{uuid.uuid4().hex[:6]}"
    objs = _operator_objects(release_ns, tmp_path)
    kinds = {o["kind"] for o in objs}
    assert {"ClusterRole", "ClusterRoleBinding"} <= kinds and "Role" not in kinds, kinds
    args = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args, args
    control_plane.kubectl("create", "namespace", release_ns)
    manifest = yaml.safe_dump_all(objs)
    try:
        control_plane.kubectl("apply", "-f", "-", input=manifest)

        def operator_ready() -> bool:
            pods = api.get(f"/api/v1/namespaces/{release_ns}/pods")["items"]
            return any(c["type"] == "Ready" and c["status"] == "True"
                       for p in pods for c in (p.get("status") or {}).get("conditions") or [])

        wait_for(operator_ready, "the cluster-wide operator pod to be Ready", 60, 0.3)
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
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("RLHFPipeline", pipeline["metadata"]["uid"], True)
        # The Secret is missing, so the pod waits (CreateContainerConfigError): Pending, and the status says why.
        status = wait_for(
            lambda: (st := api.get(f"{GROUP_PATH}/namespaces/{team_ns}/rlhfpipelines/cw").get("status") or {})
            .get("reason") == "CreateContainerConfigError" and st,
            "the pipeline to report why its pod waits", 30, 0.3, describe=lambda: _describe(kubelet, api, release_ns))
        assert (status["phase"], status["stage"]) == ("Pending", "sft")
        assert "no-such-secret" in status["message"], status
    finally:
        with contextlib.suppress(Exception):
            control_plane.kubectl("delete", "namespace", team_ns, "--wait=false")
        control_plane.kubectl("delete", "-f", "-", "--wait=false", input=manifest, check=False)
        wait_for(lambda: not kubelet.active(release_ns), "the cluster-wide operator process to stop", 30, 0.3)


def _describe(kubelet, api: KubeREST, ns: str) -> str:
    pods = api.get(f"/api/v1/namespaces/{ns}/pods")["items"]
    out = []
    for p in pods:
        with contextlib.suppress(KeyError):
            out.append(f"--- {p['metadata']['name']}:\n" + kubelet.logs(ns, p["metadata"]["name"])[-3000:])
    return "\n".join(out)
