"""Unit tests of the process kubelet's pure rules (no control plane needed)."""

from __future__ import annotations

import pytest
from harness.podspec import (
    EnvResolutionError,
    container_argv,
    expand_vars,
    next_completion_index,
    rendezvous_scope,
    resolve_env,
    rewrite_cluster_hosts,
    rewrite_ports,
    termination_message,
)

POD = {"metadata": {"name": "p-0", "namespace": "ns", "uid": "u1", "labels": {"app": "x"},
                    "annotations": {"batch.kubernetes.io/job-completion-index": "3"}},
       "spec": {"nodeName": "n", "serviceAccountName": "sa"}}
SECRETS = {("ns", "s3"): {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk"}}
CMS = {("ns", "cfg"): {"MODE": "fast"}}


def _resolve(container: dict) -> dict[str, str]:
    return resolve_env(
        POD, container,
        lambda ns, n, k: SECRETS.get((ns, n), {}).get(k),
        lambda ns, n, k: CMS.get((ns, n), {}).get(k),
        lambda ns, n: SECRETS.get((ns, n)),
        lambda ns, n: CMS.get((ns, n)),
    )


def test_expand_vars_follows_kubernetes_rules():
    assert expand_vars("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"


def test_resolve_env_sources_and_order():
    env = _resolve({
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
            {"name": "IDX", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "URL", "value": "http://$(NAME):$(IDX)"},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k", "optional": True}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        ],
    })
    assert env == {"CFG_MODE": "fast", "KEY": "ak", "IDX": "3", "NAME": "p-0", "NS": "ns", "IP": "127.0.0.1",
                   "URL": "http://p-0:3", "CPU": "1"}


def test_missing_secret_key_names_it():
    with pytest.raises(EnvResolutionError, match="secret ns/s3 has no key 'NOPE'"):
        _resolve({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "NOPE"}}}]})


def test_container_argv_uses_entrypoint_and_expands():
    assert container_argv({"args": ["stage", "$(S)"]}, {"S": "sft"}, ["kuberlhf"]) == ["kuberlhf", "stage", "sft"]


@pytest.mark.parametrize(("value", "expected"), [
    ("job-sft-0-0.job-sft-0", "127.0.0.1"),
    ("job-sft-0-0.job-sft-0.ns", "127.0.0.1"),
    ("http://chat.ns.svc.cluster.local:8000/v1", "http://127.0.0.1:8000/v1"),
    ("http://chat:8000/v1", "http://127.0.0.1:8000/v1"),
    ("seaweedfs.kuberlhf.svc:8333", "127.0.0.1:8333"),
    ("facebook/opt-1.3b", "facebook/opt-1.3b"),
    ("kuberlhf.io/v1alpha1", "kuberlhf.io/v1alpha1"),
    ("chat", "chat"),  # a bare word is not an address unless it is a URL host
    ('{"endpoint": "http://chat:8000"}', '{"endpoint": "http://chat:8000"}'),
])
def test_rewrite_cluster_hosts(value, expected):
    services = {("ns", "job-sft-0"), ("ns", "chat"), ("kuberlhf", "seaweedfs")}
    assert rewrite_cluster_hosts(value, "ns", services) == expected


def test_rewrite_ports():
    argv, env = rewrite_ports(["serve", "--port", "8000", "--port=8000", "--max-new-tokens", "8000"],
                              {"PORT": "8000", "OTHER": "8000"}, {8000: 41000})
    assert argv == ["serve", "--port", "41000", "--port=41000", "--max-new-tokens", "8000"]
    assert env == {"PORT": "41000", "OTHER": "8000"}


def test_rendezvous_scope_is_the_pod_for_loopback_and_the_address_for_a_service():
    # a loopback rendezvous is each pod's own (single-node stages all write 127.0.0.1:29500) ...
    assert rendezvous_scope("ns", "pod-a", "127.0.0.1", "29500") != rendezvous_scope("ns", "pod-b", "127.0.0.1", "29500")
    assert rendezvous_scope("ns", "pod-a", "localhost", "29500") != rendezvous_scope("ns", "pod-b", "localhost", "29500")
    # ... a Service address is shared by every pod of the Job that writes it, and only by them
    job = rendezvous_scope("ns", "pod-a", "j-sft-1-0.j-sft-1", "29500")
    assert job == rendezvous_scope("ns", "pod-b", "j-sft-1-0.j-sft-1", "29500")
    assert job != rendezvous_scope("other", "pod-b", "j-sft-1-0.j-sft-1", "29500")
    assert job != rendezvous_scope("ns", "pod-b", "k-sft-1-0.k-sft-1", "29500")


def test_next_completion_index_fills_gaps():
    assert next_completion_index(set()) == 0
    assert next_completion_index({0, 2}) == 1


def test_termination_message_is_the_bounded_tail():
    text = "".join(f"line {i}\n" for i in range(200))
    msg = termination_message(text)
    assert msg.endswith("line 199") and "line 119\n" not in msg and len(msg.encode()) <= 2048
