"""E2E tier: the real kube-apiserver + controller-manager (v1.20.2) on loopback, the process kubelet, SeaweedFS."""

from __future__ import annotations

import pytest
from harness.fixtures import control_plane, kubelet, namespace  # noqa: F401 - fixtures for this directory


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath) and "test_harness_pure" not in str(item.fspath):
            item.add_marker(pytest.mark.controlplane)
