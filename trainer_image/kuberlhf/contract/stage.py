"""The stage contract: how a stage is started (command + env) and where it reads and writes (object-store
layout). Defined once here; the operator's Job builder and the local runner both import it, and the stage
entrypoint (``kuberlhf stage NAME``) reads it back with :func:`StageContext.from_env`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kuberlhf.contract.spec import RLHFPipeline, Stage, parse_pipeline

# --- environment variable names (the wire format of the contract) ---------------------------------------
ENV_PIPELINE = "KUBERLHF_PIPELINE"  # the whole RLHFPipeline manifest as JSON (metadata + resolved spec)
ENV_NAMESPACE = "KUBERLHF_NAMESPACE"
ENV_PIPELINE_UID = "KUBERLHF_PIPELINE_UID"
ENV_STAGE = "KUBERLHF_STAGE"
ENV_ATTEMPT = "KUBERLHF_ATTEMPT"
ENV_OUTPUT_DIR = "KUBERLHF_LOCAL_OUTPUT"  # optional: also copy the stage's results here (local runner)
ENV_WORK_DIR = "KUBERLHF_WORK_DIR"  # optional: root of the node-local scratch (local runner: its output dir)
# torchrun-style rendezvous; NODE_RANK is JOB_COMPLETION_INDEX on Kubernetes
ENV_NNODES = "NNODES"
ENV_NODE_RANK = "NODE_RANK"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
# S3 credentials: from the Secret in spec.storage.secretRef, never from the manifest
ENV_S3_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_S3_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
# a Hugging Face token for gated hub models/datasets (from spec.hfTokenSecretRef, stage pods only)
ENV_HF_TOKEN = "HF_TOKEN"
# optional chat-server API key (from spec.serving.apiKeySecretRef, key API_KEY); unset = no auth
ENV_API_KEY = "KUBERLHF_API_KEY"
# S3 endpoint of `kuberlhf serve|chat` for s3:// models (same as their --storage-endpoint flag)
ENV_STORAGE_ENDPOINT = "KUBERLHF_STORAGE_ENDPOINT"

DEFAULT_MASTER_PORT = 29500
ENTRYPOINT = "kuberlhf"

# --- how a stage process ends (the operator classifies a failed pod by these) ------------------------------
# The stage's configuration is wrong (a spec field, a dataset, a model path, the bucket or its keys): retrying
# cannot help, so the operator fails the pipeline at once. EX_CONFIG of sysexits.h.
EXIT_USER_ERROR = 78
# The object store stayed unreachable (or answered 5xx) past the stage's retry budget: retried as a new attempt.
# EX_UNAVAILABLE of sysexits.h.
EXIT_STORAGE_UNAVAILABLE = 69
# Stopped by SIGTERM (preemption, node drain, eviction) after committing a resumable checkpoint: 128 + SIGTERM,
# what a container runtime reports for a process that SIGTERM ended.
EXIT_INTERRUPTED = 143
# Seconds a stage may take after SIGTERM to finish its step and commit a checkpoint before it is killed. The pod's
# terminationGracePeriodSeconds must cover it (one step + one checkpoint upload).
ENV_STOP_GRACE_SECONDS = "KUBERLHF_STOP_GRACE_SECONDS"
DEFAULT_STOP_GRACE_SECONDS = 300
# How long a stage retries an unreachable object store (or one answering 5xx) before it gives up on the attempt.
ENV_STORAGE_RETRY_SECONDS = "KUBERLHF_STORAGE_RETRY_SECONDS"
DEFAULT_STORAGE_RETRY_SECONDS = 300
# Where the stage reports what it committed when it succeeds (the Pod's terminationMessagePath).
ENV_TERMINATION_LOG = "KUBERLHF_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"

# --- object-store layout -------------------------------------------------------------------------------
MODEL_DIR = "model"
EMA_DIR = "ema"
CKPT_DIR = "ckpt"
TENSORBOARD_DIR = "tensorboard"  # <stage>/tensorboard/: event files of a stage run with `tensorboard: true`
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
COMPLETE_MARKER = "_COMPLETE"


def stage_command(stage: Stage | str) -> list[str]:
    """The container command of every pod of a stage."""
    return [ENTRYPOINT, "stage", Stage(stage).value]


def nproc_per_node(pipeline: RLHFPipeline, stage: Stage | str) -> int:
    return int(pipeline.spec.stages.get(stage).gpus_per_node)  # filled by the deploymentType preset


def num_nodes(pipeline: RLHFPipeline, stage: Stage | str) -> int:
    return int(pipeline.spec.stages.get(stage).nodes)


def pipeline_json(pipeline: RLHFPipeline) -> str:
    """The manifest as the stage receives it: the resolved spec (presets applied), no status."""
    wire = pipeline.to_wire()
    wire["metadata"] = {k: v for k, v in wire["metadata"].items() if k in ("name", "namespace", "uid")}
    return json.dumps(wire, separators=(",", ":"), sort_keys=True)


def stage_env(
    pipeline: RLHFPipeline,
    stage: Stage | str,
    *,
    namespace: str,
    uid: str,
    attempt: int,
    master_addr: str,
    master_port: int = DEFAULT_MASTER_PORT,
    node_rank: int | None = None,
) -> dict[str, str]:
    """The non-secret env of a stage process. ``node_rank=None`` leaves NODE_RANK to the caller (Kubernetes
    fills it from the Job completion index). Credentials are added by the caller from the Secret."""
    env = {
        ENV_PIPELINE: pipeline_json(pipeline),
        ENV_NAMESPACE: namespace,
        ENV_PIPELINE_UID: uid,
        ENV_STAGE: Stage(stage).value,
        ENV_ATTEMPT: str(attempt),
        ENV_NNODES: str(num_nodes(pipeline, stage)),
        ENV_NPROC_PER_NODE: str(nproc_per_node(pipeline, stage)),
        ENV_MASTER_ADDR: master_addr,
        ENV_MASTER_PORT: str(master_port),
        # quiet, offline-safe defaults for the trainer; a user's env entries come after and win
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if pipeline.spec.accelerator.value == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = "1"  # one thread per rank: 10x faster than oversubscribing here
    if node_rank is not None:
        env[ENV_NODE_RANK] = str(node_rank)
    for item in pipeline.spec.stages.get(stage).env:
        env[item.name] = item.value
    return env


class StageLayout(BaseModel):
    """Where a pipeline's stages live: ``<storage.uri>/<namespace>/<pipeline>/<uid>/<stage>/`` holding
    ``model/``, ``ema/`` (ppo, grpo), ``tensorboard/`` (when asked), ``ckpt/step-N/``, metrics.jsonl, manifest.json and
    ``_COMPLETE``."""

    model_config = ConfigDict(frozen=True)
    storage_uri: str
    namespace: str
    pipeline: str
    uid: str

    @property
    def root(self) -> str:
        return f"{self.storage_uri.rstrip('/')}/{self.namespace}/{self.pipeline}/{self.uid}"

    def stage_uri(self, stage: Stage | str) -> str:
        return f"{self.root}/{Stage(stage).value}"

    def model_uri(self, stage: Stage | str) -> str:
        return f"{self.stage_uri(stage)}/{MODEL_DIR}"

    def ema_uri(self, stage: Stage | str = Stage.ppo) -> str:
        return f"{self.stage_uri(stage)}/{EMA_DIR}"

    def ckpt_root(self, stage: Stage | str) -> str:
        return f"{self.stage_uri(stage)}/{CKPT_DIR}"

    def ckpt_uri(self, stage: Stage | str, step: int) -> str:
        return f"{self.ckpt_root(stage)}/step-{step}"

    def tensorboard_uri(self, stage: Stage | str) -> str:
        """TensorBoard events of the stage (only when its spec has ``tensorboard: true``); committed like a model."""
        return f"{self.stage_uri(stage)}/{TENSORBOARD_DIR}"

    def complete_marker_uri(self, stage: Stage | str) -> str:
        return f"{self.stage_uri(stage)}/{COMPLETE_MARKER}"

    def serving_model_uri(self, use_ema: bool, ema_enabled: bool, stage: Stage | str = Stage.ppo) -> str:
        """What the chat server loads: the final ``stage``'s EMA when it keeps one and serving asks for it."""
        return self.ema_uri(stage) if (use_ema and ema_enabled) else self.model_uri(stage)

    @classmethod
    def for_pipeline(cls, pipeline: RLHFPipeline, namespace: str, uid: str) -> StageLayout:
        return cls(storage_uri=pipeline.spec.storage.uri, namespace=namespace, pipeline=pipeline.metadata.name, uid=uid)


class StageContext(BaseModel):
    """What a stage process knows about itself, read back from the env of :func:`stage_env`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    pipeline: RLHFPipeline
    stage: Stage
    namespace: str
    uid: str
    attempt: int = 0
    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    local_output: str | None = Field(default=None, description="Also copy results here (local runner).")

    @property
    def layout(self) -> StageLayout:
        return StageLayout.for_pipeline(self.pipeline, self.namespace, self.uid)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @classmethod
    def from_env(cls, stage: Stage | str, env: Mapping[str, str] | None = None, pipeline: str | None = None) -> StageContext:
        """``pipeline`` overrides ENV_PIPELINE: a file path or inline JSON/YAML."""
        env = os.environ if env is None else env
        source = pipeline or env.get(ENV_PIPELINE)
        if not source:
            raise ValueError(f"no pipeline given: pass --pipeline FILE_OR_JSON or set {ENV_PIPELINE}")
        text = source
        if not source.lstrip().startswith("{") and os.path.exists(source):
            with open(source, encoding="utf-8") as f:
                text = f.read()
        manifest = parse_pipeline(text)
        namespace = env.get(ENV_NAMESPACE) or manifest.metadata.namespace or "default"
        uid = env.get(ENV_PIPELINE_UID) or manifest.metadata.uid or "local"
        st = Stage(stage)
        return cls(
            pipeline=manifest,
            stage=st,
            namespace=namespace,
            uid=uid,
            attempt=int(env.get(ENV_ATTEMPT, "0")),
            nnodes=int(env.get(ENV_NNODES) or num_nodes(manifest, st)),
            node_rank=int(env.get(ENV_NODE_RANK) or env.get("JOB_COMPLETION_INDEX") or 0),
            nproc_per_node=int(env.get(ENV_NPROC_PER_NODE) or nproc_per_node(manifest, st)),
            master_addr=env.get(ENV_MASTER_ADDR, "127.0.0.1"),
            master_port=int(env.get(ENV_MASTER_PORT) or DEFAULT_MASTER_PORT),
            local_output=env.get(ENV_OUTPUT_DIR) or None,
        )


def manifest_summary(pipeline: RLHFPipeline) -> dict[str, Any]:
    """Non-secret facts about the pipeline that go into every stage manifest.json (producer, config hash)."""
    import hashlib

    digest = hashlib.sha256(pipeline_json(pipeline).encode()).hexdigest()
    return {"pipeline": pipeline.metadata.name, "configSha256": digest}
