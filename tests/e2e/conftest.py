"""E2E tier: the real kube-apiserver + controller-manager (v1.20.2) on loopback, the process kubelet, SeaweedFS."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.controlplane import ControlPlane
from harness.fixtures import control_plane, kubelet, namespace  # noqa: F401,F811 - fixtures for this directory
from harness.process_kubelet import ProcessKubelet
from harness.rest import KubeREST
from harness.wait import wait_for

try:
    from chart.helm import render_chart
except ImportError:  # run with the repository root on sys.path
    from tests.chart.helm import render_chart

REPO = Path(__file__).resolve().parents[2]
# v1.20 takes the variant without CEL rules (kubectl's schema check rejects x-kubernetes-validations there)
CRD_FILE = REPO / "crds" / "rlhfpipelines-pre-1.25.yaml"
CRD_NAME = "rlhfpipelines.kuberlhf.io"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath) and "test_harness_pure" not in str(item.fspath):
            item.add_marker(pytest.mark.controlplane)


@pytest.fixture(scope="session")
def crd(control_plane: ControlPlane) -> str:  # noqa: F811
    """crds/rlhfpipelines-pre-1.25.yaml applied to the real v1.20 API server and Established."""
    control_plane.kubectl("apply", "-f", str(CRD_FILE))

    def established() -> bool:
        out = control_plane.kubectl(
            "get", "crd", CRD_NAME, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}"
        ).stdout
        return out.strip() == "True"

    wait_for(established, f"CRD {CRD_NAME} to be Established", timeout=30, interval=0.2)
    return CRD_NAME


# The operator's declared ports as env, so the process kubelet can move them to free local ports.
OPERATOR_PORTS_ENV = [
    {"name": "KUBERLHF_LIVENESS_PORT", "value": "8080"},
    {"name": "KUBERLHF_METRICS_PORT", "value": "9090"},
]


@dataclass
class Install:
    api: KubeREST
    namespace: str  # the release's namespace, where the operator runs
    objects: list[dict[str, Any]]  # what the chart rendered and the test applied
    pod: dict[str, Any]  # the operator's pod, once Ready


def operator_pod(api: KubeREST, op_ns: str) -> dict[str, Any] | None:
    """The operator's Ready pod in ``op_ns`` (not one being deleted), else None."""
    for p in api.get(f"/api/v1/namespaces/{op_ns}/pods", labelSelector="app.kubernetes.io/name=kuberlhf")["items"]:
        conditions = (p.get("status") or {}).get("conditions") or []
        if not p["metadata"].get("deletionTimestamp") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in conditions
        ):
            return p
    return None


@contextlib.contextmanager
def _install(
    control_plane: ControlPlane,  # noqa: F811
    kubelet: ProcessKubelet,  # noqa: F811
    op_ns: str,
    values: dict[str, Any],
    *,
    release: str = "kuberlhf",
    namespaces: Sequence[str] = (),
    reconcile_interval: int | None = None,
) -> Iterator[Install]:
    values = {
        **values,
        "crds": {"install": False},  # the crd fixture applied crds/rlhfpipelines-pre-1.25.yaml
        "extraEnv": [*OPERATOR_PORTS_ENV, *values.get("extraEnv", [])],
    }
    if reconcile_interval is not None:
        values["extraEnv"].append({"name": "KUBERLHF_RECONCILE_INTERVAL", "value": str(reconcile_interval)})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "values.yaml").write_text(yaml.safe_dump(values))
        # `helm install` would run hook objects (the `helm test` pod) only on `helm test`: leave them out.
        objs = [
            o
            for o in render_chart(release=release, namespace=op_ns, values_files=[Path(tmp) / "values.yaml"])
            if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})
        ]
    manifest = yaml.safe_dump_all(objs)
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    created = [op_ns, *namespaces]
    try:
        for name in created:
            control_plane.kubectl("create", "namespace", name)
        control_plane.kubectl("apply", "-f", "-", input=manifest)
        pod = wait_for(lambda: operator_pod(api, op_ns), "the chart's operator pod to be Ready", 90, 0.5)
        yield Install(api=api, namespace=op_ns, objects=objs, pod=pod)
    finally:
        for name in reversed(created):
            with contextlib.suppress(Exception):
                control_plane.kubectl("delete", "namespace", name, "--wait=false")
        control_plane.kubectl("delete", "-f", "-", "--wait=false", input=manifest, check=False)
        wait_for(lambda: not kubelet.active(op_ns), "the operator process to stop", 30, 0.3)


@pytest.fixture(scope="session")
def operator_install(
    control_plane: ControlPlane,  # noqa: F811
    kubelet: ProcessKubelet,  # noqa: F811
    crd: str,
) -> Callable[..., contextlib.AbstractContextManager[Install]]:
    """``with operator_install(op_ns, values, release=..., namespaces=[...], reconcile_interval=N) as inst:`` the
    chart rendered with ``values`` (its CRD and hook objects left out) and applied for real: its operator
    Deployment runs as a pod (the process kubelet) under the chart's ServiceAccount token and RBAC. Creates
    ``op_ns`` and ``namespaces`` first, yields once the operator pod is Ready, then deletes the namespaces and
    the chart's objects and waits for the operator process to stop."""

    def install(op_ns: str, values: dict[str, Any], **kwargs: Any) -> contextlib.AbstractContextManager[Install]:
        return _install(control_plane, kubelet, op_ns, values, **kwargs)

    return install


@pytest.fixture(scope="session")
def tiny_pipeline_setup(
    operator_install: Callable[..., contextlib.AbstractContextManager[Install]],
    control_plane: ControlPlane,  # noqa: F811
    s3_server: Any,
) -> Callable[..., contextlib.AbstractContextManager[tuple[str, str, dict[str, Any], str]]]:
    """``with tiny_pipeline_setup(prefix, name="tiny") as (op_ns, ns, obj, path):`` an operator install watching a
    fresh namespace ``<prefix>-<random>`` that holds Secret ``s3`` (the session's SeaweedFS keys); ``obj`` is
    examples/tiny-cpu.yaml named ``name``, writing to a fresh bucket, its sft stage on one rank; ``path`` its API
    path once applied. Everything is removed afterwards."""

    @contextlib.contextmanager
    def setup(prefix: str, name: str = "tiny") -> Iterator[tuple[str, str, dict[str, Any], str]]:
        suffix = uuid.uuid4().hex[:5]
        op_ns, ns = f"kuberlhf-{prefix}-{suffix}", f"{prefix}-{suffix}"
        s3_server.create_bucket(f"{prefix}-{suffix}")
        with operator_install(op_ns, {"watch": {"namespaces": [ns]}}, release="kuberlhf-tiny", namespaces=[ns],
                              reconcile_interval=3):
            control_plane.kubectl("create", "secret", "generic", "s3", "-n", ns,
                                  f"--from-literal=AWS_ACCESS_KEY_ID={s3_server.access_key}",
                                  f"--from-literal=AWS_SECRET_ACCESS_KEY={s3_server.secret_key}")
            obj = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
            obj["metadata"] = {"name": name}
            obj["spec"]["storage"] = {"uri": f"s3://{prefix}-{suffix}/p", "endpoint": s3_server.endpoint,
                                      "secretRef": {"name": "s3"}}
            obj["spec"]["stages"]["sft"].update(gpusPerNode=1, resources={})
            yield op_ns, ns, obj, f"/apis/kuberlhf.io/v1alpha1/namespaces/{ns}/rlhfpipelines/{name}"

    return setup
