"""`helm template` of the chart | `kubectl apply --dry-run=server` against the real API server (v1.20.2), for
the value combinations users install with. (That the rendered RBAC suffices is proven by the pipeline test,
which runs the chart's operator Deployment under its ServiceAccount.)"""

from __future__ import annotations

import uuid

import pytest
import yaml
from harness.controlplane import K8S_VERSION

try:
    from chart.helm import render_chart
except ImportError:  # run with the repository root on sys.path
    from tests.chart.helm import render_chart


@pytest.mark.parametrize("values", [
    [],
    ["watch.namespaces={team-a,team-b}"],
    ["watch.allNamespaces=true"],
    ["seaweedfs.enabled=true", "seaweedfs.auth.accessKey=ak", "seaweedfs.auth.secretKey=sk",
     "seaweedfs.persistence.enabled=true"],
], ids=["defaults", "namespaced-two", "cluster-wide", "with-seaweedfs"])
def test_rendered_chart_is_accepted_by_the_api_server(control_plane, values):
    release_ns = f"rel-{uuid.uuid4().hex[:6]}"
    # rendered for the server's version, as `helm install` against it does (the CRD variant is chosen by version)
    objs = render_chart(namespace=release_ns, set_values=values, extra_args=["--kube-version", K8S_VERSION])
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "ServiceAccount"} <= kinds and ({"Role", "ClusterRole"} & kinds)
    namespaces = {release_ns} | {o["metadata"].get("namespace") for o in objs if o["metadata"].get("namespace")}
    for ns in namespaces:
        control_plane.kubectl("create", "namespace", ns, check=False)
    proc = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(objs), check=False)
    assert proc.returncode == 0, proc.stderr
    for o in objs:
        assert f"{o['kind'].lower()}" in proc.stdout.lower() and o["metadata"]["name"] in proc.stdout
    assert proc.stdout.count("(server dry run)") == len(objs)
