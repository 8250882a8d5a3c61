"""Secrets by reference: ``spec.hfTokenSecretRef`` reaches the stage pods as HF_TOKEN through a secretKeyRef (not the
chat pod), a user HF_TOKEN next to it is refused naming the field, and a planted secret value appears in nothing the
operator writes.

The planted-value test runs the operator object (controller.Operator) against an in-memory API that records every
write (the e2e tier runs the same object against the real kube-apiserver): the Secrets the pipeline names hold
random values, and the Jobs, Services, NetworkPolicies, status patches, Events and the operator's own log lines
are searched for them (raw and base64). The chat Deployment is built by the same pure builder the operator uses,
since reaching serving needs three stages' checkpoints."""

from __future__ import annotations

import base64
import json
import logging
import secrets
from typing import Any

import pytest
from operator_sim import FakeKube, secret

from kuberlhf.contract.spec import ObjectMeta, RLHFPipeline, SpecError, parse_spec
from kuberlhf_operator.controller import Operator
from kuberlhf_operator.manifests import Owner, build_chat_deployment, build_stage_job
from kuberlhf_operator.reconcile import OperatorConfig


class WritesKube(FakeKube):
    def __init__(self, *objects: dict[str, Any]) -> None:
        super().__init__(*objects)
        self.writes: list[Any] = []

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
        self.writes.append(body)
        self.objects[(kind, namespace, body["metadata"]["name"])] = {"kind": kind, **body}
        return True

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any], sub: str | None = None) -> Any:
        self.writes.append(body)
        obj = self.objects[(kind, namespace, name)]
        if sub == "status":
            obj["status"] = {k: v for k, v in {**(obj.get("status") or {}), **body["status"]}.items() if v is not None}
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)
        return obj


def with_refs(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "hfTokenSecretRef": {"name": "hf", "key": "token"},
            "serving": {"apiKeySecretRef": {"name": "chat-key"}}}


def test_the_hf_token_reaches_the_stage_pods_by_reference_only(spec) -> None:
    p = RLHFPipeline(metadata=ObjectMeta(name="tiny", namespace="team", uid="u1"), spec=parse_spec(with_refs(spec)))
    owner = Owner("tiny", "team", "u1")
    for stage in ("sft", "reward", "ppo"):
        env = build_stage_job(p, owner, stage, 1)["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in env
    chat = build_chat_deployment(p, owner)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "HF_TOKEN" not in {e["name"] for e in chat}


@pytest.mark.parametrize("where", ["podTemplate", "stage env"])
def test_a_second_hf_token_next_to_the_reference_is_refused_naming_the_field(spec, where) -> None:
    bad = with_refs(spec)
    if where == "podTemplate":
        bad["podTemplate"] = {"spec": {"containers": [{"name": "trainer", "env": [{"name": "HF_TOKEN", "value": "x"}]}]}}
        field = "spec.podTemplate.spec.containers[trainer].env[HF_TOKEN]"
    else:
        bad["stages"] = {**bad["stages"], "ppo": {**bad["stages"]["ppo"], "env": [{"name": "HF_TOKEN", "value": "x"}]}}
        field = "spec.stages.ppo.env[HF_TOKEN]"
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    assert f"{field}: set by the operator (from spec.hfTokenSecretRef)" in str(err.value)


def test_a_planted_secret_value_is_in_nothing_the_operator_writes(spec, caplog) -> None:
    planted = {name: f"planted-{secrets.token_hex(12)}" for name in ("hf", "s3", "chat")}
    kube = WritesKube(
        {"kind": "RLHFPipeline", "metadata": {"name": "tiny", "namespace": "team", "uid": "u1", "generation": 1,
                                              "resourceVersion": "1"}, "spec": with_refs(spec)},
        secret("team", "hf", {"token": planted["hf"]}),
        secret("team", "s3-credentials", {"AWS_ACCESS_KEY_ID": "AKIDPLANTED", "AWS_SECRET_ACCESS_KEY": planted["s3"]}),
        secret("team", "chat-key", {"API_KEY": planted["chat"]}),
    )
    events: list[Any] = []
    op = Operator(kube, OperatorConfig(default_image="img:1"), emit=lambda body, ev: events.append(ev))
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            op.reconcile_pipeline("team", "tiny")
    p = RLHFPipeline(metadata=ObjectMeta(name="tiny", namespace="team", uid="u1"), spec=parse_spec(with_refs(spec)))
    written = [*kube.writes, kube.objects[("RLHFPipeline", "team", "tiny")],
               build_chat_deployment(p, Owner("tiny", "team", "u1"), default_image="img:1"),
               [(e.type, e.reason, e.message) for e in events], caplog.text]
    text = json.dumps(written, default=str)
    assert any(w.get("kind") == "Job" for w in kube.writes if isinstance(w, dict))  # it did write the stage's Job
    assert '"secretKeyRef": {"name": "hf", "key": "token"}' in text  # by reference
    for value in planted.values():
        for form in (value, base64.b64encode(value.encode()).decode()):
            assert form not in text
