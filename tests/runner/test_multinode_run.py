"""`kuberlhf run` with every stage on 2 "nodes" (one local process per node, NODE_RANK 0 and 1, one CPU rank
each), as the operator's Indexed Jobs would run 2 pods: the session's SeaweedFS is the manifest's store
(`--storage manifest`), ZeRO-2 for steps 1-2 and ZeRO-3 for the PPO actor, TensorBoard on for SFT and PPO."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from kuberlhf.models.tiny import tiny_config

RUN_TIMEOUT_S = 600


def manifest(storage_uri: str, endpoint: str) -> dict:
    two_nodes = {"nodes": 2, "gpusPerNode": 1, "dtype": "fp32", "perDeviceBatchSize": 4,
                 "gradientAccumulationSteps": 1}
    return {
        "apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFPipeline", "metadata": {"name": "two-nodes"},
        "spec": {
            "accelerator": "cpu", "deploymentType": "multi_node",
            "actor": {"model": "kuberlhf/tiny-opt"}, "reward": {"model": "kuberlhf/tiny-opt"},
            "data": {"datasets": ["kuberlhf/synthetic-pairs"], "unsupervised": "kuberlhf/synthetic-corpus",
                     "maxSeqLen": 48, "maxSamples": 320, "split": "3,4,3", "seed": 3},
            "storage": {"uri": storage_uri, "endpoint": endpoint},
            "stages": {
                "sft": {**two_nodes, "zeroStage": 2, "learningRate": 2e-3, "maxSteps": 3, "tensorboard": True},
                "reward": {**two_nodes, "zeroStage": 2, "learningRate": 1e-3, "maxSteps": 3},
                "ppo": {**two_nodes, "actorZeroStage": 3, "criticZeroStage": 2, "generationBatchSize": 4,
                        "maxSteps": 2, "maxPromptLen": 24, "maxAnswerLen": 8, "ptxCoef": 1.0,
                        "ema": {"enabled": True, "beta": 0.9}, "tensorboard": True},
            },
        },
    }


def tensorboard_scalars_in(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_with_two_node_stages(s3_server, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bucket = f"nodes-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(manifest(f"s3://{bucket}/runs", s3_server.endpoint)))
    out = tmp_path / "out"
    exe = Path(sys.executable).parent / "kuberlhf"
    env = {**os.environ, **s3_server.credentials_env(), "PYTHONWARNINGS": "ignore::FutureWarning"}
    proc = subprocess.run([str(exe), "run", str(path), "--output-dir", str(out), "--storage", "manifest",
                           "--samples", "0"], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("2 node(s) x 1 rank(s)") == 3, proc.stdout[-3000:]
    for stage in ("sft", "reward", "ppo"):
        for node in (0, 1):  # one process (pod) per node, each with its own log
            assert (out / "logs" / f"{stage}-attempt0-node{node}.log").is_file()
    # the runner's object store is the manifest's, not an embedded one
    assert json.loads((out / "run.json").read_text())["endpoint"] == s3_server.endpoint
    assert not (out / ".s3").exists()

    for d in (out / "sft", out / "ppo" / "model", out / "ppo" / "ema"):
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        ids = AutoTokenizer.from_pretrained(d)(" Human: hi Assistant:", return_tensors="pt")
        with torch.no_grad():
            assert torch.isfinite(model(**ids).logits).all()
    # ZeRO-3 over two nodes: the exported actor is whole, not one node's partition
    assert model.model.decoder.embed_tokens.weight.shape == (tiny_config().vocab_size, 64)
    assert (out / "reward" / "value_head.safetensors").exists()

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = {s: [r["step"] for r in records if r["stage"] == s and r["split"] == "train"] for s in ("sft", "ppo")}
    assert steps == {"sft": [1, 2, 3], "ppo": [1, 2]}
    # TensorBoard events of the stages that asked for them, downloaded next to the models
    sft_tb = tensorboard_scalars_in(out / "tensorboard" / "sft")
    assert [s for s, _ in sft_tb["sft/train/loss"]] == [1, 2, 3]
    ppo_tb = tensorboard_scalars_in(out / "tensorboard" / "ppo")
    assert {"ppo/train/reward", "ppo/train/kl", "ppo/train/actor_loss", "ppo/train/critic_loss"} <= set(ppo_tb)
    assert not (out / "tensorboard" / "reward").exists()  # reward ran without `tensorboard: true`
