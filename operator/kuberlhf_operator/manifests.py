"""Pure builders of the Kubernetes objects a pipeline owns: per stage attempt an Indexed Job + headless Service,
and at the end the chat Deployment + Service. Plain dicts in, plain dicts out; no API calls."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kuberlhf.contract.pod import SHM_MOUNT, SHM_VOLUME, TRAINER_CONTAINER, merge_layers
from kuberlhf.contract.spec import API_GROUP, API_VERSION, KIND, Accelerator, PodTemplate, RLHFPipeline, Stage
from kuberlhf.contract.stage import (
    DEFAULT_MASTER_PORT,
    DEFAULT_STOP_GRACE_SECONDS,
    ENTRYPOINT,
    ENV_API_KEY,
    ENV_HF_TOKEN,
    ENV_NODE_RANK,
    ENV_S3_ACCESS_KEY,
    ENV_S3_SECRET_KEY,
    EXIT_USER_ERROR,
    StageLayout,
    num_nodes,
    stage_command,
    stage_env,
)
from kuberlhf.data.builtins import BUILTIN_PREFIX
from kuberlhf_operator import (
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_PIPELINE,
    LABEL_STAGE,
    MANAGED_BY,
)

# The Job controller (1.22+) writes the completion index here; NODE_RANK reads it through the downward API.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
MAX_NAME = 63
FALLBACK_IMAGE = "ghcr.io/kuberlhf/trainer:latest"
SERVING_STARTUP_SECONDS = 900  # first start downloads the model from the object store
# Labels of the pipeline that its stage Jobs and chat Deployment carry too: a queue manager (Kueue) reads them
# on the workload it manages, not on the pipeline. A Job with a queue name is created suspended, for the queue to
# admit (unsuspend) when its quota allows.
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
PROPAGATED_LABELS = (QUEUE_NAME_LABEL, PRIORITY_CLASS_LABEL)


def propagated_labels(pipeline_labels: Mapping[str, str]) -> dict[str, str]:
    """The pipeline's labels that its workloads (stage Jobs, chat Deployment) carry as well."""
    return {k: v for k, v in pipeline_labels.items() if k in PROPAGATED_LABELS}


@dataclass(frozen=True)
class Owner:
    """The pipeline that owns every child (its ownerReference and the object-store layout need these)."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        # blockOwnerDeletion: a foreground deletion of the pipeline (kubectl delete --cascade=foreground) waits
        # until its Jobs, Services and Deployment are gone. Setting it needs `update` on rlhfpipelines/finalizers
        # (the chart's RBAC grants it; the e2e API server enforces it).
        return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


def fit_name(name: str, limit: int = MAX_NAME) -> str:
    """A DNS-1123 label of at most ``limit`` characters; too-long names keep a hash suffix so they stay unique."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def job_name(pipeline: str, stage: Stage | str, attempt: int) -> str:
    # 63 minus room for the "-<index>" pod hostname suffix of Indexed Jobs.
    return fit_name(f"{pipeline}-{Stage(stage).value}-{attempt}", MAX_NAME - 4)


def chat_name(pipeline: str) -> str:
    return fit_name(f"{pipeline}-chat")


def chat_endpoint(pipeline: str, namespace: str, port: int) -> str:
    return f"http://{chat_name(pipeline)}.{namespace}.svc:{port}/v1"


def master_addr(pipeline: RLHFPipeline, stage: Stage | str, job: str) -> str:
    # One pod holds every rank of a single-node stage, so loopback is exact there and needs no DNS record
    # (the headless Service's records can lag the pod's start). Multi-node: rank 0's stable DNS name.
    if num_nodes(pipeline, stage) == 1:
        return "127.0.0.1"
    return f"{job}-0.{job}"


def stage_labels(owner: Owner, stage: Stage | str, attempt: int) -> dict[str, str]:
    return {
        LABEL_PIPELINE: owner.name,
        LABEL_STAGE: Stage(stage).value,
        LABEL_ATTEMPT: str(attempt),
        LABEL_COMPONENT: "stage",
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def chat_labels(owner: Owner) -> dict[str, str]:
    return {LABEL_PIPELINE: owner.name, LABEL_COMPONENT: "chat", LABEL_MANAGED_BY: MANAGED_BY}


def _meta(name: str, owner: Owner, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": dict(labels),
            "ownerReferences": [owner.reference()]}


def _credential_env(pipeline: RLHFPipeline) -> list[dict[str, Any]]:
    ref = pipeline.spec.storage.secret_ref
    if ref is None:
        return []
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}}
        for key in (ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY)
    ]


def _resources(user: dict[str, Any], gpus: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in user.items()}
    if gpus:
        out.setdefault("limits", {})["nvidia.com/gpu"] = gpus
    return out


# Pod Security Standards "restricted" by default, with a read-only root filesystem: the pod runs as the image's own
# non-root user (10001 in ours), and the code writes only to the image's HOME (model and tokenizer caches, the
# stage work dir, torch extensions), /tmp and /dev/shm, each an emptyDir. A user's podTemplate can loosen any of it
# explicitly (e.g. containers[trainer].securityContext.capabilities.add: [IPC_LOCK] for InfiniBand/GPUDirect).
IMAGE_HOME = "/home/kuberlhf"
IMAGE_UID = 10001
POD_SECURITY_CONTEXT: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                              "capabilities": {"drop": ["ALL"]}}
SCRATCH_MOUNTS = {"home": IMAGE_HOME, "tmp": "/tmp"}


def _hardened(spec: dict[str, Any], home: dict[str, Any] | None = None, security: bool = True) -> dict[str, Any]:
    """The operator's pod spec with the writable scratch its trainer container needs (``home``: the HOME volume's
    source, an unsized emptyDir by default) and (``security``) the restricted defaults; without, no securityContext
    of the operator's (the install's opt-out, OperatorConfig.hardened_pods) but the fsGroup a claim needs."""
    out = {**spec, **({"securityContext": copy.deepcopy(POD_SECURITY_CONTEXT)} if security else {})}
    if home and "ephemeral" in home:
        # a fresh PVC's root belongs to root: the volume's group lets the image's non-root user write to it
        out.setdefault("securityContext", {}).update(fsGroup=IMAGE_UID, fsGroupChangePolicy="OnRootMismatch")
    sources = {"home": home or {"emptyDir": {}}}
    out["volumes"] = [*spec.get("volumes", []), *({"name": n, **sources.get(n, {"emptyDir": {}})} for n in SCRATCH_MOUNTS)]
    containers = []
    for c in spec["containers"]:
        c = {**c, **({"securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT)} if security else {})}
        c["volumeMounts"] = [*c.get("volumeMounts", []),
                             *({"name": n, "mountPath": path} for n, path in SCRATCH_MOUNTS.items())]
        containers.append(c)
    out["containers"] = containers
    return out


def stage_scratch(pipeline: RLHFPipeline, stage: Stage) -> tuple[dict[str, Any], str | None]:
    """The HOME volume source of a stage's pods and the ephemeral-storage it requests (None: nothing to request).

    Sized from the memory planner (:func:`kuberlhf.planner.scratch.stage_scratch_bytes`): an emptyDir with that
    sizeLimit and a matching ``ephemeral-storage`` request, so the scheduler places the pod on a node with the disk
    and a checkpoint cannot fill the node's disk (DiskPressure evicts every pod there); with
    ``spec.scratch.storageClassName`` a generic ephemeral volume of that class instead (not node storage: no
    request). Unsized when the planner cannot read the models' configs without a download."""
    from kuberlhf.planner.scratch import UNSIZED_CLAIM, quantity, stage_scratch_bytes

    size = stage_scratch_bytes(pipeline.spec, stage.value)
    sc = pipeline.spec.scratch.storage_class_name
    if sc:
        claim = {"accessModes": ["ReadWriteOnce"], "storageClassName": sc,
                 "resources": {"requests": {"storage": quantity(size or UNSIZED_CLAIM)}}}
        return {"ephemeral": {"volumeClaimTemplate": {"spec": claim}}}, None
    if size is None:
        return {"emptyDir": {}}, None
    return {"emptyDir": {"sizeLimit": quantity(size)}}, quantity(size)


def _pod_template(pipeline: RLHFPipeline, labels: dict[str, str], spec: dict[str, Any],
                  override: PodTemplate | None, home: dict[str, Any] | None = None,
                  hardened: bool = True) -> dict[str, Any]:
    """The operator's pod, then spec.podTemplate, then the stage's or serving's podTemplate (kuberlhf.contract.pod;
    the spec models already rejected any template value the operator owns)."""
    base = {"metadata": {"labels": dict(labels)}, "spec": _hardened(spec, home, hardened)}
    layers = [pipeline.spec.pod_template, override]
    out = merge_layers(base, *(t.to_wire() for t in layers if t is not None))
    out["metadata"] = {k: v for k, v in out["metadata"].items() if v}  # no empty annotations map
    # No API token in the pod unless the user names the ServiceAccount it should act as (a stage never calls the
    # API server; an explicit automountServiceAccountToken in the template still wins).
    if not out["spec"].get("serviceAccountName"):
        out["spec"].setdefault("automountServiceAccountToken", False)
    return out


def _image(pipeline: RLHFPipeline, default_image: str | None) -> str:
    return pipeline.spec.image or default_image or FALLBACK_IMAGE


def _container_base(pipeline: RLHFPipeline, default_image: str | None) -> dict[str, Any]:
    c: dict[str, Any] = {"name": TRAINER_CONTAINER, "image": _image(pipeline, default_image),
                         "terminationMessagePolicy": "FallbackToLogsOnError"}  # log tail as failure message
    if pipeline.spec.image_pull_policy:
        c["imagePullPolicy"] = pipeline.spec.image_pull_policy
    return c


def _shm_volume(pipeline: RLHFPipeline) -> dict[str, Any]:
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": pipeline.spec.shm_size}}


def build_stage_service(owner: Owner, stage: Stage | str, attempt: int) -> dict[str, Any]:
    """Headless Service giving the Job's pods stable DNS names ``<job>-<i>.<svc>`` for the rendezvous."""
    name = job_name(owner.name, stage, attempt)
    labels = stage_labels(owner, stage, attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, owner, labels),
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve each other before any of them is Ready (there is no readiness probe).
            "publishNotReadyAddresses": True,
            "selector": {k: labels[k] for k in (LABEL_PIPELINE, LABEL_STAGE, LABEL_ATTEMPT, LABEL_COMPONENT)},
            "ports": [{"name": "rendezvous", "port": DEFAULT_MASTER_PORT, "targetPort": DEFAULT_MASTER_PORT,
                       "protocol": "TCP"}],
        },
    }


def pod_failure_policy() -> dict[str, Any]:
    """The stage's exit codes told to the Job controller (1.26+; older servers drop the field and the operator
    classifies the failed pods itself, observe.classify_failure): a user-error exit fails the Job at once, and a
    pod disrupted by the cluster (preemption, eviction, drain: the DisruptionTarget condition) is replaced within
    the same Job without counting as a failure."""
    # onPodConditions: [] on the exit-code rule: the published schema of 1.25-1.2x marks it required (the server
    # itself only refuses a rule with both non-empty), so strict clients accept the Job on every version.
    return {"rules": [
        {"action": "FailJob", "onPodConditions": [],
         "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_USER_ERROR]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def build_stage_job(
    pipeline: RLHFPipeline,
    owner: Owner,
    stage: Stage | str,
    attempt: int,
    *,
    default_image: str | None = None,
    suspend: bool = False,
    extra_labels: Mapping[str, str] | None = None,
    hardened: bool = True,
    job_suspend: bool = True,
    failure_policy: bool = True,
) -> dict[str, Any]:
    """The Indexed Job running every node of one stage attempt. ``pipeline`` is the spec the stage started with;
    ``extra_labels`` (:func:`propagated_labels`) go on the Job only, where a queue manager looks for them;
    ``hardened`` false leaves out the restricted-profile securityContext (the install's opt-out).

    What the server's Job API has (the operator reads its version at startup): ``job_suspend`` false (before 1.22,
    no ``spec.suspend``) holds a suspended Job at ``parallelism: 0`` instead, which the Job controller of every
    version honours (no pod is created) and the queue admits by setting ``parallelism`` to ``completions`` (:func:`job_held`);
    ``failure_policy`` false (before 1.26: no ``podFailurePolicy``) leaves the field out rather than have the server drop it."""
    stage = Stage(stage)
    name = job_name(owner.name, stage, attempt)
    st = pipeline.spec.stages.get(stage)
    nodes = num_nodes(pipeline, stage)
    labels = stage_labels(owner, stage, attempt)
    env = stage_env(pipeline, stage, namespace=owner.namespace, uid=owner.uid, attempt=attempt,
                    master_addr=master_addr(pipeline, stage, name))
    env_list: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    env_list.append({"name": ENV_NODE_RANK, "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}})
    env_list += _credential_env(pipeline)
    token = pipeline.spec.hf_token_secret_ref
    if token is not None:  # by reference only: the value never appears in the Job (nor in KUBERLHF_PIPELINE)
        env_list.append({"name": ENV_HF_TOKEN, "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    gpus = int(st.gpus_per_node) if pipeline.spec.accelerator is Accelerator.cuda else None  # preset-filled
    container = {
        **_container_base(pipeline, default_image),
        "command": stage_command(stage),
        "env": env_list,
        "ports": [{"name": "rendezvous", "containerPort": DEFAULT_MASTER_PORT, "protocol": "TCP"}],
        "volumeMounts": [{"name": SHM_VOLUME, "mountPath": SHM_MOUNT}],
    }
    resources = _resources(st.resources, gpus)
    home, disk = stage_scratch(pipeline, stage)
    if disk:
        resources.setdefault("requests", {}).setdefault("ephemeral-storage", disk)  # the user's value wins
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": name,  # with an Indexed Job, pod hostname <job>-<index> resolves as <job>-<index>.<svc>
        # on SIGTERM (preemption, drain) the stage finishes its step and commits a checkpoint before it exits;
        # Kubernetes' default 30 s is too short for that (podTemplate.spec.terminationGracePeriodSeconds wins)
        "terminationGracePeriodSeconds": DEFAULT_STOP_GRACE_SECONDS,
        "containers": [container],
        "volumes": [_shm_volume(pipeline)],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(name, owner, {**(extra_labels or {}), **labels}),
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": 0 if suspend and not job_suspend else nodes,
            # Retries are operator-managed attempts (new Job, resume from checkpoint), never pod restarts.
            "backoffLimit": 0,
            **({"podFailurePolicy": pod_failure_policy()} if failure_policy else {}),
            **({"suspend": bool(suspend)} if job_suspend else {}),
            "template": _pod_template(pipeline, labels, pod_spec, st.pod_template, home, hardened),
        },
    }


def job_held(job_spec: Mapping[str, Any]) -> bool:
    """A Job not admitted to run: ``spec.suspend``, or (servers without it) the ``parallelism: 0`` hold of
    :func:`build_stage_job`; the operator never builds a Job of parallelism 0 otherwise."""
    return bool(job_spec.get("suspend")) or job_spec.get("parallelism") == 0


def serving_model_uri(pipeline: RLHFPipeline, owner: Owner) -> str:
    layout = StageLayout.for_pipeline(pipeline, owner.namespace, owner.uid)
    spec = pipeline.spec
    return layout.serving_model_uri(spec.serving.use_ema, spec.final_ema_enabled, spec.final_stage)


def serve_command(pipeline: RLHFPipeline, owner: Owner) -> list[str]:
    sv = pipeline.spec.serving
    cmd = [ENTRYPOINT, "serve", "--model", serving_model_uri(pipeline, owner), "--host", "0.0.0.0",
           "--port", str(sv.port), "--max-new-tokens", str(sv.max_new_tokens)]
    if pipeline.spec.storage.endpoint:
        cmd += ["--storage-endpoint", pipeline.spec.storage.endpoint]
    return cmd


def build_chat_deployment(pipeline: RLHFPipeline, owner: Owner, *, default_image: str | None = None,
                          extra_labels: Mapping[str, str] | None = None, hardened: bool = True) -> dict[str, Any]:
    """The chat Deployment; ``extra_labels`` (:func:`propagated_labels`) go on it and its pods (Kueue's pod
    integration admits the pods of a Deployment by their queue-name label); ``hardened`` as for stage Jobs."""
    sv = pipeline.spec.serving
    name = chat_name(owner.name)
    labels = chat_labels(owner)
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}, *_credential_env(pipeline)]
    if pipeline.spec.accelerator is Accelerator.cpu:
        env.append({"name": "OMP_NUM_THREADS", "value": "1"})
    key_secret = api_key_secret_name(pipeline, owner)
    if key_secret is not None:
        env.append({"name": ENV_API_KEY, "valueFrom": {"secretKeyRef": {"name": key_secret, "key": API_KEY_KEY}}})

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures,
                "timeoutSeconds": 5}

    container = {
        **_container_base(pipeline, default_image),
        "command": serve_command(pipeline, owner),
        "env": env,
        "ports": [{"name": "http", "containerPort": sv.port, "protocol": "TCP"}],
        "startupProbe": probe("/readyz", 5, SERVING_STARTUP_SECONDS // 5),
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 6),
        "volumeMounts": [{"name": SHM_VOLUME, "mountPath": SHM_MOUNT}],
    }
    if sv.resources:
        container["resources"] = _resources(sv.resources, None)
    pod: dict[str, Any] = {"containers": [container], "volumes": [_shm_volume(pipeline)]}
    if sv.replicas > 1:
        # replicas on different nodes where the cluster allows it, so one node's loss leaves the chat answering
        pod["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                             "whenUnsatisfiable": "ScheduleAnyway",
                                             "labelSelector": {"matchLabels": dict(labels)}}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, owner, {**(extra_labels or {}), **labels}),
        "spec": {
            "replicas": sv.replicas,
            # not shorter than the startup budget (the first start downloads the model): a slow but healthy
            # rollout is not reported as failed (Kubernetes' default is 600 s)
            "progressDeadlineSeconds": SERVING_STARTUP_SECONDS + 60,
            "selector": {"matchLabels": dict(labels)},
            "template": _pod_template(pipeline, {**(extra_labels or {}), **labels}, pod, sv.pod_template,
                                      hardened=hardened),
        },
    }


def build_chat_service(pipeline: RLHFPipeline, owner: Owner) -> dict[str, Any]:
    port = pipeline.spec.serving.port
    labels = chat_labels(owner)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(chat_name(owner.name), owner, labels),
        "spec": {"type": "ClusterIP", "selector": dict(labels),
                 "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]},
    }


# --- the chat's API key --------------------------------------------------------------------------------------------
API_KEY_KEY = "API_KEY"  # the key of the Secret (the user's apiKeySecretRef, or the generated one)
# On a Secret the operator creates without data: the writer fills these keys with fresh random values at creation
# (reconcile stays pure; the value never passes through a decision, the status or a log).
GENERATED_KEYS_ANNOTATION = "kuberlhf.io/generated-keys"


def generated_api_key_secret_name(pipeline: str) -> str:
    return fit_name(f"{pipeline}-chat-api-key")


def api_key_secret_name(pipeline: RLHFPipeline, owner: Owner) -> str | None:
    """The Secret the chat pods read their API key from: the user's, else the generated one; None with auth off."""
    sv = pipeline.spec.serving
    if sv.api_key_secret_ref is not None:
        return sv.api_key_secret_ref.name
    return generated_api_key_secret_name(owner.name) if sv.auth else None


def build_chat_api_key_secret(owner: Owner) -> dict[str, Any]:
    """The generated API-key Secret, without its value (see GENERATED_KEYS_ANNOTATION); owned by the pipeline, so
    it goes with it. An existing Secret of that name is never overwritten (a create of it is a harmless 409)."""
    meta = _meta(generated_api_key_secret_name(owner.name), owner, chat_labels(owner))
    meta["annotations"] = {GENERATED_KEYS_ANNOTATION: API_KEY_KEY}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta}


def build_chat_disruption_budget(pipeline: RLHFPipeline, owner: Owner, *, api_version: str = "policy/v1") -> dict[str, Any]:
    """With several chat replicas, a node drain evicts them one at a time (at most one unavailable). ``api_version``:
    policy/v1 (1.21+) or policy/v1beta1 (older servers)."""
    labels = chat_labels(owner)
    return {"apiVersion": api_version, "kind": "PodDisruptionBudget",
            "metadata": _meta(chat_name(owner.name), owner, labels),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(labels)}}}


# --- NetworkPolicies -------------------------------------------------------------------------------------------------
# Enforced only where the cluster's network plugin implements NetworkPolicy (Calico, Cilium, ...); elsewhere the API
# server stores them and nothing changes. Each pod the operator makes is selected by exactly one policy with both
# directions, so it is default-deny: only what the rules below list is allowed.
DNS_PORTS = ({"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"})
HTTPS_PORT = 443


def _stage_selector(owner: Owner, stage: Stage | str, attempt: int) -> dict[str, str]:
    labels = stage_labels(owner, stage, attempt)
    return {k: labels[k] for k in (LABEL_PIPELINE, LABEL_STAGE, LABEL_ATTEMPT, LABEL_COMPONENT)}


def storage_port(pipeline: RLHFPipeline) -> int | None:
    """The TCP port the pods reach the object store on (None for file:// storage). An in-cluster endpoint's Service
    port must equal its pods' port, since policies see the pod port (the chart's SeaweedFS does)."""
    st = pipeline.spec.storage
    if st.uri.startswith("file://"):
        return None
    if not st.endpoint:
        return HTTPS_PORT  # AWS S3
    url = urlsplit(st.endpoint)
    return url.port or (80 if url.scheme == "http" else HTTPS_PORT)


def uses_hub(pipeline: RLHFPipeline) -> bool:
    """Whether a model, tokenizer or dataset is a Hugging Face hub name (downloaded over HTTPS)."""
    spec = pipeline.spec
    models = [x for ref in (spec.actor, spec.reward) if ref is not None for x in (ref.model, ref.tokenizer) if x]
    datasets = [d.name for d in [*spec.data.datasets, *spec.data.sft_only, spec.data.unsupervised] if d and d.name]
    local = ("s3://", "file://", "/", ".", "~", BUILTIN_PREFIX)
    return any(not ref.startswith(local) for ref in [*models, *datasets])


def _egress_out(pipeline: RLHFPipeline, *, hub: bool) -> list[dict[str, Any]]:
    ports = [dict(p) for p in DNS_PORTS]
    port = storage_port(pipeline)
    if port is not None:
        ports.append({"port": port, "protocol": "TCP"})
    if hub and port != HTTPS_PORT:
        ports.append({"port": HTTPS_PORT, "protocol": "TCP"})
    return [{"ports": ports}, *(copy.deepcopy(r) for r in pipeline.spec.network.egress)]


def _network_policy(name: str, owner: Owner, labels: dict[str, str], selector: dict[str, str],
                    ingress: list[dict[str, Any]], egress: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(name, owner, labels),
            "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": ingress, "egress": egress}}


def build_stage_network_policy(pipeline: RLHFPipeline, owner: Owner, stage: Stage | str, attempt: int) -> dict[str, Any]:
    """The pods of one stage attempt accept connections only from each other (the rendezvous port and NCCL's or
    gloo's own ports, which they pick at run time), and connect only to each other, DNS, the storage port and (for
    hub models or datasets) HTTPS, plus spec.network.egress."""
    peers = [{"podSelector": {"matchLabels": _stage_selector(owner, stage, attempt)}}]
    return _network_policy(job_name(owner.name, stage, attempt), owner, stage_labels(owner, stage, attempt),
                           _stage_selector(owner, stage, attempt), [{"from": peers}],
                           [{"to": copy.deepcopy(peers)}, *_egress_out(pipeline, hub=uses_hub(pipeline))])


def build_chat_network_policy(pipeline: RLHFPipeline, owner: Owner) -> dict[str, Any]:
    """The chat pods accept only their HTTP port, from serving.ingressFrom (default: the pipeline's namespace), and
    connect only to DNS and the storage port (the model download), plus spec.network.egress."""
    sv = pipeline.spec.serving
    peers = copy.deepcopy(sv.ingress_from) or [{"podSelector": {}}]
    labels = chat_labels(owner)
    return _network_policy(chat_name(owner.name), owner, labels, dict(labels),
                           [{"from": peers, "ports": [{"port": sv.port, "protocol": "TCP"}]}],
                           _egress_out(pipeline, hub=False))
