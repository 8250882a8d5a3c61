"""E2E tier: the real kube-apiserver + controller-manager (v1.20.2) on loopback, the process kubelet, SeaweedFS."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.controlplane import ControlPlane
from harness.fixtures import control_plane, kubelet, namespace  # noqa: F401,F811 - fixtures for this directory
from harness.wait import wait_for

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
        out = control_plane.kubectl("get", "crd", CRD_NAME, "-o",
                                    "jsonpath={.status.conditions[?(@.type=='Established')].status}").stdout
        return out.strip() == "True"

    wait_for(established, f"CRD {CRD_NAME} to be Established", timeout=30, interval=0.2)
    return CRD_NAME
