"""The CRD on two real API servers: the current apiextensions-apiserver (CEL rules, strict field validation,
server-side apply) and the v1.20.2 kube-apiserver (no CEL: the operator's own checks stand in), fed the same
examples and the same bad specs (harness.rule_cases) and drawing the same messages.

Each server gets the CRD the chart installs for its version (``helm template --kube-version``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from chart.helm import render_chart
from harness.apiextensions import ExtensionsServer, find_apiextensions, operator_kube
from harness.controlplane import ControlPlane, ControlPlaneUnavailable
from harness.rest import ApiError, KubeREST
from harness.rule_cases import CASES, VALID, Case, messages_in
from harness.wait import wait_for

from kuberlhf.contract.preflight import preflight
from kuberlhf.contract.rules import TRANSITION_RULES, update_problems
from kuberlhf.contract.spec import SpecError, parse_pipeline, parse_spec

REPO = Path(__file__).resolve().parents[2]
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
NAME = "rlhfpipelines.kuberlhf.io"
STRICT = {"fieldValidation": "Strict"}
(STORAGE_RULE,) = TRANSITION_RULES


def chart_crd(kube_version: str) -> dict:
    (crd,) = [
        o for o in render_chart(extra_args=["--kube-version", kube_version]) if o["kind"] == "CustomResourceDefinition"
    ]
    return crd


def examples() -> list[dict]:
    docs = []
    for f in sorted((REPO / "examples").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") == "RLHFPipeline"]
    assert len(docs) >= 4
    return docs


def wait_established(api: KubeREST, name: str) -> None:
    def established() -> bool:
        conds = api.get(f"{CRDS}/{name}").get("status", {}).get("conditions", [])
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    wait_for(established, f"CRD {name} Established", timeout=30, interval=0.2)


def own_messages(doc: dict) -> set[str]:
    """The rule texts in what the operator's reconcile reports for ``doc``: the models' errors, else the
    preflight's problems (both are InvalidSpec, before any child exists)."""
    try:
        spec = parse_spec(doc["spec"])
    except SpecError as e:
        return messages_in(str(e))
    return messages_in("\n".join(str(p) for p in preflight(spec)))


@pytest.fixture(scope="module")
def current(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtensionsServer]:
    try:
        find_apiextensions()
    except ControlPlaneUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    with ExtensionsServer(tmp_path_factory.mktemp("apiextensions")) as server:
        crd = chart_crd(server.version)
        assert "x-kubernetes-validations" in json.dumps(crd), "the chart picked the pre-1.25 CRD for " + server.version
        server.api.request("POST", CRDS, crd, query=STRICT)
        wait_established(server.api, NAME)
        yield server


def objects(ns: str = "default") -> str:
    return f"/apis/kuberlhf.io/v1alpha1/namespaces/{ns}/rlhfpipelines"


def test_current_server_takes_every_example_and_rejects_each_bad_spec_with_the_rule_message(
    current: ExtensionsServer,
) -> None:
    major_minor = tuple(int(x) for x in current.version.lstrip("v").split(".")[:2])
    assert major_minor >= (1, 30), current.version
    for doc in examples():
        current.api.request("POST", objects(), doc, query=STRICT)
    current.api.request("POST", objects(), VALID, query=STRICT)
    # dpo and grpo with no stage settings at all: their CEL rules hold on the server's defaults (or guard absences)
    for name, patch in (("bare-dpo", {"algorithm": "dpo", "reward": None}), ("bare-grpo", {"algorithm": "grpo"}),
                        ("bare-grpo-code", {"algorithm": "grpo", "reward": None,
                                            "stages": {"grpo": {"rewardFunction": "rewards:score"}},
                                            "data": {"split": "2,0,8"}})):
        doc = Case(name, patch).doc()
        assert own_messages(doc) == set(), name
        current.api.request("POST", objects(), doc, query=STRICT)
    for case, rule in CASES:
        doc = case.doc()
        assert own_messages(doc) == {rule.text}, case.name
        if rule.cel is None:  # the one rule CEL cannot express: the server takes it, kuberlhf refuses it
            current.api.request("POST", objects(), doc, query=STRICT)
            continue
        with pytest.raises(ApiError) as err:
            current.api.request("POST", objects(), doc, query=STRICT)
        assert err.value.status == 422, err.value
        assert messages_in(err.value.body["message"]) == {rule.text}, (case.name, err.value.body["message"])


def test_current_server_strict_fields_and_server_side_apply(current: ExtensionsServer) -> None:
    doc = copy.deepcopy(VALID)
    doc["metadata"]["name"] = "typo"
    doc["spec"]["stages"] = {"sft": {"epochz": 3}}
    with pytest.raises(ApiError) as err:
        current.api.request("POST", objects(), doc, query=STRICT)
    assert err.value.status == 400 and 'unknown field "spec.stages.sft.epochz"' in err.value.body["message"]
    with pytest.raises(SpecError, match=r"spec.stages.sft.epochz: unknown field"):
        parse_pipeline(doc)
    # without Strict the server prunes the typo (what a v1.20 server always does)
    created = current.api.request("POST", objects(), doc)
    assert "epochz" not in json.dumps(created["spec"])

    applied = copy.deepcopy(VALID)
    applied["metadata"]["name"] = "applied"
    path = f"{objects()}/applied"
    first = current.api.apply(path, applied, "kuberlhf-test", **STRICT)
    assert first["spec"]["stages"]["sft"]["backoffLimit"] == 2  # structural defaults filled
    applied["spec"]["stages"] = {"sft": {"epochs": 3}}
    second = current.api.apply(path, applied, "kuberlhf-test", **STRICT)
    assert second["spec"]["stages"]["sft"]["epochs"] == 3
    assert second["metadata"]["generation"] == 2
    assert [m["manager"] for m in second["metadata"]["managedFields"]] == ["kuberlhf-test"]
    bad = copy.deepcopy(applied)
    bad["spec"]["stages"]["ppo"] = {"ema": {"enabled": False}}
    with pytest.raises(ApiError) as err:
        current.api.apply(path, bad, "kuberlhf-test", **STRICT)
    assert err.value.status == 422 and messages_in(err.value.body["message"]) == own_messages(bad) != set()


def test_operator_client_writes_strict_on_the_current_server(current: ExtensionsServer) -> None:
    """The operator's own client (``kube.Kube`` on the kubernetes ``DynamicClient``) against the current server:
    it finds fieldValidation (1.25+) and sends Strict, so an object or a status write with a field the CRD does
    not know is refused naming that field (a v1.20 server prunes it: test_api_validation's fallback test), while
    the same writes without the typo are stored as sent."""
    from kubernetes.client.exceptions import ApiException

    from kuberlhf_operator.writes import write_status

    kube = operator_kube(current)
    assert kube.server_version() >= (1, 30) and kube.strict_writes() is True
    doc = copy.deepcopy(VALID)
    doc["metadata"]["name"] = "strict-operator"
    doc["spec"]["stages"] = {"sft": {"epochz": 3}}
    with pytest.raises(ApiException) as err:
        kube.create("RLHFPipeline", "default", doc)
    assert err.value.status == 400 and 'unknown field "spec.stages.sft.epochz"' in json.loads(err.value.body)["message"]
    assert kube.get("RLHFPipeline", "default", "strict-operator") is None  # refused, not stored pruned
    doc["spec"]["stages"] = {"sft": {"epochs": 3}}
    assert kube.create("RLHFPipeline", "default", doc) is True
    body = kube.get("RLHFPipeline", "default", "strict-operator")
    assert body is not None and body["spec"]["stages"]["sft"]["epochs"] == 3
    with pytest.raises(ApiException) as err:
        write_status(kube, body, {"phase": "Pending", "stagez": "sft"})
    message = json.loads(err.value.body)["message"]
    # a create's strict error is a BadRequest (400), a patch's an Invalid (422); both name the field
    assert err.value.status == 422 and 'unknown field "status.stagez"' in message, message
    write_status(kube, body, {"phase": "Pending", "stage": "sft"})
    stored = kube.get("RLHFPipeline", "default", "strict-operator")
    assert stored is not None and stored["status"] == {"phase": "Pending", "stage": "sft"}


def test_current_server_types_the_pipeline_pod_template_and_kuberlhf_the_stage_ones(current: ExtensionsServer) -> None:
    """The CRD types only spec.podTemplate.spec (one PodSpec schema: the CRD's size): the server refuses a bad
    value there; the same value in a stage's podTemplate is free-form to the server and refused by kuberlhf's own
    check (what the operator reports as InvalidSpec before any Job), naming the field."""
    doc = copy.deepcopy(VALID)
    doc["metadata"]["name"] = "pod-typed"
    doc["spec"]["podTemplate"] = {"spec": {"hostIPC": "yes"}}
    with pytest.raises(ApiError) as err:
        current.api.request("POST", objects(), doc, query=STRICT)
    assert err.value.status == 422 and "spec.podTemplate.spec.hostIPC" in err.value.body["message"], err.value
    del doc["spec"]["podTemplate"]
    doc["metadata"]["name"] = "pod-untyped"
    doc["spec"]["stages"] = {"ppo": {"podTemplate": {"spec": {"hostIPC": "yes"}}}}
    stored = current.api.request("POST", objects(), doc, query=STRICT)
    with pytest.raises(SpecError, match=r"spec\.stages\.ppo\.podTemplate\.spec\.hostIPC: must be a boolean"):
        parse_spec(stored["spec"])


def test_current_server_keeps_storage_once_started(current: ExtensionsServer) -> None:
    doc = copy.deepcopy(VALID)
    doc["metadata"]["name"] = "started"
    path = f"{objects()}/started"
    current.api.request("POST", objects(), doc, query=STRICT)
    other = {"spec": {"storage": {"uri": "s3://other/prefix"}}}
    current.api.merge_patch(path, other)  # not started yet: storage may change
    old = current.api.get(path)
    started = current.api.request(
        "PATCH",
        f"{path}/status",
        {"status": {"stages": {"sft": {"phase": "Running", "startTime": "2026-12-01T00:00:00Z"}}}},
        content_type="application/merge-patch+json",
    )
    assert started["status"]["stages"]["sft"]["startTime"]
    new = copy.deepcopy(started)
    new["spec"]["storage"]["uri"] = "s3://bucket/prefix"
    with pytest.raises(ApiError) as err:
        current.api.merge_patch(path, {"spec": {"storage": {"uri": "s3://bucket/prefix"}}})
    assert err.value.status == 422 and messages_in(err.value.body["message"]) == {STORAGE_RULE.text}
    # kuberlhf's own half of the rule judges the same update the same way; before the start it let it through
    assert update_problems(new, started) == [STORAGE_RULE]
    assert update_problems(new, old) == []
    current.api.merge_patch(path, {"spec": {"stages": {"sft": {"epochs": 2}}}})  # other fields still change


def test_v120_server_takes_the_chart_crd_and_kuberlhf_checks_what_it_cannot(
    control_plane: ControlPlane, crd: str
) -> None:
    """v1.20 knows no CEL: its API silently drops x-kubernetes-validations (even with fieldValidation=Strict,
    which it ignores) and kubectl's schema check rejects the key, so the chart installs the pre-1.25 variant;
    the bad specs are then accepted by the server and refused by the operator's own check, same messages."""
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    assert chart_crd("1.20.2") == chart_crd("1.24.0")
    assert "x-kubernetes-validations" not in json.dumps(chart_crd("1.20.2"))
    # the CEL variant, under a probe group so it does not clash with the session's CRD
    probe = chart_crd("1.30.0")
    probe["metadata"]["name"] = "rlhfpipelines.probe.kuberlhf.io"
    probe["spec"]["group"] = "probe.kuberlhf.io"
    stored = api.request("POST", CRDS, probe, query=STRICT)
    assert "x-kubernetes-validations" not in json.dumps(stored)
    api.delete(f"{CRDS}/{probe['metadata']['name']}")
    kubectl = control_plane.kubectl(
        "apply", "--dry-run=server", "-f", str(REPO / "crds" / "rlhfpipelines.yaml"), check=False
    )
    assert kubectl.returncode != 0 and 'unknown field "x-kubernetes-validations"' in kubectl.stderr

    served = api.get(f"{CRDS}/{crd}")
    assert served["spec"]["versions"][0]["schema"] == chart_crd("1.20.2")["spec"]["versions"][0]["schema"]
    ns = "default"
    for doc in examples():
        doc = copy.deepcopy(doc)
        doc["metadata"]["name"] = f"v120-{doc['metadata']['name']}"
        api.post(objects(ns), doc)
        api.delete(f"{objects(ns)}/{doc['metadata']['name']}")
    for case, rule in CASES:
        doc = case.doc()
        doc["metadata"]["name"] = f"v120-{case.name}"
        back = api.post(objects(ns), doc)  # no CEL here
        assert own_messages(back) == {rule.text}, case.name
        api.delete(f"{objects(ns)}/{doc['metadata']['name']}")
