"""A pipeline can't borrow the operator's identity, and installs can pin images and ServiceAccounts: such a spec
is InvalidSpec naming the field, and no child is created."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from operator_sim import T0

from kuberlhf_operator.observe import Observed
from kuberlhf_operator.reconcile import OperatorConfig, PipelineMeta, config_from_env, reconcile

SPEC = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "opt-1.3b-single-gpu.yaml").read_text())[
    "spec"
]
META = PipelineMeta("chat", "kuberlhf", "uid-1")
OPERATOR = OperatorConfig(
    default_image="ghcr.io/kuberlhf/trainer:0.1.0", operator_service_account=("kuberlhf", "kuberlhf")
)


def _decide(spec, config=OPERATOR, meta=META):
    return reconcile(meta, spec, {}, Observed(), T0, None, config)


def _with(path: list[str], template: dict) -> dict:
    spec = copy.deepcopy(SPEC)
    node = spec
    for key in path:
        node = node.setdefault(key, {})
    node["podTemplate"] = template
    return spec


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ([], "spec.podTemplate.spec.serviceAccountName"),
        (["stages", "ppo"], "spec.stages.ppo.podTemplate.spec.serviceAccountName"),
        (["serving"], "spec.serving.podTemplate.spec.serviceAccountName"),
    ],
)
def test_the_operators_own_service_account_is_refused(path, field) -> None:
    d = _decide(_with(path, {"spec": {"serviceAccountName": "kuberlhf"}}))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "InvalidSpec"
    assert d.status["message"].startswith(f"{field}: 'kuberlhf' is the kuberlhf operator's own ServiceAccount")
    assert not d.actions
    # the same name in another namespace is that namespace's own ServiceAccount, not the operator's
    other = _decide(_with(path, {"spec": {"serviceAccountName": "kuberlhf"}}), meta=PipelineMeta("chat", "team-a", "u"))
    assert other.status.get("reason") != "InvalidSpec" and other.actions


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ({"podTemplate": {"spec": {"volumes": [{"name": "t", "secret": {"secretName": "kuberlhf-token-x7k2q"}}]}}},
         "spec.podTemplate.spec.volumes[0].secret.secretName"),
        ({"podTemplate": {"spec": {"volumes": [{"name": "t", "projected": {"sources": [
            {"secret": {"name": "kuberlhf-token-x7k2q"}}]}}]}}},
         "spec.podTemplate.spec.volumes[0].projected.sources[0].secret.name"),
        ({"podTemplate": {"spec": {"containers": [{"name": "trainer", "env": [{"name": "T", "valueFrom": {
            "secretKeyRef": {"name": "kuberlhf-token-x7k2q", "key": "token"}}}]}]}}},
         "spec.podTemplate.spec.containers[0].env[0].valueFrom.secretKeyRef.name"),
        ({"hfTokenSecretRef": {"name": "kuberlhf-token-x7k2q", "key": "token"}}, "spec.hfTokenSecretRef.name"),
    ],
)
def test_the_operators_token_secret_is_refused_in_its_own_namespace(where, field) -> None:
    """Before 1.24 the token controller keeps the operator's token in Secret <sa>-token-<x> of its namespace: a
    pipeline there that mounts or reads it would act as the operator just as with its ServiceAccount."""
    spec = {**copy.deepcopy(SPEC), **where}
    d = _decide(spec)
    assert d.status["reason"] == "InvalidSpec" and not d.actions
    assert d.status["message"].startswith(f"{field}: Secret 'kuberlhf-token-x7k2q' holds the kuberlhf operator's")
    # in another namespace that name is that namespace's own Secret
    assert _decide(spec, meta=PipelineMeta("chat", "team-a", "u")).actions


def test_allowlists_of_images_and_service_accounts() -> None:
    policy = OperatorConfig(
        default_image="registry.example.com/kuberlhf/trainer:0.1.0",
        allowed_images=("registry.example.com/kuberlhf/*",),
        allowed_service_accounts=("trainer",),
    )
    assert _decide(SPEC, policy).actions  # the default image matches, no ServiceAccount named
    d = _decide({**SPEC, "image": "docker.io/evil/miner:latest"}, policy)
    assert (
        d.status["reason"] == "InvalidSpec"
        and d.status["message"].startswith(
            "spec.image: image 'docker.io/evil/miner:latest' is not in this install's allowlist"
        )
        and not d.actions
    )
    side = _with([], {"spec": {"containers": [{"name": "sidecar", "image": "docker.io/evil/miner:1"}]}})
    assert _decide(side, policy).status["message"].startswith("spec.podTemplate.spec.containers[sidecar].image")
    sa = _decide(_with([], {"spec": {"serviceAccountName": "admin"}}), policy)
    assert sa.status["message"].startswith("spec.podTemplate.spec.serviceAccountName: ServiceAccount 'admin' is not")
    assert _decide(_with([], {"spec": {"serviceAccountName": "trainer"}}), policy).actions


def test_config_from_the_charts_env() -> None:
    cfg = config_from_env(
        {
            "POD_NAMESPACE": "ops",
            "KUBERLHF_SERVICE_ACCOUNT": "kuberlhf",
            "KUBERLHF_ALLOWED_IMAGES": "a/*, b/c:1",
            "KUBERLHF_ALLOWED_SERVICE_ACCOUNTS": "",
        }
    )
    assert cfg.operator_service_account == ("ops", "kuberlhf")
    assert cfg.allowed_images == ("a/*", "b/c:1") and cfg.allowed_service_accounts == ()
