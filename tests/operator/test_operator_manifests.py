"""Every object the operator builds passes kubernetes-validate (strict) for a current Kubernetes, and carries
the stage contract (command, env, rendezvous, credentials by reference, GPUs, /dev/shm, podTemplate)."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from kuberlhf.contract.spec import ObjectMeta, RLHFPipeline, Stage, parse_spec
from kuberlhf.contract.stage import stage_command
from kuberlhf_operator.manifests import (
    COMPLETION_INDEX_ANNOTATION,
    Owner,
    build_chat_deployment,
    build_chat_service,
    build_stage_job,
    build_stage_service,
    chat_name,
    fit_name,
    job_name,
)

K8S_VERSION = "1.30"
OWNER = Owner(name="opt13b-chat", namespace="team-a", uid="6f1c1b4e-0000-4000-8000-000000000001")


def pipeline(spec: dict[str, Any], name: str = OWNER.name) -> RLHFPipeline:
    return RLHFPipeline(metadata=ObjectMeta(name=name, namespace=OWNER.namespace, uid=OWNER.uid),
                        spec=parse_spec(spec))


@pytest.fixture()
def gpu_spec(spec: dict[str, Any]) -> dict[str, Any]:
    spec = dict(spec, accelerator="cuda", deploymentType="multi_node", image="registry.example/trainer:1.0",
                imagePullPolicy="IfNotPresent")
    spec["stages"] = {"sft": {"resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "96Gi"}},
                              "env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}}
    spec["podTemplate"] = {
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        "serviceAccountName": "trainer",
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "high",
        "labels": {"team": "nlp", "kuberlhf.io/stage": "not-mine"},
        "annotations": {"sidecar.istio.io/inject": "false"},
        "shmSize": "32Gi",
    }
    spec["serving"] = {"apiKeySecretRef": {"name": "chat-key"}, "resources": {"limits": {"nvidia.com/gpu": 1}}}
    return spec


def all_objects(p: RLHFPipeline) -> list[dict[str, Any]]:
    objs = []
    for stage in Stage:
        objs += [build_stage_job(p, OWNER, stage, 3, default_image="img:1"), build_stage_service(OWNER, stage, 3)]
    return objs + [build_chat_deployment(p, OWNER, default_image="img:1"), build_chat_service(p, OWNER)]


def validate(obj: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_manifest_passes_strict_validation(spec, gpu_spec, variant) -> None:
    p = pipeline(spec if variant == "cpu" else gpu_spec)
    objs = all_objects(p)
    assert {o["kind"] for o in objs} == {"Job", "Service", "Deployment"}
    for obj in objs:
        validate(obj)
        assert obj["metadata"]["ownerReferences"] == [OWNER.reference()]
        assert obj["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True
        assert obj["metadata"]["labels"]["kuberlhf.io/pipeline"] == OWNER.name
        assert len(obj["metadata"]["name"]) <= 63


def test_strict_validation_catches_a_bad_field(spec) -> None:
    job = build_stage_job(pipeline(spec), OWNER, "sft", 1)
    job["spec"]["completionsMode"] = "Indexed"  # a typo the strict schema must reject
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


def test_stage_job_runs_the_contract(gpu_spec) -> None:
    p = pipeline(gpu_spec)
    job = build_stage_job(p, OWNER, "sft", 2)
    assert job["metadata"]["name"] == "opt13b-chat-sft-2"
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"], js["backoffLimit"], js["suspend"]) == (
        "Indexed", 2, 2, 0, False)
    pod = js["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == "opt13b-chat-sft-2"
    c = pod["containers"][0]
    assert c["command"] == stage_command("sft") and c["image"] == "registry.example/trainer:1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"
    env = {e["name"]: e for e in c["env"]}
    assert env["MASTER_ADDR"]["value"] == "opt13b-chat-sft-2-0.opt13b-chat-sft-2"
    assert env["NNODES"]["value"] == "2" and env["NPROC_PER_NODE"]["value"] == "8"
    assert env["KUBERLHF_ATTEMPT"]["value"] == "2" and env["KUBERLHF_NAMESPACE"]["value"] == "team-a"
    assert env["KUBERLHF_PIPELINE_UID"]["value"] == OWNER.uid and env["NCCL_DEBUG"]["value"] == "INFO"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-credentials", "key": key}
        assert "value" not in env[key]
    manifest = json.loads(env["KUBERLHF_PIPELINE"]["value"])
    assert manifest["metadata"] == {"name": OWNER.name, "namespace": "team-a", "uid": OWNER.uid}
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "64Gi"},
                              "limits": {"memory": "96Gi", "nvidia.com/gpu": 8}}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["serviceAccountName"] == "trainer"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["priorityClassName"] == "high"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and "nodeAffinity" in pod["affinity"]
    tmeta = js["template"]["metadata"]
    assert tmeta["labels"]["team"] == "nlp" and tmeta["labels"]["kuberlhf.io/stage"] == "sft"  # ours win
    assert tmeta["annotations"] == {"sidecar.istio.io/inject": "false"}


def test_cpu_single_node_job_uses_loopback_and_no_gpus(spec) -> None:
    job = build_stage_job(pipeline(spec), OWNER, "ppo", 1, default_image="img:cpu", suspend=True)
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["DS_ACCELERATOR"] == "cpu"
    assert "resources" not in c and c["image"] == "img:cpu" and job["spec"]["suspend"] is True
    assert "nodeSelector" not in job["spec"]["template"]["spec"]


def test_headless_service_selects_exactly_the_attempts_pods(spec) -> None:
    job = build_stage_job(pipeline(spec), OWNER, "reward", 4)
    svc = build_stage_service(OWNER, "reward", 4)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["selector"]["kuberlhf.io/attempt"] == "4"


def test_chat_deployment_probes_command_and_credentials(gpu_spec) -> None:
    p = pipeline(gpu_spec)
    dep = build_chat_deployment(p, OWNER)
    assert dep["metadata"]["name"] == "opt13b-chat-chat"
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["kuberlhf", "serve", "--model", f"s3://bucket/pipelines/team-a/opt13b-chat/{OWNER.uid}/ppo/ema",
                            "--host", "0.0.0.0", "--port", "8000", "--max-new-tokens", "256",
                            "--storage-endpoint", "http://127.0.0.1:8333"]
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBERLHF_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "chat-key", "key": "API_KEY"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    svc = build_chat_service(p, OWNER)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_names_are_deterministic_and_fit() -> None:
    longest = "a" * 40  # the CRD's metadata.name limit
    assert job_name(longest, "reward", 999) == f"{longest}-reward-999"
    assert len(job_name(longest, "reward", 999)) + len("-99") <= 63  # pod hostname <job>-<index>
    assert len(chat_name(longest)) <= 63
    long = "x" * 80
    assert len(fit_name(long)) == 63 and fit_name(long) == fit_name(long) != fit_name("x" * 81)
    assert job_name("p", "sft", 1) == "p-sft-1"
