"""The committed CRD is the generator's output, is structural, and agrees with the spec models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kuberlhf.contract.spec import SpecError, parse_pipeline, parse_spec
from kuberlhf_operator.crd import ASSETS, COPIES, build_crd, main, render, stale_copies, write_copies

REPO = Path(__file__).resolve().parents[2]


def openapi() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def server_accepts(doc: dict[str, Any]) -> bool:
    # OpenAPI 3.0 bounds (boolean exclusiveMinimum) are draft-4 JSON schema; x-kubernetes-* keys are ignored.
    return jsonschema.Draft4Validator(openapi()).is_valid(doc)


def models_accept(doc: dict[str, Any]) -> bool:
    try:
        parse_pipeline(doc)
        return True
    except SpecError:
        return False


VALID = {
    "apiVersion": "kuberlhf.io/v1alpha1",
    "kind": "RLHFPipeline",
    "metadata": {"name": "opt13b-chat"},
    "spec": {
        "deploymentType": "single_gpu",
        "actor": {"model": "facebook/opt-1.3b"},
        "reward": {"model": "facebook/opt-350m"},
        "data": {"datasets": ["Dahoas/rm-static", {"path": "./data/pairs.jsonl"}], "split": "2,4,4",
                 "unsupervised": {"name": "wikitext", "config": "wikitext-2-raw-v1"}, "maxSeqLen": 512},
        "storage": {"uri": "s3://bucket/prefix", "endpoint": "http://seaweedfs.kuberlhf:8333",
                    "secretRef": {"name": "s3-credentials"}},
        "stages": {"sft": {"nodes": 1, "gpusPerNode": 1, "zeroStage": 2, "lora": {"dim": 128},
                           "resources": {"limits": {"memory": "32Gi"}}},
                   "ppo": {"ema": {"enabled": True, "beta": 0.992}, "ptxCoef": 27.8, "hybridEngine": False}},
        "podTemplate": {"spec": {"nodeSelector": {"pool": "gpu"}, "tolerations": [{"operator": "Exists"}]}},
        "serving": {"enabled": True, "replicas": 1, "port": 8000},
        "suspend": False,
    },
}


def test_committed_crds_are_the_generator_output() -> None:
    """crds/ and the chart's files/ hold the generator's output, both variants, and the docs list the rules (one
    generator writes them all)."""
    assert stale_copies() == [], "regenerate: python -m kuberlhf_operator.crd --write"
    assert (REPO / "crds" / "rlhfpipelines.yaml").read_text() == render(cel=True)
    assert (REPO / "charts/kuberlhf/files/rlhfpipelines-pre-1.25.yaml").read_text() == render(cel=False)
    assert main(["--check"]) == 0


def test_generator_check_names_a_stale_copy(tmp_path: Path) -> None:
    for rel in [*COPIES, *ASSETS]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/kubernetes.md").write_text((REPO / "docs/kubernetes.md").read_text())
    write_copies(tmp_path)
    assert stale_copies(tmp_path) == []
    (tmp_path / "charts/kuberlhf/files/rlhfpipelines.yaml").write_text(render(cel=False))
    (asset,) = ASSETS
    (tmp_path / asset).write_text((tmp_path / asset).read_text().replace('"boolean"', '"string"', 1))
    (tmp_path / "docs/kubernetes.md").write_text(
        (REPO / "docs/kubernetes.md").read_text().replace("fp16 needs CUDA GPUs", "fp16 is fine"))
    assert stale_copies(tmp_path) == ["charts/kuberlhf/files/rlhfpipelines.yaml", asset, "docs/kubernetes.md"]


def test_crd_is_a_valid_v1_crd_with_status_and_columns() -> None:
    crd = build_crd()
    assert kubernetes_validate.validate(crd, "1.30", strict=True) == "1.30"
    # the oldest schema kubernetes-validate has; the real v1.20 server takes it in tests/e2e/test_crd_servers.py
    assert kubernetes_validate.validate(build_crd(cel=False), "1.25", strict=True) == "1.25"
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "rlhfpipelines.kuberlhf.io" and crd["spec"]["names"]["shortNames"] == ["rlhf"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Algorithm", "Graph", "Stage", "Phase", "Attempts", "Age", "Chat"]
    # kubectl get rlhf shows the algorithm; -o wide its stage graph (sft -> dpo, ...)
    assert columns["Algorithm"]["jsonPath"] == ".spec.algorithm" and columns["Graph"]["jsonPath"] == ".status.graph"
    assert columns["Graph"]["priority"] == 1
    status = openapi()["properties"]["status"]["properties"]
    for key in ("phase", "stage", "observedGeneration", "conditions", "stages", "chatEndpoint", "attempts", "graph"):
        assert key in status
    sft = status["stages"]["properties"]["sft"]["properties"]
    for key in ("phase", "jobName", "attempts", "startTime", "completionTime", "checkpoint", "manifestSha256"):
        assert key in sft
    cond = status["conditions"]["items"]["properties"]
    assert set(cond) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for k, v in (node.get("properties") or {}).items():
        out += _walk(v, f"{path}.{k}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural_and_defaults_are_valid() -> None:
    for path, node in _walk(openapi()):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs", "title"} & set(node), path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields") \
            or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert node.get("additionalProperties") is not False, path
        if "default" in node:
            assert jsonschema.Draft4Validator(node).is_valid(node["default"]), path
        # API servers before ~1.25 compare an integer value with an exclusive bound truncated to an integer
        # (maximum 0.5 -> 0), so `default: 0` under `exclusiveMaximum: 0.5` refused the whole CRD on 1.20.
        for bound, flag in (("maximum", "exclusiveMaximum"), ("minimum", "exclusiveMinimum")):
            if node.get(flag):
                assert float(node[bound]).is_integer(), f"{path}: exclusive {bound} {node[bound]} must be an integer"
    spec = openapi()["properties"]["spec"]
    # spec.reward is needed only by the algorithms with a reward stage: the preflight says so, not the schema
    assert spec["required"] == ["actor", "data", "storage"]
    assert spec["properties"]["algorithm"] == {**spec["properties"]["algorithm"], "default": "ppo",
                                               "enum": ["ppo", "dpo", "grpo"]}
    preserve = {p for p, n in _walk(spec) if n.get("x-kubernetes-preserve-unknown-fields")}
    assert ".data.datasets[]" in preserve and ".stages.sft.resources" in preserve
    # The upstream PodSpec schema, typed throughout (managedFields' fieldsV1 is free-form upstream too).
    assert {p for p in preserve if p.startswith(".podTemplate")} == {
        ".podTemplate.spec.volumes[].ephemeral.volumeClaimTemplate.metadata.managedFields[].fieldsV1"}
    stages = spec["properties"]["stages"]["properties"]
    # Preset-governed fields have no server default (the presets fill them per deploymentType) ...
    for field in ("nodes", "gpusPerNode", "zeroStage", "perDeviceBatchSize", "learningRate"):
        assert "default" not in stages["sft"]["properties"][field], field
    # ... concrete model defaults do.
    assert stages["sft"]["properties"]["backoffLimit"]["default"] == 2
    assert stages["ppo"]["properties"]["ema"]["properties"]["beta"]["default"] == 0.992
    assert spec["properties"]["deploymentType"]["default"] == "single_gpu"


def test_valid_example_is_accepted_by_both() -> None:
    assert server_accepts(VALID) and models_accept(VALID)


def _mutate(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(("path", "value"), [
    ("spec.stages.sft.nodes", -1),
    ("spec.stages.reward.gpusPerNode", 0),
    ("spec.deploymentType", "huge"),
    ("spec.accelerator", "tpu"),
    ("spec.storage", _DELETE),
    ("spec.storage.uri", "http://not-s3"),
    ("spec.stages.sft.zeroStage", 4),
    ("spec.stages.ppo.ema.beta", 1.0),
    ("spec.stages.sft.epochs", "three"),
    ("spec.serving.port", 70000),
    ("spec.data.datasets", []),
    ("spec.actor", _DELETE),
    ("spec.stages.sft.dtype", "int8"),
    ("spec.stages.sft.lrScheduler", "step"),
    ("metadata.name", "n" * 41),
    ("spec.podTemplate.spec.containers", [{"image": "no-name"}]),
])
def test_bad_specs_are_rejected_by_both(path: str, value: Any) -> None:
    doc = _mutate(path, value)
    assert not server_accepts(doc), f"CRD schema accepts {path}={value!r}"
    assert not models_accept(doc), f"models accept {path}={value!r}"


@pytest.mark.parametrize(("path", "value", "message"), [
    ("spec.podTemplate.spec.tolerations", "all", "spec.podTemplate.spec.tolerations: must be a list"),
    ("spec.stages.ppo.podTemplate.spec.hostIPC", "yes", "spec.stages.ppo.podTemplate.spec.hostIPC: must be a boolean"),
    ("spec.serving.podTemplate.spec.containers", [{"name": "trainer", "env": [{"name": "X", "valueFrom": {
        "secretKeyRef": {"name": "no-key"}}}]}],
     "spec.serving.podTemplate.spec.containers[trainer].env[X].valueFrom.secretKeyRef.key: required field is missing"),
    ("spec.podTemplate.spec.topologySpreadConstraints", [{"maxSkew": 1}],
     "spec.podTemplate.spec.topologySpreadConstraints[0].topologyKey: required field is missing"),
    ("spec.stages.sft.podTemplate.spec.containers", [{"name": "side", "imagez": "x"}],
     "spec.stages.sft.podTemplate.spec.containers[side].imagez: unknown field"),
    ("spec.stages.reward.podTemplate.spec.containers", [{"name": "side", "ports": [{"containerPort": "80"}]}],
     "spec.stages.reward.podTemplate.spec.containers[side].ports[0].containerPort: must be an integer"),
])
def test_every_pod_template_is_typed_by_the_crd_or_by_kuberlhf(path: str, value: Any, message: str) -> None:
    """spec.podTemplate.spec carries the upstream PodSpec schema in the CRD; the stage and serving overlays are
    free-form there (the CRD's size) and the models check them against the same schema: either way a bad value
    is refused naming the field, and by the models before any Job exists."""
    doc = _mutate(path, value)
    typed_by_crd = path.startswith("spec.podTemplate.")
    assert server_accepts(doc) is not typed_by_crd, f"CRD schema on {path}={value!r}"
    with pytest.raises(SpecError) as err:
        parse_pipeline(doc)
    assert message in str(err.value), str(err.value)


def test_pod_templates_of_the_examples_and_int_or_string_pass_kuberlhfs_check() -> None:
    good = {"containers": [{"name": "trainer", "resources": {"limits": {"memory": "1Gi", "cpu": 2}},
                            "ports": [{"containerPort": 8000.0}], "env": [{"name": "A", "value": "1"}]}],
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}],
            "nodeSelector": {"pool": "gpu"}, "hostIPC": None}
    doc = _mutate("spec.stages.ppo.podTemplate", {"spec": good})
    assert server_accepts(doc) and models_accept(doc)
    assert not models_accept(_mutate("spec.stages.ppo.podTemplate", {"spec": {**good, "nodeSelector": {"a": 1}}}))
    assert not models_accept(_mutate("spec.serving.podTemplate", {"spec": {"priority": True}}))


def test_examples_validate_against_crd_and_models() -> None:
    docs = []
    for f in sorted((REPO / "examples").glob("*.yaml")):
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") == "RLHFPipeline"]
    assert docs, "no RLHFPipeline examples found"
    for name, doc in docs:
        assert server_accepts(doc), name
        parse_spec(doc["spec"])
