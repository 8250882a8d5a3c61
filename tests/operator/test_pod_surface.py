"""The pod surface: the merge rules as a pure function, and the worked example of docs/kubernetes.md built into
the operator's pods and checked against the Kubernetes 1.25-1.35 schemas (strict)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kuberlhf.contract.pod import merge, merge_layers, owned_conflicts
from kuberlhf.contract.podspec import pod_spec_schema as shipped_pod_spec_schema
from kuberlhf.contract.spec import ObjectMeta, RLHFPipeline, parse_pipeline
from kuberlhf.contract.stage import stage_command
from kuberlhf_operator.crd import build_crd
from kuberlhf_operator.manifests import (
    Owner,
    build_chat_deployment,
    build_chat_service,
    build_stage_job,
    build_stage_service,
)
from kuberlhf_operator.podschema import pod_spec_schema

REPO = Path(__file__).resolve().parents[2]
STRICT_VERSIONS = [f"1.{minor}" for minor in range(25, 36)]
OWNER = Owner(name="opt-1-3b-cached", namespace="team-a", uid="6f1c1b4e-0000-4000-8000-000000000002")


def worked_example() -> list[dict[str, Any]]:
    """The YAML block under 'Worked example' in docs/kubernetes.md."""
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    section = doc[doc.index("### Worked example") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "docs/kubernetes.md: the worked example lost its yaml block"
    return [d for d in yaml.safe_load_all(block.group(1)) if d]


def children(p: RLHFPipeline) -> list[dict[str, Any]]:
    out = []
    for stage in p.spec.stage_graph:
        out += [build_stage_job(p, OWNER, stage, 1, default_image="img:1"), build_stage_service(OWNER, stage, 1)]
    return out + [build_chat_deployment(p, OWNER, default_image="img:1"), build_chat_service(p, OWNER)]


# --- merge rules (pure) -----------------------------------------------------------------------------------------


def test_maps_merge_and_unkeyed_lists_are_replaced() -> None:
    base = {"spec": {"nodeSelector": {"a": "1"}, "tolerations": [{"key": "x"}], "securityContext": {"runAsUser": 1}}}
    over = {"spec": {"nodeSelector": {"b": "2"}, "tolerations": [{"key": "y"}], "securityContext": {"fsGroup": 2}}}
    out = merge(base, over)
    assert out["spec"]["nodeSelector"] == {"a": "1", "b": "2"}
    assert out["spec"]["tolerations"] == [{"key": "y"}]
    assert out["spec"]["securityContext"] == {"runAsUser": 1, "fsGroup": 2}
    assert base["spec"]["nodeSelector"] == {"a": "1"}  # inputs untouched


def test_keyed_lists_merge_by_name_or_path() -> None:
    base = {
        "containers": [
            {
                "name": "trainer",
                "image": "a",
                "command": ["run"],
                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    over = {
        "containers": [
            {
                "name": "trainer",
                "image": "b",
                "env": [
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                    {"name": "C", "value": "3"},
                ],
                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
            },
            {"name": "sidecar", "image": "s"},
        ],
        "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "c"}}],
    }
    out = merge(base, over)
    trainer, sidecar = out["containers"]
    assert (trainer["image"], trainer["command"], sidecar["name"]) == ("b", ["run"], "sidecar")
    # an env entry of the same name is replaced whole: value and valueFrom exclude each other
    assert trainer["env"] == [
        {"name": "A", "value": "1"},
        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "C", "value": "3"},
    ]
    assert [m["mountPath"] for m in trainer["volumeMounts"]] == ["/dev/shm", "/cache"]
    assert [v["name"] for v in out["volumes"]] == ["dshm", "cache"]
    # the same volume name with another source replaces the source, never mixes two
    swapped = merge(out, {"volumes": [{"name": "cache", "emptyDir": {}}]})
    assert swapped["volumes"][1] == {"name": "cache", "emptyDir": {}}


def test_layers_apply_in_order_and_none_is_skipped() -> None:
    out = merge_layers(
        {"spec": {"priorityClassName": "base"}},
        None,
        {"spec": {"priorityClassName": "pipeline"}},
        {"spec": {"priorityClassName": "stage"}},
    )
    assert out["spec"]["priorityClassName"] == "stage"


def test_owned_conflicts_name_every_owned_value() -> None:
    template = {
        "metadata": {"labels": {"app.kubernetes.io/managed-by": "me", "team": "ok"}},
        "spec": {
            "hostname": "h",
            "containers": [
                {
                    "name": "trainer",
                    "args": ["x"],
                    "env": [{"name": "KUBERLHF_PIPELINE", "value": "{}"}, {"name": "HF_TOKEN", "value": "ok"}],
                },
                {"name": "sidecar", "command": ["ok"], "env": [{"name": "NODE_RANK", "value": "ok"}]},
            ],
        },
    }
    assert [p for p, _ in owned_conflicts(template)] == [
        "metadata.labels[app.kubernetes.io/managed-by]",
        "spec.hostname",
        "spec.containers[trainer].args",
        "spec.containers[trainer].env[KUBERLHF_PIPELINE]",
    ]


# --- the CRD carries the upstream PodSpec ------------------------------------------------------------------------


def _names(node: dict[str, Any], defs: dict[str, Any], path: str = "", seen: tuple[str, ...] = ()) -> set[str]:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return set() if name in seen else _names(defs[name], defs, path, (*seen, name))
    out = set()
    for key, child in (node.get("properties") or {}).items():
        out |= {f"{path}.{key}"} | _names(child, defs, f"{path}.{key}", seen)
    if isinstance(node.get("items"), dict):
        out |= _names(node["items"], defs, f"{path}[]", seen)
    return out


def test_every_upstream_pod_spec_field_is_in_the_crd() -> None:
    from kuberlhf_operator import podschema

    defs = podschema._definitions(podschema.SCHEMA_VERSION)
    upstream = {p for p in _names(defs[podschema.POD_SPEC], defs) if not p.startswith(".ephemeralContainers")}
    crd_spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    typed = crd_spec["podTemplate"]["properties"]["spec"]
    assert _names(typed, {}) == upstream
    assert len(upstream) > 500  # the whole PodSpec, not a subset
    assert pod_spec_schema()["properties"]["containers"]["items"]["required"] == ["name"]
    # the overlays the CRD leaves free-form are checked by kuberlhf with the very schema the CRD carries
    stages = crd_spec["stages"]["properties"]
    for node in [stages[s]["properties"]["podTemplate"] for s in stages] + [crd_spec["serving"]["properties"]["podTemplate"]]:
        assert node["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"] is True
        assert "properties" not in node["properties"]["spec"]
    assert shipped_pod_spec_schema() == {k: v for k, v in typed.items() if k != "description"}


def test_crd_fits_kubectls_client_side_apply_annotation() -> None:
    """kubectl apply stores the whole object in a 256 KiB annotation (less 8 KiB for the rest of the object).
    The bound keeps room for the spec to grow: one typed PodSpec (~41 KB), not one per podTemplate."""
    limit = 256 * 1024 - 8 * 1024
    for cel in (True, False):
        size = len(json.dumps(build_crd(cel), separators=(",", ":")))
        assert size < 0.5 * limit, f"CRD is {size} bytes of the {limit} kubectl apply's annotation allows"


# --- the docs' worked example -------------------------------------------------------------------------------------


def test_worked_example_builds_pods_with_the_users_cache_toleration_and_token() -> None:
    docs = worked_example()
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Secret", "RLHFPipeline"]
    manifest = docs[2]
    openapi = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator(openapi).validate(manifest)
    parsed = parse_pipeline(manifest)
    p = RLHFPipeline(metadata=ObjectMeta(name=OWNER.name, namespace=OWNER.namespace, uid=OWNER.uid), spec=parsed.spec)
    objs = children(p)  # strict-validated on every version below (variant "gpu" is this manifest)
    for version in STRICT_VERSIONS:
        for obj in docs[:2]:
            assert kubernetes_validate.validate(obj, version, strict=True) == version
    pods = {o["metadata"]["name"]: o["spec"]["template"] for o in objs if o["kind"] in ("Job", "Deployment")}
    assert len(pods) == 4
    for name, template in pods.items():
        spec = template["spec"]
        trainer = spec["containers"][0]
        assert trainer["name"] == "trainer" and trainer["command"][0] == "kuberlhf"
        env = {e["name"]: e for e in trainer["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert env["HF_HOME"]["value"] == "/cache/huggingface"
        assert {m["mountPath"] for m in trainer["volumeMounts"]} == {"/dev/shm", "/cache", "/home/kuberlhf", "/tmp"}
        assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}} in spec["volumes"]
        assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        is_ppo = name == "opt-1-3b-cached-ppo-1"
        assert ("nodeSelector" in spec) == is_ppo, name
    assert pods["opt-1-3b-cached-ppo-1"]["spec"]["containers"][0]["command"] == stage_command("ppo")


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_object_passes_strict_validation_on_1_25_to_1_35(variant) -> None:
    manifest = worked_example()[2]
    if variant == "cpu":
        manifest = {**manifest, "spec": {**manifest["spec"], "accelerator": "cpu", "deploymentType": "single_node"}}
    parsed = parse_pipeline(manifest)
    p = RLHFPipeline(metadata=ObjectMeta(name=OWNER.name, namespace=OWNER.namespace, uid=OWNER.uid), spec=parsed.spec)
    for obj in children(p):
        for version in STRICT_VERSIONS:
            assert kubernetes_validate.validate(obj, version, strict=True) == version, (obj["kind"], version)
