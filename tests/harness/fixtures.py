"""pytest fixtures for any test that needs the real control plane. Import them into a conftest:

    from harness.fixtures import control_plane, kubelet, namespace  # noqa: F401
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest

from harness.controlplane import ControlPlane, ControlPlaneUnavailable, find_binaries
from harness.process_kubelet import ProcessKubelet
from harness.rest import ApiError


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager v1.20.2 on loopback, shared by the session."""
    try:
        find_binaries()
    except ControlPlaneUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    cp = ControlPlane(tmp_path_factory.mktemp("controlplane"))
    with cp:
        yield cp


@pytest.fixture(scope="session")
def kubelet(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessKubelet]:
    """The process kubelet running every pod of the session's control plane as a local process."""
    with ProcessKubelet(control_plane.kubeconfig, tmp_path_factory.mktemp("kubelet")) as k:
        yield k
    assert not k.errors, f"process kubelet errors: {k.errors}"


@pytest.fixture()
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace (with its default service account ready), deleted afterwards."""
    from harness.rest import KubeREST
    from harness.wait import wait_for

    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    name = f"t-{uuid.uuid4().hex[:8]}"
    api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_for(lambda: api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default").get("secrets"),
             f"default service account token in {name}", timeout=30, interval=0.2)
    yield name
    with contextlib.suppress(ApiError):
        api.delete(f"/api/v1/namespaces/{name}")
