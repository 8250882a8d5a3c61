"""Per-pipeline NetworkPolicies, the chat's API key (generated Secret, user Secret, auth off) and its
PodDisruptionBudget: the pure builders and what reconcile creates.

The policies are checked by a small evaluator of NetworkPolicy semantics (``allowed`` below: pod selectors of the
same namespace and ports) rather than by a network plugin: none runs here, and the e2e tier's 1.20 API server
stores NetworkPolicies without enforcing them (tests/e2e/test_pipeline.py checks they are created there)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from operator_sim import Cluster, complete

from kuberlhf.contract.spec import RLHFPipeline, SpecError, parse_spec
from kuberlhf_operator.manifests import (
    API_KEY_KEY,
    GENERATED_KEYS_ANNOTATION,
    Owner,
    build_chat_deployment,
    build_chat_network_policy,
    build_stage_job,
    build_stage_network_policy,
    storage_port,
    uses_hub,
)
from kuberlhf_operator.reconcile import OperatorConfig, PipelineMeta
from kuberlhf_operator.writes import with_generated_values

OWNER = Owner("tiny", "team", "0000-uid")


def pipeline(spec: dict[str, Any]) -> RLHFPipeline:
    return RLHFPipeline(metadata={"name": "tiny", "namespace": "team"}, spec=parse_spec(spec))


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _port_ok(rule: dict[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports)


def allowed(
    policy: dict[str, Any],
    direction: str,
    pod: dict[str, str],
    peer: dict[str, str] | None,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether ``policy`` lets ``pod`` (labels) receive from / send to ``peer`` (labels of a pod in the same
    namespace; None = an address outside the cluster) on ``port``. A policy that does not select ``pod`` says
    nothing (True)."""
    spec = policy["spec"]
    if not _selects(spec["podSelector"], pod):
        return True
    key = {"ingress": "from", "egress": "to"}[direction]
    for rule in spec.get(direction) or []:
        peers = rule.get(key)
        if not _port_ok(rule, port, protocol):
            continue
        if not peers:
            return True
        for p in peers:
            if (
                "podSelector" in p
                and "namespaceSelector" not in p
                and peer is not None
                and _selects(p["podSelector"], peer)
            ):
                return True
    return False


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


def test_a_stage_attempt_talks_only_to_itself_dns_and_storage(spec: dict) -> None:
    p = pipeline(spec)
    policy = build_stage_network_policy(p, OWNER, "sft", 2)
    me = pod_labels(build_stage_job(p, OWNER, "sft", 2))
    other_attempt = pod_labels(build_stage_job(p, OWNER, "sft", 1))
    other_stage = pod_labels(build_stage_job(p, OWNER, "reward", 1))
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["metadata"]["name"] == "tiny-sft-2"
    for port in (29500, 41234):  # the rendezvous port and a port NCCL/gloo picks at run time
        assert allowed(policy, "ingress", me, me, port) and allowed(policy, "egress", me, me, port)
        for stranger in (other_attempt, other_stage, {"app": "anything"}):
            assert not allowed(policy, "ingress", me, stranger, port)
            assert not allowed(policy, "egress", me, stranger, port)
    assert allowed(policy, "egress", me, None, 53, "UDP") and allowed(policy, "egress", me, None, 53, "TCP")
    assert allowed(policy, "egress", me, None, 8333)  # spec.storage.endpoint http://127.0.0.1:8333
    assert not allowed(policy, "egress", me, None, 443)  # built-in model and data: no hub
    assert not allowed(policy, "ingress", me, None, 29500)
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "0000-uid"


def test_hub_models_open_https_and_extra_egress_is_appended(spec: dict) -> None:
    spec = copy.deepcopy(spec)
    spec["actor"]["model"] = "facebook/opt-1.3b"
    proxy = {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 3128, "protocol": "TCP"}]}
    spec["network"] = {"egress": [proxy]}
    p = pipeline(spec)
    policy = build_stage_network_policy(p, OWNER, "ppo", 1)
    me = pod_labels(build_stage_job(p, OWNER, "ppo", 1))
    assert allowed(policy, "egress", me, None, 443)
    assert proxy in policy["spec"]["egress"]
    assert proxy in build_chat_network_policy(p, OWNER)["spec"]["egress"]


@pytest.mark.parametrize(
    ("storage", "port"),
    [
        ({"uri": "s3://b/p"}, 443),
        ({"uri": "s3://b/p", "endpoint": "https://minio.storage:9000"}, 9000),
        ({"uri": "s3://b/p", "endpoint": "http://seaweedfs.kuberlhf"}, 80),
        ({"uri": "file:///data"}, None),
    ],
)
def test_storage_port_follows_the_endpoint(spec: dict, storage: dict, port: int | None) -> None:
    assert storage_port(pipeline({**spec, "storage": storage})) == port


def test_uses_hub(spec: dict) -> None:
    assert not uses_hub(pipeline(spec))
    assert uses_hub(pipeline({**spec, "data": {"datasets": ["Dahoas/rm-static"]}}))
    assert not uses_hub(pipeline({**spec, "reward": {"model": "s3://bucket/models/rm"}}))


def test_the_chat_accepts_only_its_port_from_its_namespace_by_default(spec: dict) -> None:
    p = pipeline(spec)
    policy = build_chat_network_policy(p, OWNER)
    chat = pod_labels(build_chat_deployment(p, OWNER))
    (rule,) = policy["spec"]["ingress"]
    assert rule == {"from": [{"podSelector": {}}], "ports": [{"port": 8000, "protocol": "TCP"}]}
    assert allowed(policy, "ingress", chat, {"app": "client"}, 8000)
    assert not allowed(policy, "ingress", chat, {"app": "client"}, 9090)
    assert allowed(policy, "egress", chat, None, 8333) and not allowed(policy, "egress", chat, None, 443)
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]
    spec = copy.deepcopy(spec)
    spec["serving"] = {"ingressFrom": peers, "port": 8080}
    (rule,) = build_chat_network_policy(pipeline(spec), OWNER)["spec"]["ingress"]
    assert rule == {"from": peers, "ports": [{"port": 8080, "protocol": "TCP"}]}


def _to_serving(cluster: Cluster) -> None:
    for stage in ("sft", "reward", "ppo"):
        cluster.step()
        cluster.finish(f"tiny-{stage}-1")
        cluster.step(complete(stage))


def created(cluster: Cluster, kind: str) -> list[str]:
    return [name for k, name in cluster.created if k == kind]


def test_reconcile_creates_one_policy_per_attempt_and_chat(cluster: Cluster) -> None:
    cluster.step()
    cluster.finish("tiny-sft-1", "Failed", failure="BackoffLimitExceeded")
    cluster.step()
    cluster.step()
    assert created(cluster, "NetworkPolicy") == ["tiny-sft-1", "tiny-sft-2"]  # once each, before the Job
    assert cluster.created.index(("NetworkPolicy", "tiny-sft-2")) < cluster.created.index(("Job", "tiny-sft-2"))
    cluster.network_policies.discard("tiny-sft-2")  # someone deleted it: made again
    cluster.step()
    assert created(cluster, "NetworkPolicy") == ["tiny-sft-1", "tiny-sft-2", "tiny-sft-2"]


def test_network_policies_can_be_turned_off(meta: PipelineMeta, spec: dict) -> None:
    cluster = Cluster(meta, {**spec, "network": {"policies": False}})
    _to_serving(cluster)
    assert created(cluster, "NetworkPolicy") == [] and created(cluster, "Job")


def test_the_chat_gets_a_generated_api_key_by_default(cluster: Cluster) -> None:
    _to_serving(cluster)
    assert created(cluster, "NetworkPolicy")[-1] == "tiny-chat"
    secret = cluster.bodies[("Secret", "tiny-chat-api-key")]
    assert "data" not in secret and "stringData" not in secret  # no value in a decision
    assert secret["metadata"]["annotations"] == {GENERATED_KEYS_ANNOTATION: API_KEY_KEY}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "0000-uid"
    env = {
        e["name"]: e
        for e in cluster.bodies[("Deployment", "tiny-chat")]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBERLHF_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "tiny-chat-api-key", "key": "API_KEY"}}
    assert cluster.status["chatApiKeySecret"] == "tiny-chat-api-key"
    for _ in range(2):
        cluster.step()
    assert created(cluster, "Secret") == ["tiny-chat-api-key"]  # once
    # The writer fills the value at creation: fresh, random, never the same twice.
    first, second = (with_generated_values(secret)["stringData"][API_KEY_KEY] for _ in range(2))
    assert len(first) >= 40 and first != second
    other = cluster.bodies[("Deployment", "tiny-chat")]
    assert with_generated_values(other) is other


def test_a_user_api_key_secret_is_referenced_not_generated(meta: PipelineMeta, spec: dict) -> None:
    cluster = Cluster(meta, {**spec, "serving": {"apiKeySecretRef": {"name": "team-key"}}})
    _to_serving(cluster)
    assert created(cluster, "Secret") == [] and cluster.status["chatApiKeySecret"] == "team-key"
    env = {
        e["name"]: e
        for e in cluster.bodies[("Deployment", "tiny-chat")]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBERLHF_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-key", "key": "API_KEY"}


def test_auth_off_serves_without_a_key_and_warns(meta: PipelineMeta, spec: dict) -> None:
    cluster = Cluster(meta, {**spec, "serving": {"auth": False}})
    _to_serving(cluster)
    cluster.step()
    assert created(cluster, "Secret") == [] and "chatApiKeySecret" not in cluster.status
    env = cluster.bodies[("Deployment", "tiny-chat")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "KUBERLHF_API_KEY" not in {e["name"] for e in env}
    warnings = [e for e in cluster.events if e.reason == "AuthDisabled"]
    assert len(warnings) == 1 and warnings[0].type == "Warning"
    cond = next(c for c in cluster.status["conditions"] if c["type"] == "AuthDisabled")
    assert cond["status"] == "True" and "spec.serving.auth" in cond["message"]


def test_auth_off_with_a_key_secret_is_refused_naming_the_field(spec: dict) -> None:
    with pytest.raises(SpecError, match=r"spec\.serving.*auth is false but apiKeySecretRef is set"):
        parse_spec({**spec, "serving": {"auth": False, "apiKeySecretRef": {"name": "k"}}})


@pytest.mark.parametrize("api_version", ["policy/v1", "policy/v1beta1"])
def test_several_chat_replicas_get_a_disruption_budget(meta: PipelineMeta, spec: dict, api_version: str) -> None:
    cluster = Cluster(meta, {**spec, "serving": {"replicas": 3}}, OperatorConfig(pdb_api_version=api_version))
    _to_serving(cluster)
    cluster.step()
    assert created(cluster, "PodDisruptionBudget") == ["tiny-chat"]
    pdb = cluster.bodies[("PodDisruptionBudget", "tiny-chat")]
    chat = pod_labels(cluster.bodies[("Deployment", "tiny-chat")])
    assert pdb["apiVersion"] == api_version and pdb["spec"]["maxUnavailable"] == 1
    assert _selects(pdb["spec"]["selector"], chat)


def test_one_chat_replica_has_no_disruption_budget(cluster: Cluster) -> None:
    _to_serving(cluster)
    assert created(cluster, "PodDisruptionBudget") == []
