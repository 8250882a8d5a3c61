"""The chart, rendered by the real Helm 3.17.2: lint, Kubernetes schema validation, values schema, CRD, pods."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from chart.conftest import CI_VALUES, KIND_VALUES
from chart.helm import CHART_DIR, render_chart, run_helm

K8S_VERSION = "1.30.0"  # a current release; the chart's objects exist unchanged from 1.20 on
REPO = CHART_DIR.parents[1]

VARIANTS = {
    "default": {},
    "ci-values": {"values_files": [CI_VALUES]},
    "kind-values": {"values_files": [KIND_VALUES], "namespace": "kuberlhf"},
    "all-namespaces": {"set_values": ["watch.allNamespaces=true"]},
}


def _render(variant: str) -> list[dict]:
    kwargs = dict(VARIANTS[variant])
    return render_chart(**kwargs)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, _render(request.param)


@pytest.mark.parametrize("values", [None, CI_VALUES, KIND_VALUES], ids=["default", "ci-values", "kind-values"])
def test_helm_lint_strict(values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART_DIR)] + (["--values", str(values)] if values else [])
    proc = run_helm(args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_every_rendered_object_passes_strict_kubernetes_validation(rendered: tuple[str, list[dict]]) -> None:
    variant, objects = rendered
    assert objects, f"{variant}: nothing rendered"
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{variant}: {obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def test_default_render_contains_the_operator_parts() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in _render("default"))
    assert kinds == sorted(
        [
            ("ServiceAccount", "kuberlhf"),
            ("CustomResourceDefinition", "rlhfpipelines.kuberlhf.io"),
            ("ClusterRole", "kuberlhf-crd-discovery"),
            ("ClusterRoleBinding", "kuberlhf-crd-discovery"),
            ("Role", "kuberlhf"),
            ("RoleBinding", "kuberlhf"),
            ("Service", "kuberlhf-metrics"),
            ("Deployment", "kuberlhf"),
            ("NetworkPolicy", "kuberlhf"),
            ("Pod", "kuberlhf-test"),
        ]
    )


def _strip_chart_metadata(crd: dict) -> dict:
    crd = yaml.safe_load(yaml.safe_dump(crd))
    meta = crd["metadata"]
    meta.get("annotations", {}).pop("helm.sh/resource-policy", None)
    if not meta.get("annotations"):
        meta.pop("annotations", None)
    for key in list(meta.get("labels", {})):
        if key.startswith("helm.sh/") or key in (
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/part-of",
        ):
            del meta["labels"][key]
    return crd


@pytest.mark.parametrize(("kube_version", "variant"), [(None, "rlhfpipelines.yaml"),
                                                      ("1.25.0", "rlhfpipelines.yaml"),
                                                      ("1.24.9", "rlhfpipelines-pre-1.25.yaml"),
                                                      ("1.20.2", "rlhfpipelines-pre-1.25.yaml")])
def test_chart_crd_is_the_generated_crd_for_the_server_version(kube_version: str | None, variant: str) -> None:
    """The chart renders the generated CRD unchanged: with CEL rules from Kubernetes 1.25, without before
    (``python -m kuberlhf_operator.crd --write`` writes both copies; tests/operator checks they are current)."""
    source = REPO / "crds" / variant
    assert (CHART_DIR / "files" / variant).read_bytes() == source.read_bytes()
    args = ["--kube-version", kube_version] if kube_version else []
    rendered = [o for o in render_chart(extra_args=args) if o["kind"] == "CustomResourceDefinition"]
    assert len(rendered) == 1
    # helm's fromYaml/toYaml round trip must not change a single value of the schema
    assert _strip_chart_metadata(rendered[0]) == yaml.safe_load(source.read_text())


def test_crd_is_kept_on_uninstall_and_can_be_left_to_an_admin() -> None:
    crd = next(o for o in _render("default") if o["kind"] == "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    unkept = next(
        o for o in render_chart(set_values=["crds.keep=false"]) if o["kind"] == "CustomResourceDefinition"
    )
    assert "helm.sh/resource-policy" not in unkept["metadata"].get("annotations", {})
    assert not [o for o in render_chart(set_values=["crds.install=false"]) if o["kind"] == "CustomResourceDefinition"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "watchNamespaces={a}"], "watchNamespaces"),  # typo of watch.namespaces
        (["--set", "seaweedfs.enable=true"], "enable"),  # typo of seaweedfs.enabled
        (["--set", "image.pullpolicy=Always"], "pullpolicy"),
        (["--set-string", "metrics.port=9090"], "metrics.port"),  # a string where a port number belongs
        (["--set", "watch.allNamespaces=yes-please"], "allNamespaces"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "watch.namespaces={Team_A}"], "namespaces"),
        (["--set", "resources.limits.memory=lots"], "memory"),
    ],
)
def test_values_schema_rejects_typos_and_wrong_types(args: list[str], needle: str) -> None:
    proc = run_helm(["template", "r", str(CHART_DIR), *args], check=False)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert needle in proc.stderr, proc.stderr


def test_seaweedfs_needs_credentials() -> None:
    proc = run_helm(["template", "r", str(CHART_DIR), "--set", "seaweedfs.enabled=true"], check=False)
    assert proc.returncode != 0
    assert "seaweedfs.auth.accessKey (or seaweedfs.auth.existingSecret) is required" in proc.stderr


def _pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for o in objects:
        if o["kind"] == "Pod":
            out.append((f"Pod/{o['metadata']['name']}", o["spec"]))
        elif o["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
    return out


def test_every_pod_is_hardened(rendered: tuple[str, list[dict]]) -> None:
    variant, objects = rendered
    pods = _pod_specs(objects)
    assert pods
    for name, spec in pods:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, f"{variant} {name}"
        assert psc.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{variant} {name}"
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{variant} {name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{variant} {name}/{c['name']}"
            assert sc["capabilities"] == {"drop": ["ALL"]}, f"{variant} {name}/{c['name']}"
            assert c["resources"]["requests"] and c["resources"]["limits"], f"{variant} {name}/{c['name']}"
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]


def _operator(objects: list[dict]) -> dict:
    return next(
        o for o in objects
        if o["kind"] == "Deployment" and o["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
    )


def test_operator_deployment_runs_one_standalone_kopf_with_probes() -> None:
    dep = _operator(_render("default"))
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["kuberlhf-operator"]
    assert c["args"] == ["--namespace", "kuberlhf-system"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KUBERLHF_DEFAULT_IMAGE"] == "ghcr.io/kuberlhf/kuberlhf-trainer:0.1.0"
    assert c["image"] == "ghcr.io/kuberlhf/kuberlhf-operator:0.1.0"


@pytest.mark.parametrize(
    ("set_values", "expected"),
    [
        (["watch.namespaces={team-a,team-b}"], ["--namespace", "team-a", "--namespace", "team-b"]),
        (["watch.allNamespaces=true"], ["--all-namespaces"]),
        (["watch.allNamespaces=true", "extraArgs={--debug}"], ["--all-namespaces", "--debug"]),
    ],
)
def test_operator_args_follow_the_watch_mode(set_values: list[str], expected: list[str]) -> None:
    dep = _operator(render_chart(set_values=set_values))
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"] == expected


def test_kind_values_match_the_tiny_example_and_the_e2e_script() -> None:
    """hack/kind-e2e.sh installs with hack/kind-values.yaml into namespace kuberlhf and applies examples/ files:
    the S3 endpoint, bucket and Secret the tiny example names must be what the chart then provides."""
    objects = _render("kind-values")
    tiny = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    secret = yaml.safe_load((REPO / "examples" / "s3-secret.yaml").read_text())
    storage = tiny["spec"]["storage"]
    svc = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["labels"]["app.kubernetes.io/component"] == "s3")
    host_port = storage["endpoint"].split("://", 1)[1]
    assert host_port in (
        f"{svc['metadata']['name']}.kuberlhf:{svc['spec']['ports'][0]['port']}",
        f"{svc['metadata']['name']}.kuberlhf.svc:{svc['spec']['ports'][0]['port']}",
    )
    weed = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "kuberlhf-s3")
    store, gateway = weed["spec"]["template"]["spec"]["containers"]
    bucket = storage["uri"].split("://", 1)[1].split("/", 1)[0]
    assert any(a.startswith("-bucket=") and bucket in a[len("-bucket="):].split(",") for a in store["args"])
    assert gateway["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert storage["secretRef"]["name"] == secret["metadata"]["name"]
    operator = _operator(objects)["spec"]["template"]["spec"]["containers"][0]
    assert operator["image"] == "kuberlhf-operator:dev" and operator["imagePullPolicy"] == "Never"
    env = {e["name"]: e.get("value") for e in operator["env"]}
    assert env["KUBERLHF_DEFAULT_IMAGE"] == "kuberlhf-trainer:dev-cpu"
    script = (REPO / "hack" / "kind-e2e.sh").read_text()
    for needle in ("kuberlhf-operator:dev", "kuberlhf-trainer:dev-cpu", "TRAINER_VARIANT=cpu", "NS=kuberlhf",
                   "hack/kind-values.yaml", "examples/s3-secret.yaml", "PIPELINE=tiny-cpu"):
        assert needle in script, needle


def test_seaweedfs_uses_a_claim_when_persistent() -> None:
    objects = _render("ci-values")
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "standard"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    weed = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-s3"))
    volumes = {v["name"]: v for v in weed["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-credentials"))
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "ci-access", "AWS_SECRET_ACCESS_KEY": "ci-secret-key"}
    args = weed["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "-bucket=kuberlhf,datasets" in args and "-master.telemetry=false" in args


def test_helm_test_hook_checks_the_metrics_service() -> None:
    objects = _render("default")
    pod = next(o for o in objects if o["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    svc = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-metrics"))
    script = pod["spec"]["containers"][0]["args"][0]
    assert f"http://{svc['metadata']['name']}.kuberlhf-system.svc:9090/metrics" in script
    compile(script, "helm-test", "exec")  # the embedded Python is valid


def test_service_monitor_is_optional_and_selects_the_metrics_service() -> None:
    assert not [o for o in _render("default") if o["kind"] == "ServiceMonitor"]
    objects = render_chart(set_values=["metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom"])
    sm = next(o for o in objects if o["kind"] == "ServiceMonitor")
    svc = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-metrics"))
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]


def test_notes_tell_the_user_what_to_do_next(tmp_path: Path) -> None:
    """`helm template` never renders NOTES.txt and `helm install --dry-run` needs a cluster, so a copy of the
    chart renders the same text as a ConfigMap through `include`."""
    chart = tmp_path / "kuberlhf"
    shutil.copytree(CHART_DIR, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}\n' + notes + "\n{{- end }}\n")
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: {{ include \"notes\" . | toJson }}\n"
    )
    objects = render_chart(chart=chart, namespace="kuberlhf", values_files=[KIND_VALUES])
    text = next(o for o in objects if o["kind"] == "ConfigMap")["data"]["notes"]
    assert "kubectl -n kuberlhf rollout status deploy/kuberlhf" in text
    assert "helm test kuberlhf -n kuberlhf" in text
    assert "endpoint: http://seaweedfs.kuberlhf:8333" in text
    assert "kubectl -n kuberlhf get rlhf -w" in text
    assert "port-forward svc/<pipeline>-chat" in text
    assert "WARNING" not in text  # kind-values keys come from a Secret `helm template` cannot read
    demo = render_chart(chart=chart, namespace="kuberlhf", set_values=[
        "seaweedfs.enabled=true", "seaweedfs.auth.accessKey=kuberlhf-demo",
        "seaweedfs.auth.secretKey=kuberlhf-demo-secret-change-me"])
    warning = next(o for o in demo if o["kind"] == "ConfigMap")["data"]["notes"]
    assert "WARNING: the in-cluster SeaweedFS uses the demo keys of examples/s3-secret.yaml" in warning
    own = render_chart(chart=chart, namespace="kuberlhf", set_values=[
        "seaweedfs.enabled=true", "seaweedfs.auth.accessKey=a1b2", "seaweedfs.auth.secretKey=c3d4e5"])
    assert "WARNING" not in next(o for o in own if o["kind"] == "ConfigMap")["data"]["notes"]


def test_chart_packages(tmp_path: Path) -> None:
    proc = run_helm(["package", str(CHART_DIR), "--destination", str(tmp_path)])
    assert (tmp_path / "kuberlhf-0.1.0.tgz").is_file(), proc.stdout
    listing = subprocess.run(["tar", "tzf", str(tmp_path / "kuberlhf-0.1.0.tgz")], capture_output=True, text=True, check=True)
    assert "kuberlhf/files/rlhfpipelines.yaml" in listing.stdout
    assert "kuberlhf/values.schema.json" in listing.stdout


def test_operator_knows_its_service_account_and_the_install_policy() -> None:
    env = {e["name"]: e.get("value") for e in _operator(_render("ci-values"))["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBERLHF_SERVICE_ACCOUNT"] == "rlhf-operator"  # ci-values' serviceAccount.name
    assert "KUBERLHF_ALLOWED_IMAGES" not in env and "KUBERLHF_ALLOWED_SERVICE_ACCOUNTS" not in env
    objects = render_chart(set_values=["policy.allowedImages={registry.example.com/kuberlhf/*,ghcr.io/x/y:1}",
                                       "policy.allowedServiceAccounts={trainer}"])
    env = {e["name"]: e.get("value") for e in _operator(objects)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBERLHF_ALLOWED_IMAGES"] == "registry.example.com/kuberlhf/*,ghcr.io/x/y:1"
    assert env["KUBERLHF_ALLOWED_SERVICE_ACCOUNTS"] == "trainer"
