"""Benchmark: training time lost to checkpointing, with the background save against a synchronous one.

The real sft stage (``kuberlhf stage sft``, one CPU rank, ZeRO-2, fp32) trains a mid-sized OPT (a config with
random weights saved in hub layout; its resumable checkpoint -- weights, Adam, scheduler -- is about
``16 * params`` bytes) against a real S3 server (SeaweedFS), in three variants run interleaved, ``--rounds``
times, so load from other processes hits each alike:

  none        checkpointEverySteps 0 (only the final model is written)
  sync        checkpointEverySteps K, backgroundCheckpointUpload false (training waits for each write + upload)
  background  checkpointEverySteps K, backgroundCheckpointUpload true (the default: the training thread copies the
              state to host memory; writing and uploading run in a thread while training goes on)

Training time is the span of the stage's own ``train`` metric rows (first to last step: start-up and the final
export are the same in every variant and left out). Each round runs the three variants back to back, in an order
rotated from round to round, and the ratios are taken within a round (paired: load that drifts over minutes
hits the three runs of a round alike); the result is the median of the per-round ratios with their range. Each
run also records the stage process's CPU seconds (user + system, load-independent: the work a checkpoint adds,
whether or not it overlaps training) and the load average before it. Prints each run, then sync / none and
background / none (goal <= 1.1x), and background / sync; and, per variant, a baseline from within the same run:
its training time over its number of steps times its median step (:func:`within_run`; ~1.0 for none), which
load changing between runs does not move. Where the checkpoint time goes (from the stage's own log lines, rank 0):
per run, the seconds the training thread spent copying the state, the seconds it waited for a previous save still
in flight, and the write and upload seconds.

    python bench/checkpoint_overhead.py [--steps 12] [--every 3] [--hidden 512] [--layers 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, goal_line  # noqa: E402 - bench/common.py: the result line every benchmark prints


def save_model(path: Path, hidden: int, layers: int) -> tuple[Path, int]:
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from kuberlhf.models.tiny import TINY_ASSETS

    tok = AutoTokenizer.from_pretrained(TINY_ASSETS)
    config = OPTConfig(
        vocab_size=len(tok) + (-len(tok)) % 8,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=4 * hidden,
        num_attention_heads=max(hidden // 64, 1),
        max_position_embeddings=256,
        word_embed_proj_dim=hidden,
        dropout=0.0,
    )
    torch.manual_seed(0)
    model = OPTForCausalLM(config)
    if not (path / "config.json").exists():
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def manifest(model: Path, steps: int, every: int, background: bool) -> dict:
    return {
        "apiVersion": "kuberlhf.io/v1alpha1",
        "kind": "RLHFPipeline",
        "metadata": {"name": "ckpt-bench"},
        "spec": {
            "deploymentType": "single_node",
            "accelerator": "cpu",
            "actor": {"model": str(model)},
            "reward": {"model": str(model)},
            "data": {"datasets": ["kuberlhf/synthetic-pairs"], "maxSeqLen": 64},
            "storage": {"uri": "s3://bench/pipelines"},
            "stages": {
                "sft": {
                    "nodes": 1,
                    "gpusPerNode": 1,
                    "zeroStage": 2,
                    "dtype": "fp32",
                    "maxSteps": steps,
                    "perDeviceBatchSize": 4,
                    "gradientAccumulationSteps": 1,
                    "evalEverySteps": 10**6,
                    "checkpointEverySteps": every,
                    "backgroundCheckpointUpload": background,
                }
            },
        },
    }


def save_profile(stderr: str) -> dict[str, float]:
    """Seconds summed over a run's checkpoints from the stage's log lines (rank 0): copy (training thread), write
    and upload (a thread when in the background), waited (training thread, for a save still in flight)."""
    out = {"copy": 0.0, "write": 0.0, "upload": 0.0, "waited": 0.0, "checkpoints": 0}
    for m in re.finditer(r"copied in ([\d.]+)s, written in ([\d.]+)s and uploaded in ([\d.]+)s", stderr):
        out["checkpoints"] += 1
        for key, value in zip(("copy", "write", "upload"), m.groups(), strict=True):
            out[key] += float(value)
    out["waited"] = sum(float(x) for x in re.findall(r"training waited ([\d.]+)s", stderr))
    return out


def run_sft(doc: dict, server, out: Path) -> tuple[float, float, dict[str, float]]:
    """(training seconds, the stage process's CPU seconds, :func:`save_profile`) of one ``kuberlhf stage sft``
    run."""
    from kuberlhf.contract.spec import parse_pipeline
    from kuberlhf.contract.stage import ENV_OUTPUT_DIR, stage_env
    from kuberlhf.training.distributed import free_port

    doc["spec"]["storage"]["endpoint"] = server.endpoint
    env = {
        **os.environ,
        **stage_env(
            parse_pipeline(doc),
            "sft",
            namespace="bench",
            uid=uuid.uuid4().hex[:8],
            attempt=0,
            master_addr="127.0.0.1",
            master_port=free_port(),
            node_rank=0,
        ),
        **server.credentials_env(),
        ENV_OUTPUT_DIR: str(out),
        "PYTHONWARNINGS": "ignore",
    }
    kuberlhf = str(Path(sys.executable).parent / "kuberlhf")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([kuberlhf, "stage", "sft"], env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return sum(step_seconds(out)), cpu, save_profile(proc.stderr)


def step_seconds(out: Path) -> list[float]:
    """Seconds between consecutive ``train`` metric rows of a stage run (one per optimizer step)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [r["time"] for r in rows if r["split"] == "train"]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def within_run(steps: list[float]) -> float:
    """A run's training time over its own baseline, ``len(steps) x`` its median step: the steps that save or
    overlap an upload are a minority, so the median is a step without checkpoint work, measured in the same run
    and minutes (load that changes between runs cancels out). About 1.0 without checkpoints."""
    return sum(steps) / (len(steps) * statistics.median(steps))


def rotated(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: the variants rotated by ``r``, so none of them always runs first or last."""
    k = r % len(names)
    return names[k:] + names[:k]


def paired(seconds: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """Median and range over rounds of ``a / b`` taken within each round."""
    ratios = [x / y for x, y in zip(seconds[a], seconds[b], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def main() -> None:
    from kuberlhf.storage.seaweed import SeaweedServer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="ckpt-overhead-"))
    model, n = save_model(work / "model", args.hidden, args.layers)
    print(
        f"model: {n / 1e6:.1f} M parameters, checkpoint ~{16 * n / 2**20:.0f} MiB; {args.steps} steps, "
        f"a checkpoint every {args.every}",
        flush=True,
    )
    variants = {"none": (0, True), "sync": (args.every, False), "background": (args.every, True)}
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    inrun: dict[str, list[float]] = {k: [] for k in variants}
    profiles: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    loads: list[float] = []
    with SeaweedServer(work / "seaweed") as server:
        server.create_bucket("bench")
        for r in range(args.rounds):
            for name in rotated(list(variants), r):
                every, background = variants[name]
                load = os.getloadavg()[0]
                loads.append(load)
                t0 = time.time()
                s, c, prof = run_sft(manifest(model, args.steps, every, background), server, work / f"r{r}-{name}")
                seconds[name].append(s)
                cpu[name].append(c)
                profiles[name].append(prof)
                inrun[name].append(within_run(step_seconds(work / f"r{r}-{name}")))
                print(
                    f"round {r} {name}: training {s:.1f} s, stage CPU {c:.1f} s (stage {time.time() - t0:.0f} s; "
                    f"load average {load:.1f} before); {prof['checkpoints']} checkpoints: copy {prof['copy']:.2f} s, "
                    f"waited {prof['waited']:.1f} s, write {prof['write']:.1f} s, upload {prof['upload']:.1f} s",
                    flush=True,
                )
    result = {
        "bench": "checkpoint_overhead",
        "params": n,
        "steps": args.steps,
        "every": args.every,
        "rounds": args.rounds,
        "train_seconds": seconds,
        "stage_cpu_seconds": cpu,
        "save_profile": profiles,
        "load_average": {"min": min(loads), "max": max(loads)},
        "sync_over_none": paired(seconds, "sync", "none"),
        "background_over_none": paired(seconds, "background", "none"),
        "background_over_sync": paired(seconds, "background", "sync"),
        "cpu_sync_over_none": paired(cpu, "sync", "none"),
        "cpu_background_over_none": paired(cpu, "background", "none"),
        "within_run": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in inrun.items()},
    }
    for key, what in (("sync_over_none", "synchronous upload"), ("background_over_none", "background upload")):
        r = result[key]
        print(
            goal_line(f"training time with checkpoints, {what} / none", r["median"], 1.1, higher_is_better=False)
            + f" (per round {r['min']:.2f}-{r['max']:.2f})"
        )
    r = result["background_over_sync"]
    print(f"background / synchronous: {r['median']:.2f}x (per round {r['min']:.2f}-{r['max']:.2f})")
    for key in ("cpu_sync_over_none", "cpu_background_over_none"):
        r = result[key]
        print(
            f"stage CPU seconds, {key[4:].replace('_over_', ' / ')}: {r['median']:.2f}x "
            f"(per round {r['min']:.2f}-{r['max']:.2f})"
        )
    for name, r in result["within_run"].items():
        print(
            f"within-run, {name}: training time / (steps x the run's median step) {r['median']:.2f}x "
            f"(per round {r['min']:.2f}-{r['max']:.2f})"
        )
    print(f"load average before the runs: {min(loads):.1f}-{max(loads):.1f}")
    emit(result)


if __name__ == "__main__":
    main()
