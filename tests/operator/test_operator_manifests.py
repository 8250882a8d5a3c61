"""Every object the operator builds passes kubernetes-validate (strict) for a current Kubernetes, and carries
the stage contract (command, env, rendezvous, credentials by reference, GPUs, /dev/shm, podTemplate)."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from kuberlhf.contract.spec import ObjectMeta, RLHFPipeline, SpecError, parse_spec
from kuberlhf.contract.stage import stage_command
from kuberlhf_operator.manifests import (
    COMPLETION_INDEX_ANNOTATION,
    Owner,
    build_chat_api_key_secret,
    build_chat_deployment,
    build_chat_disruption_budget,
    build_chat_network_policy,
    build_chat_service,
    build_stage_job,
    build_stage_network_policy,
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
    spec["shmSize"] = "32Gi"
    spec["podTemplate"] = {
        "metadata": {"labels": {"team": "nlp"}, "annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": {
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
            "serviceAccountName": "trainer",
            "imagePullSecrets": [{"name": "regcred"}],
            "priorityClassName": "high",
            "runtimeClassName": "nvidia",
            "hostIPC": True,
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                           "whenUnsatisfiable": "ScheduleAnyway"}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
            "initContainers": [{"name": "warm-cache", "image": "busybox:1.36", "command": ["true"]}],
            "containers": [
                {"name": "trainer", "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                    "name": "hf", "key": "token"}}}],
                 "volumeMounts": [{"name": "model-cache", "mountPath": "/cache"}],
                 "resources": {"limits": {"vpc.amazonaws.com/efa": 4}}},
                {"name": "metrics-sidecar", "image": "prom/statsd-exporter:v0.26.0"},
            ],
            "volumes": [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}}],
        },
    }
    spec["serving"] = {"apiKeySecretRef": {"name": "chat-key"}, "resources": {"limits": {"nvidia.com/gpu": 1}}}
    return spec


def all_objects(p: RLHFPipeline) -> list[dict[str, Any]]:
    objs = []
    for stage in p.spec.stage_graph:
        objs += [build_stage_job(p, OWNER, stage, 3, default_image="img:1"), build_stage_service(OWNER, stage, 3),
                 build_stage_network_policy(p, OWNER, stage, 3)]
    return objs + [build_chat_deployment(p, OWNER, default_image="img:1"), build_chat_service(p, OWNER),
                   build_chat_network_policy(p, OWNER), build_chat_api_key_secret(OWNER),
                   build_chat_disruption_budget(p, OWNER)]


def validate(obj: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_manifest_passes_strict_validation(spec, gpu_spec, variant) -> None:
    p = pipeline(spec if variant == "cpu" else gpu_spec)
    objs = all_objects(p)
    assert {o["kind"] for o in objs} == {"Job", "Service", "Deployment", "NetworkPolicy", "Secret",
                                         "PodDisruptionBudget"}
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
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "64Gi", "ephemeral-storage": "2Gi"},
                              "limits": {"memory": "96Gi", "nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 4}}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["serviceAccountName"] == "trainer"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["priorityClassName"] == "high"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and "nodeAffinity" in pod["affinity"]
    assert pod["runtimeClassName"] == "nvidia" and pod["hostIPC"] is True and pod["securityContext"]["fsGroup"] == 1000
    assert pod["topologySpreadConstraints"][0]["maxSkew"] == 1
    assert [x["name"] for x in pod["containers"]] == ["trainer", "metrics-sidecar"]
    assert [x["name"] for x in pod["initContainers"]] == ["warm-cache"]
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert {"name": "model-cache", "mountPath": "/cache"} in c["volumeMounts"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}} in pod["volumes"]
    tmeta = js["template"]["metadata"]
    assert tmeta["labels"]["team"] == "nlp" and tmeta["labels"]["kuberlhf.io/stage"] == "sft"
    assert tmeta["annotations"] == {"sidecar.istio.io/inject": "false"}


def _home(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = job["spec"]["template"]["spec"]
    return next(v for v in pod["volumes"] if v["name"] == "home"), pod


def test_stage_scratch_is_sized_from_the_planner_with_a_matching_request(spec) -> None:
    """The HOME scratch of a stage pod: an emptyDir with the planner's per-node scratch estimate as its sizeLimit
    and as the container's ephemeral-storage request; an explicit size wins; a model the planner cannot read
    offline leaves it unsized; a storage class gives a generic ephemeral volume writable by the image's user."""
    from kuberlhf.planner.check import offline_shapes
    from kuberlhf.planner.estimate import GiB, estimate_pipeline

    big = pipeline(dict(spec, actor={"model": "facebook/opt-13b"}, reward={"model": "facebook/opt-350m"}))
    est = estimate_pipeline(big.spec, offline_shapes(big.spec)).stage("ppo").scratch_bytes
    assert est > 100 * GiB  # a 13B actor's checkpoint: far beyond any default
    home, pod = _home(job := build_stage_job(big, OWNER, "ppo", 0))
    size = f"{-(-est // GiB)}Gi"
    assert home == {"name": "home", "emptyDir": {"sizeLimit": size}}
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == size
    validate(job)

    explicit = pipeline(dict(spec, scratch={"size": "50Gi"}, stages={"sft": {"resources": {"requests": {
        "ephemeral-storage": "60Gi"}}}}))
    home, pod = _home(build_stage_job(explicit, OWNER, "sft", 0))
    assert home["emptyDir"] == {"sizeLimit": "50Gi"}
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "60Gi"  # the user's request wins

    unknown = pipeline(dict(spec, actor={"model": "s3://bucket/models/mine"}))
    home, pod = _home(build_stage_job(unknown, OWNER, "sft", 0))
    assert home == {"name": "home", "emptyDir": {}} and "ephemeral-storage" not in str(pod["containers"][0])

    claimed = pipeline(dict(spec, actor={"model": "facebook/opt-13b"}, scratch={"storageClassName": "fast-nvme"}))
    home, pod = _home(job := build_stage_job(claimed, OWNER, "sft", 0))
    claim = home["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "fast-nvme" and claim["accessModes"] == ["ReadWriteOnce"]
    assert claim["resources"]["requests"]["storage"].endswith("Gi") and int(claim["resources"]["requests"][
        "storage"][:-2]) > 100
    assert pod["securityContext"]["fsGroup"] == 10001 and "ephemeral-storage" not in str(pod["containers"][0])
    validate(job)


def test_stage_and_serving_templates_layer_over_the_pipeline_template(gpu_spec) -> None:
    gpu_spec["stages"]["ppo"] = {"podTemplate": {"spec": {
        "nodeSelector": {"gpu": "h100"},
        "containers": [{"name": "trainer", "image": "registry.example/trainer:ppo",
                        "env": [{"name": "HF_TOKEN", "value": "ppo-only"}]}]}}}
    gpu_spec["serving"]["podTemplate"] = {"metadata": {"labels": {"tier": "chat"}},
                                          "spec": {"tolerations": [], "priorityClassName": "serving"}}
    p = pipeline(gpu_spec)
    ppo = build_stage_job(p, OWNER, "ppo", 1)["spec"]["template"]
    sft = build_stage_job(p, OWNER, "sft", 1)["spec"]["template"]
    chat = build_chat_deployment(p, OWNER)["spec"]["template"]
    assert ppo["spec"]["nodeSelector"] == {"gpu": "h100"} and sft["spec"]["nodeSelector"] == {"gpu": "a100"}
    trainer = ppo["spec"]["containers"][0]
    assert trainer["image"] == "registry.example/trainer:ppo" and trainer["command"] == stage_command("ppo")
    assert [e for e in trainer["env"] if e["name"] == "HF_TOKEN"] == [{"name": "HF_TOKEN", "value": "ppo-only"}]
    assert {"name": "model-cache", "mountPath": "/cache"} in trainer["volumeMounts"]  # still the pipeline's
    assert chat["spec"]["tolerations"] == [] and chat["spec"]["priorityClassName"] == "serving"
    assert chat["metadata"]["labels"]["tier"] == "chat" and chat["metadata"]["labels"]["team"] == "nlp"
    assert chat["spec"]["containers"][0]["name"] == "trainer"
    assert {"name": "model-cache", "mountPath": "/cache"} in chat["spec"]["containers"][0]["volumeMounts"]
    for obj in (ppo, chat):
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": obj})


@pytest.mark.parametrize(("where", "template", "field"), [
    ("stages.ppo", {"spec": {"containers": [{"name": "trainer", "env": [{"name": "NODE_RANK", "value": "0"}]}]}},
     "spec.stages.ppo.podTemplate.spec.containers[trainer].env[NODE_RANK]"),
    ("", {"spec": {"containers": [{"name": "trainer", "command": ["bash"]}]}},
     "spec.podTemplate.spec.containers[trainer].command"),
    ("serving", {"spec": {"containers": [{"name": "trainer", "args": ["--port", "1"]}]}},
     "spec.serving.podTemplate.spec.containers[trainer].args"),
    ("stages.sft", {"spec": {"containers": [{"name": "trainer", "env": [
        {"name": "KUBERLHF_STAGE", "value": "ppo"}]}]}}, "spec.stages.sft.podTemplate.spec.containers[trainer]"
                                                         ".env[KUBERLHF_STAGE]"),
    ("", {"spec": {"containers": [{"name": "trainer", "env": [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {
        "secretKeyRef": {"name": "other", "key": "k"}}}]}]}},
     "spec.podTemplate.spec.containers[trainer].env[AWS_SECRET_ACCESS_KEY]"),
    ("", {"spec": {"volumes": [{"name": "dshm", "emptyDir": {}}]}}, "spec.podTemplate.spec.volumes[dshm]"),
    ("", {"spec": {"containers": [{"name": "trainer", "volumeMounts": [{"name": "x", "mountPath": "/dev/shm"}]}]}},
     "spec.podTemplate.spec.containers[trainer].volumeMounts[/dev/shm]"),
    ("", {"spec": {"restartPolicy": "OnFailure"}}, "spec.podTemplate.spec.restartPolicy"),
    ("", {"spec": {"subdomain": "mine"}}, "spec.podTemplate.spec.subdomain"),
    ("", {"metadata": {"labels": {"kuberlhf.io/stage": "not-mine"}}},
     "spec.podTemplate.metadata.labels[kuberlhf.io/stage]"),
])
def test_a_template_value_the_operator_owns_is_rejected_naming_the_field(spec, where, template, field) -> None:
    node = spec
    for part in [x for x in where.split(".") if x]:
        node = node.setdefault(part, {})
    node["podTemplate"] = template
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert f"{field}: set by the operator" in str(err.value)


def test_stage_env_may_not_override_the_contract(spec) -> None:
    spec["stages"]["reward"]["env"] = [{"name": "MASTER_ADDR", "value": "10.0.0.1"}]
    with pytest.raises(SpecError, match=r"spec\.stages\.reward\.env\[MASTER_ADDR\]: set by the operator"):
        parse_spec(spec)


def test_cpu_single_node_job_uses_loopback_and_no_gpus(spec) -> None:
    job = build_stage_job(pipeline(spec), OWNER, "ppo", 1, default_image="img:cpu", suspend=True)
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["DS_ACCELERATOR"] == "cpu"
    # declared: on a hostNetwork pod the API server makes it a hostPort, so the scheduler keeps a second stage pod
    # off the node instead of both binding it (docs/kubernetes.md, "The pod surface")
    assert c["ports"] == [{"name": "rendezvous", "containerPort": int(env["MASTER_PORT"]), "protocol": "TCP"}]
    assert c["resources"] == {"requests": {"ephemeral-storage": "2Gi"}}  # the scratch, no GPUs
    assert c["image"] == "img:cpu" and job["spec"]["suspend"] is True
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
