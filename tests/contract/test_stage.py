"""The stage contract: env written by the operator/runner reads back identically in the stage."""

from __future__ import annotations

import json

from kuberlhf.contract.spec import parse_pipeline
from kuberlhf.contract.stage import (
    ENV_NODE_RANK,
    ENV_PIPELINE,
    StageContext,
    StageLayout,
    stage_command,
    stage_env,
)

DOC = {
    "apiVersion": "kuberlhf.io/v1alpha1",
    "kind": "RLHFPipeline",
    "metadata": {"name": "p1"},
    "spec": {
        "accelerator": "cpu",
        "actor": {"model": "kuberlhf/tiny-opt"},
        "reward": {"model": "kuberlhf/tiny-opt"},
        "data": {"datasets": ["kuberlhf/synthetic-pairs"]},
        "storage": {"uri": "s3://bkt/runs/"},
        "stages": {"ppo": {"nodes": 2, "gpusPerNode": 3, "env": [{"name": "FOO", "value": "bar"}]}},
    },
}


def test_env_round_trips_into_context():
    p = parse_pipeline(DOC)
    env = stage_env(p, "ppo", namespace="ns", uid="u-1", attempt=2, master_addr="p1-ppo-2-0.p1-ppo-2", node_rank=1)
    assert env["DS_ACCELERATOR"] == "cpu" and env["FOO"] == "bar"
    ctx = StageContext.from_env("ppo", env)
    assert (ctx.nnodes, ctx.node_rank, ctx.nproc_per_node, ctx.world_size) == (2, 1, 3, 6)
    assert ctx.attempt == 2 and ctx.master_addr == "p1-ppo-2-0.p1-ppo-2"
    assert ctx.pipeline.spec == p.spec
    assert ctx.layout.stage_uri("ppo") == "s3://bkt/runs/ns/p1/u-1/ppo"


def test_node_rank_left_to_kubernetes_and_index_fallback():
    p = parse_pipeline(DOC)
    env = stage_env(p, "sft", namespace="ns", uid="u", attempt=0, master_addr="m")
    assert ENV_NODE_RANK not in env
    env["JOB_COMPLETION_INDEX"] = "1"
    assert StageContext.from_env("sft", env).node_rank == 1


def test_pipeline_json_carries_no_status_and_resolved_presets():
    p = parse_pipeline({**DOC, "status": {"phase": "Running"}})
    wire = json.loads(stage_env(p, "sft", namespace="n", uid="u", attempt=0, master_addr="m")[ENV_PIPELINE])
    assert "status" not in wire
    assert wire["spec"]["stages"]["sft"]["zeroStage"] == 0  # preset resolved before it reaches the pod


def test_layout_and_command():
    layout = StageLayout(storage_uri="s3://b/p/", namespace="ns", pipeline="x", uid="u")
    assert layout.model_uri("sft") == "s3://b/p/ns/x/u/sft/model"
    assert layout.ckpt_uri("reward", 40) == "s3://b/p/ns/x/u/reward/ckpt/step-40"
    assert layout.serving_model_uri(use_ema=True, ema_enabled=True) == "s3://b/p/ns/x/u/ppo/ema"
    assert layout.serving_model_uri(use_ema=True, ema_enabled=False) == "s3://b/p/ns/x/u/ppo/model"
    assert stage_command("reward") == ["kuberlhf", "stage", "reward"]
