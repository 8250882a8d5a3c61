"""The CRD on the real API server (v1.20.2): examples are accepted, bad specs are rejected by the server itself
with messages that name the field."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"


def _pipeline() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def _dry_run(control_plane, namespace: str, obj: dict):
    # --validate=false: kubectl's own schema check would answer first; the API server must reject on its own.
    return control_plane.kubectl("apply", "--dry-run=server", "--validate=false", "-n", namespace, "-f", "-",
                                 input=yaml.safe_dump(obj), check=False)


def test_crd_is_established_with_status_subresource_and_short_name(control_plane, crd):
    out = control_plane.kubectl("api-resources", "--api-group=kuberlhf.io", "-o", "wide").stdout
    assert "rlhfpipelines" in out and "rlhf" in out and "RLHFPipeline" in out
    spec = yaml.safe_load(control_plane.kubectl("get", "crd", crd, "-o", "yaml").stdout)["spec"]
    assert spec["versions"][0]["subresources"] == {"status": {}}


def test_crd_applies_client_side_and_server_side(control_plane, crd):
    """Client-side ``kubectl apply`` stores the whole CRD in its last-applied annotation, which the server caps at
    256 KiB (the CRD holds one PodSpec schema, not five, to fit); server-side apply stores none."""
    crd_file = str(REPO / "crds" / "rlhfpipelines-pre-1.25.yaml")  # v1.20: no CEL
    proc = control_plane.kubectl("apply", "--dry-run=server", "-f", crd_file, check=False)
    assert proc.returncode == 0, proc.stderr
    proc = control_plane.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=e2e-ssa",
                                 "-f", crd_file, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "serverside-applied" in proc.stdout


def test_docs_worked_example_is_stored_without_pruning(control_plane, crd, namespace):
    """docs/kubernetes.md's pod-surface example (PVC, Secret, pipeline) is created for real; the API server keeps
    every podTemplate field (a field missing from the CRD's schema would be pruned silently on 1.20)."""
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    section = doc[doc.index("### Worked example"):]
    objs = [d for d in yaml.safe_load_all(section.split("```yaml\n", 1)[1].split("```", 1)[0]) if d]
    proc = control_plane.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objs), check=False)
    assert proc.returncode == 0, proc.stderr
    name = objs[2]["metadata"]["name"]
    stored = json.loads(control_plane.kubectl("get", "-n", namespace, "rlhf", name, "-o", "json").stdout)
    assert stored["spec"]["podTemplate"]["spec"] == objs[2]["spec"]["podTemplate"]["spec"]
    assert stored["spec"]["stages"]["ppo"]["podTemplate"]["spec"] == \
        objs[2]["spec"]["stages"]["ppo"]["podTemplate"]["spec"]
    control_plane.kubectl("delete", "-n", namespace, "--wait=false", "-f", "-", input=yaml.safe_dump_all(objs), check=False)


def test_every_example_pipeline_is_accepted(control_plane, crd, namespace):
    examples = sorted((REPO / "examples").glob("*.yaml"))
    pipelines = [d for f in examples for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") == "RLHFPipeline"]
    assert pipelines, "examples/ holds no RLHFPipeline"
    for obj in pipelines:
        proc = _dry_run(control_plane, namespace, obj)
        assert proc.returncode == 0, f"{obj['metadata']['name']}: {proc.stderr}"


def _set(obj: dict, path: str, value) -> dict:
    out = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("spec.stages.sft.nodes", "two", ["spec.stages.sft.nodes", "integer"]),
    ("spec.stages.ppo.klCoef", "lots", ["spec.stages.ppo.klCoef", "number"]),
    ("spec.stages.reward.nodes", -1, ["spec.stages.reward.nodes", "greater than or equal to 1"]),
    ("spec.deploymentType", "gpu_cluster", ["spec.deploymentType", "single_gpu", "multi_node"]),
    ("spec.storage", _DELETE, ["spec.storage", "Required"]),
    ("spec.podTemplate", {"spec": {"tolerations": "all"}}, ["spec.podTemplate.spec.tolerations", "array"]),
    ("spec.podTemplate", {"spec": {"containers": [{"image": "x"}]}},
     ["spec.podTemplate.spec.containers", "name", "Required"]),
], ids=["wrong-type-int", "wrong-type-number", "negative-nodes", "unknown-deployment-type", "missing-storage",
        "pod-spec-type", "container-without-name"])
def test_bad_spec_is_rejected_naming_the_field(control_plane, crd, namespace, path, value, expected):
    proc = _dry_run(control_plane, namespace, _set(_pipeline(), path, value))
    assert proc.returncode != 0, f"the API server accepted {path}={value!r}"
    assert "is invalid" in proc.stderr, proc.stderr  # the server's verdict, not a client-side check
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in the server's message: {proc.stderr}"


def test_operator_client_falls_back_where_strict_field_validation_is_missing(control_plane, namespace):
    """The operator's DynamicClient-backed client on the real 1.20 server: it asks once, finds no
    fieldValidation (1.25+), and writes without it; that server prunes an unknown field silently (what Strict
    turns into an error on current servers)."""
    from kuberlhf_operator.kube import Kube

    kube = Kube(control_plane.api_client())
    assert kube.server_version() == (1, 20) and kube.strict_writes() is False
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "strict-probe"},
           "spec": {"ports": [{"port": 80}], "selector": {"app": "x"}, "typoField": True}}
    assert kube.create("Service", namespace, svc) is True
    assert kube.create("Service", namespace, svc) is False  # exists: a repeated create is harmless
    stored = kube.get("Service", namespace, "strict-probe")
    assert stored is not None and "typoField" not in stored["spec"]
    kube.patch("Service", namespace, "strict-probe", {"metadata": {"labels": {"patched": "yes"}}})
    assert kube.list("Service", namespace, "patched=yes")[0]["metadata"]["name"] == "strict-probe"
    assert kube.delete("Service", namespace, "strict-probe") is True
    assert kube.get("Service", namespace, "strict-probe") is None


def test_helm_install_takes_the_big_crd(control_plane, crd, namespace):
    """The real helm binary installs the chart with its CRD (~90 KB without CEL) on the real 1.20
    server: the release record (a Secret, 1 MiB at most) and the CRD object both fit. The session's CRD exists
    already, so the release takes it over (same content) and keeps it on uninstall (helm.sh/resource-policy)."""
    try:
        from chart.helm import helm_binary
    except ImportError:  # run with the repository root on sys.path
        from tests.chart.helm import helm_binary

    env = {"KUBECONFIG": str(control_plane.kubeconfig), "HOME": str(control_plane.kubeconfig.parent),
           "PATH": "/usr/bin:/bin"}
    helm = [str(helm_binary()), "--namespace", namespace]
    proc = subprocess.run([*helm, "install", "crd-check", str(REPO / "charts" / "kuberlhf"), "--take-ownership",
                           "--set", "crds.install=true", "--wait=false"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    try:
        stored = yaml.safe_load(control_plane.kubectl("get", "crd", crd, "-o", "yaml").stdout)
        assert stored["metadata"]["annotations"]["meta.helm.sh/release-name"] == "crd-check"
        props = stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        assert "topologySpreadConstraints" in props["podTemplate"]["properties"]["spec"]["properties"]
        release = [s for s in json.loads(control_plane.kubectl("get", "secret", "-n", namespace, "-o",
                                                               "json").stdout)["items"]
                   if s.get("type") == "helm.sh/release.v1"]
        assert len(release) == 1 and len(release[0]["data"]["release"]) < 1024 * 1024
    finally:
        subprocess.run([*helm, "uninstall", "crd-check", "--wait=false"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert control_plane.kubectl("get", "crd", crd, check=False).returncode == 0  # kept
