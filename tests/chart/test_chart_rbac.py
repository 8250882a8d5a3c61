"""The chart's RBAC: exactly the verbs the operator uses, no wildcards, namespaced vs cluster-wide mode."""

from __future__ import annotations

import pytest

from chart.helm import render_chart

# What kuberlhf_operator does, per (apiGroup, resource): the only permissions the chart may grant.
NAMESPACED: dict[tuple[str, str], set[str]] = {
    ("kuberlhf.io", "rlhfpipelines"): {"get", "list", "watch", "patch"},  # kopf: list/watch/annotations
    ("kuberlhf.io", "rlhfpipelines/status"): {"patch"},  # handlers.reconcile_pipeline merge-patches status
    ("kuberlhf.io", "rlhfpipelines/finalizers"): {"update"},  # to set blockOwnerDeletion on children
    ("batch", "jobs"): {"create", "list", "watch", "patch", "delete"},  # patch: suspend; delete: 1.20 fallback
    ("", "services"): {"create", "list", "watch"},  # watch: the operator's child cache (kopf index)
    ("apps", "deployments"): {"create", "list", "watch"},
    ("", "pods"): {"list", "watch"},
    ("", "pods/log"): {"get"},
    ("", "events"): {"create", "list"},  # the operator's and kopf's Events; list: the Job controller's FailedCreate
    ("", "secrets"): {"get", "create"},  # get: spec.storage.secretRef's keys; create: the chat's API-key Secret
    ("networking.k8s.io", "networkpolicies"): {"create", "list", "watch"},  # per stage attempt and chat; watch: cache
    ("policy", "poddisruptionbudgets"): {"create"},  # the chat's, with replicas > 1
}
CRD_DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"}}
NAMESPACES = {("", "namespaces"): {"list", "watch"}}


def _grants(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {role['kind']}/{role['metadata']['name']}: {rule}"
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize(
    ("set_values", "namespaces"),
    [([], ["kuberlhf-system"]), (["watch.namespaces={team-a,team-b}"], ["team-a", "team-b"])],
)
def test_namespaced_mode_grants_a_role_per_watched_namespace(set_values: list[str], namespaces: list[str]) -> None:
    objects = render_chart(namespace="kuberlhf-system", set_values=set_values)
    roles = _by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
    for role in roles:
        assert _grants(role) == NAMESPACED
    (cluster_role,) = _by_kind(objects, "ClusterRole")
    assert _grants(cluster_role) == CRD_DISCOVERY  # nothing else cluster-wide; no namespaces, no secrets
    bindings = _by_kind(objects, "RoleBinding") + _by_kind(objects, "ClusterRoleBinding")
    assert len(bindings) == len(namespaces) + 1
    sa = _by_kind(objects, "ServiceAccount")[0]["metadata"]
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": "kuberlhf-system"}]
        target = next(r for r in roles + [cluster_role] if r["kind"] == b["roleRef"]["kind"]
                      and r["metadata"]["name"] == b["roleRef"]["name"]
                      and r["metadata"].get("namespace") == b["metadata"].get("namespace"))
        assert target


def test_cluster_wide_mode_uses_one_cluster_role() -> None:
    objects = render_chart(set_values=["watch.allNamespaces=true"])
    assert not _by_kind(objects, "Role") and not _by_kind(objects, "RoleBinding")
    (cluster_role,) = _by_kind(objects, "ClusterRole")
    assert _grants(cluster_role) == {**NAMESPACED, **CRD_DISCOVERY, **NAMESPACES}
    (binding,) = _by_kind(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]


def test_rbac_and_service_account_can_be_brought_by_the_admin() -> None:
    objects = render_chart(set_values=["rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=ops"])
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"}
    dep = next(o for o in objects if o["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
