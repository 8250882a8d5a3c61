"""Helpers for running real stages: `kuberlhf stage NAME` as a subprocess with the contract's env (as a pod gets it),
2 ranks spawned by the stage entrypoint, outputs in a real SeaweedFS bucket."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

STAGE_TIMEOUT_S = 420


def tiny_manifest(name: str, storage: dict[str, Any], stages: dict[str, Any] | None = None,
                  data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A pipeline of the tiny model on the synthetic data, fp32 ZeRO-2 on 2 CPU ranks unless overridden."""
    base_stage = {"nodes": 1, "gpusPerNode": 2, "dtype": "fp32", "perDeviceBatchSize": 4,
                  "gradientAccumulationSteps": 1}
    spec_stages = {
        "sft": {**base_stage, "zeroStage": 2, "learningRate": 2e-3, "maxSteps": 20, "epochs": 3,
                "checkpointEverySteps": 10},
        "reward": {**base_stage, "zeroStage": 2, "learningRate": 1e-3, "maxSteps": 24, "epochs": 3},
        "ppo": {**base_stage, "actorZeroStage": 2, "criticZeroStage": 2, "generationBatchSize": 4,
                "maxSteps": 3, "maxPromptLen": 32, "maxAnswerLen": 12, "actorLearningRate": 1e-4,
                "criticLearningRate": 1e-4, "ptxCoef": 1.0, "ema": {"enabled": True, "beta": 0.9},
                # a checkpoint mid-run for the resume test; a short horizon so the adaptive KL coefficient moves
                "checkpointEverySteps": 2, "adaptiveKl": {"enabled": True, "target": 0.5, "horizon": 40}},
    }
    for stage, extra in (stages or {}).items():
        spec_stages[stage] = {**spec_stages[stage], **extra}
    return {
        "apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFPipeline",
        "metadata": {"name": name},
        "spec": {
            "accelerator": "cpu", "deploymentType": "single_node",
            "actor": {"model": "kuberlhf/tiny-opt"}, "reward": {"model": "kuberlhf/tiny-opt"},
            "data": {"datasets": ["kuberlhf/synthetic-pairs"], "unsupervised": "kuberlhf/synthetic-corpus",
                     "maxSeqLen": 48, "maxSamples": 640, "split": "3,4,3", "seed": 7, **(data or {})},
            "storage": copy.deepcopy(storage),
            "stages": spec_stages,
        },
    }


def stage_env_for(manifest: dict[str, Any], stage: str, s3_server: Any, uid: str,
                  extra: dict[str, str] | None = None) -> dict[str, str]:
    from kuberlhf.contract.spec import parse_pipeline
    from kuberlhf.contract.stage import stage_env
    from kuberlhf.training.distributed import free_port

    pipeline = parse_pipeline(manifest)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(stage_env(pipeline, stage, namespace="test", uid=uid, attempt=0, master_addr="127.0.0.1",
                         master_port=free_port(), node_rank=0))
    env.update(s3_server.credentials_env())
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    env.update(extra or {})
    return env


def run_stage(manifest: dict[str, Any], stage: str, s3_server: Any, uid: str,
              extra_env: dict[str, str] | None = None, args: list[str] | None = None,
              timeout: int = STAGE_TIMEOUT_S) -> subprocess.CompletedProcess:
    kuberlhf = str(Path(sys.executable).parent / "kuberlhf")
    return subprocess.run([kuberlhf, "stage", stage, *(args or [])], env=stage_env_for(manifest, stage, s3_server,
                          uid, extra_env), capture_output=True, text=True, timeout=timeout)


def run_probe(code: str, tag: str, cwd: Path | None = None, timeout: int = 300) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (no rendezvous variables of the test process, CPU accelerator, one
    thread) and return the JSON it prints on its line ``<tag> {...}``; fails with its stderr when it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith(f"{tag} ")).split(" ", 1)[1])


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"stage failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


class PipelineRun:
    """One pipeline's stages, run in order (each at most once) and their outputs fetched from the bucket."""

    def __init__(self, manifest: dict[str, Any], s3_server: Any, workdir: Path):
        self.manifest = manifest
        self.s3 = s3_server
        self.uid = uuid.uuid4().hex[:8]
        self.workdir = workdir
        self.done: dict[str, subprocess.CompletedProcess] = {}

    @property
    def layout(self):
        from kuberlhf.contract.spec import parse_pipeline
        from kuberlhf.contract.stage import StageLayout

        return StageLayout.for_pipeline(parse_pipeline(self.manifest), "test", self.uid)

    def store(self):
        from kuberlhf.storage import ObjectStore

        return ObjectStore.from_uri(self.manifest["spec"]["storage"]["uri"],
                                    endpoint=self.manifest["spec"]["storage"]["endpoint"],
                                    env=self.s3.credentials_env())

    def stage(self, name: str) -> subprocess.CompletedProcess:
        if name not in self.done:
            self.done[name] = ok(run_stage(self.manifest, name, self.s3, self.uid))
        return self.done[name]

    def copy_stage_models_from(self, other: PipelineRun, stages: tuple[str, ...]) -> None:
        """Give this run the committed final models of ``other``'s earlier stages (as if it had trained them)."""
        store = self.store()
        for stage in stages:
            local = other.fetch(other.layout.model_uri(stage), f"copy-{self.uid}-{stage}")
            store.upload_dir(str(local), self.layout.model_uri(stage), producer=f"kuberlhf-stage-{stage}")

    def fetch(self, uri: str, local: str) -> Path:
        dest = self.workdir / local
        self.store().download_dir(uri, str(dest))
        return dest

    def metrics(self, stage: str) -> list[dict[str, Any]]:
        import json

        data = self.store().get_bytes(f"{self.layout.stage_uri(stage)}/metrics.jsonl")
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


