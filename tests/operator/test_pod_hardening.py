"""Stage and chat pods pass the Pod Security Standards restricted profile by default, with a read-only root
filesystem and emptyDir scratch where the code writes, carry no ServiceAccount token unless the user names a
ServiceAccount, and loosen only where the user's podTemplate says so explicitly."""

from __future__ import annotations

import copy

import pytest
import yaml
from scan import pss
from scan.render import example_children, examples

from kuberlhf.contract.spec import parse_pipeline
from kuberlhf.contract.stage import DEFAULT_STOP_GRACE_SECONDS
from kuberlhf_operator.manifests import IMAGE_HOME


def _pods(objects):
    return [
        (o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objects if o["kind"] in ("Job", "Deployment")
    ]


@pytest.mark.parametrize("example", examples(), ids=lambda p: p.stem)
def test_every_examples_pods_are_restricted_read_only_and_tokenless(example) -> None:
    pods = _pods(example_children(example))
    assert len(pods) >= 3
    for name, spec in pods:
        assert pss.violations(spec) == [], name
        assert spec["automountServiceAccountToken"] is False, name
        if name.endswith("-1"):  # stage Jobs: time to commit a checkpoint after SIGTERM
            assert spec["terminationGracePeriodSeconds"] == DEFAULT_STOP_GRACE_SECONDS
        trainer = spec["containers"][0]
        assert trainer["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for path in (IMAGE_HOME, "/tmp", "/dev/shm"):  # where the stage and the server write
            assert "emptyDir" in volumes[mounts[path]], (name, path)


def _with_template(example, template):
    doc = yaml.safe_load(example.read_text())
    doc["spec"]["podTemplate"] = template
    return doc


def _children_of(doc, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return _pods(example_children(path))


def test_naming_a_service_account_mounts_its_token_and_opt_outs_are_explicit(tmp_path) -> None:
    example = next(p for p in examples() if p.stem == "opt-66b-multi-node")
    doc = _with_template(
        example,
        {
            "spec": {
                "serviceAccountName": "trainer-irsa",
                "containers": [{"name": "trainer", "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}}}],
            }
        },
    )
    parse_pipeline(copy.deepcopy(doc))
    for name, spec in _children_of(doc, tmp_path):
        assert spec["serviceAccountName"] == "trainer-irsa" and "automountServiceAccountToken" not in spec, name
        caps = spec["containers"][0]["securityContext"]["capabilities"]
        assert caps == {"drop": ["ALL"], "add": ["IPC_LOCK"]}  # the rest of the restricted defaults stays
        assert {v.split(":")[0] for v in pss.violations(spec)} == {"Capabilities", "Capabilities (baseline)"}


def test_chat_deployment_rollout_deadline_covers_startup_and_replicas_spread(tmp_path) -> None:
    example = next(p for p in examples() if p.stem == "opt-1.3b-single-gpu")
    doc = yaml.safe_load(example.read_text())
    for replicas in (1, 3):
        doc["spec"].setdefault("serving", {})["replicas"] = replicas
        path = tmp_path / f"r{replicas}.yaml"
        path.write_text(yaml.safe_dump(doc))
        dep = next(o for o in example_children(path) if o["kind"] == "Deployment")
        probe = dep["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        assert dep["spec"]["progressDeadlineSeconds"] > probe["periodSeconds"] * probe["failureThreshold"]
        spread = dep["spec"]["template"]["spec"].get("topologySpreadConstraints")
        if replicas == 1:
            assert spread is None
        else:
            assert spread[0]["topologyKey"] == "kubernetes.io/hostname"
            assert spread[0]["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_an_install_can_opt_out_of_the_hardened_defaults(meta, spec) -> None:
    """The chart's policy.hardenedPods=false reaches the operator as KUBERLHF_HARDENED_PODS=false: its stage and chat
    pods then carry no securityContext of the operator's (the podTemplate decides), scratch volumes stay."""
    from chart.helm import render_chart
    from operator_sim import Cluster, complete

    from kuberlhf_operator.reconcile import config_from_env

    def operator_env(values: list[str]) -> dict[str, str]:
        dep = next(o for o in render_chart(set_values=values) if o["kind"] == "Deployment")
        return {e["name"]: e.get("value", "") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert config_from_env(operator_env([])).hardened_pods is True
    env = operator_env(["policy.hardenedPods=false"])
    assert env["KUBERLHF_HARDENED_PODS"] == "false"
    cluster = Cluster(meta, spec, config_from_env(env))
    for stage in ("sft", "reward", "ppo"):
        cluster.step()
        cluster.finish(f"{meta.name}-{stage}-1")
        cluster.step(complete(stage))
    for kind in ("Job", "Deployment"):
        pod = next(b for (k, _), b in cluster.bodies.items() if k == kind)["spec"]["template"]["spec"]
        assert "securityContext" not in pod and "securityContext" not in pod["containers"][0], kind
        assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {IMAGE_HOME, "/tmp", "/dev/shm"}
    hardened = Cluster(meta, spec, config_from_env({}))
    hardened.step()
    assert pss.violations(hardened.bodies[("Job", f"{meta.name}-sft-1")]["spec"]["template"]["spec"]) == []
