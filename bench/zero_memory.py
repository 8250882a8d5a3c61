"""Benchmark: what ZeRO-3 partitioned loading saves each rank, and how close the memory planner gets.

An OPT-125m-sized model (facebook/opt-125m's published config, random weights, saved in hub layout with
``save_pretrained``) is loaded and trained one step on 2 CPU ranks (DeepSpeed's CPU accelerator, gloo, one
thread per rank) by ``kuberlhf.training.memory`` -- the probe the tests and the GPU check use -- at ZeRO-0, 2 and 3,
in the order 0, 3, 3 as DeepSpeed-Chat configures it, 2, then 0, 3 again per repeat (interleaved so that load from
other processes hits every stage alike). For each run it prints every rank's peak resident memory over the load,
``deepspeed.initialize``, forward, backward and optimizer-step phases, then

- ZeRO-3 / ZeRO-0 per-rank peak (goal <= 0.6: partitioning is real), and the same with DeepSpeed-Chat's
  ``zero_optimization`` (``memory_efficient_linear: false``, DeepSpeed's 5e8-element reduce bucket and 1e9-element
  optimizer sub-groups: what ``kuberlhf.training.ds_config`` changes),
- the process before loading (libraries) and the model's share: peak minus that, ZeRO-3 / ZeRO-0 again, and
- the planner's per-rank estimate (``kuberlhf.planner.estimate`` for the same stage spec, model shape read from
  the saved config.json, its CPU runtime reserve standing for the process itself) / the measured peak (goal
  within +-30 %) for each ZeRO stage.

    python bench/zero_memory.py [--out DIR] [--repeats 2] [--dtype fp32|bf16] [--stages 0,3,3ds,2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

MIB = 2**20


def save_model(path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from kuberlhf.models.tiny import TINY_ASSETS
    from kuberlhf.planner.shapes import KNOWN_CONFIGS

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(**{**KNOWN_CONFIGS["facebook/opt-125m"], "dropout": 0.0})).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_ASSETS).save_pretrained(path)
    return path


# DeepSpeed-Chat's get_train_ds_config: torch's linear at ZeRO-3 and DeepSpeed's default bucket and sub-group sizes
# (which kuberlhf.training.ds_config replaces)
DEEPSPEED_CHAT = {"memory_efficient_linear": False, "reduce_bucket_size": 5e8, "sub_group_size": 1e9}


def probe(
    model: Path, zero: int, out: Path, seq_len: int, batch: int, zero_config: dict | None = None, dtype: str = "fp32"
) -> list[dict]:
    from kuberlhf.training.memory import run_probe

    args = ["--model", str(model), "--zero", str(zero), "--dtype", dtype, "--steps", "1", "--batch", str(batch)]
    args += ["--seq-len", str(seq_len), *(["--zero-config", json.dumps(zero_config)] if zero_config else [])]
    return run_probe(out, args, world=2)


def peak(rep: dict) -> int:
    return max(p["host_peak"] for p in rep["phases"].values())


def baseline(rep: dict) -> int:
    """Resident memory before the model is loaded: the interpreter and the imported libraries."""
    return rep["phases"]["load"]["host_before"]


def planner_estimate(model: Path, zero: int, seq_len: int, batch: int, dtype: str = "fp32") -> int:
    from kuberlhf.contract.spec import parse_pipeline
    from kuberlhf.planner.estimate import estimate_pipeline
    from kuberlhf.planner.shapes import read_model_shape

    stage = {
        "nodes": 1,
        "gpusPerNode": 2,
        "zeroStage": zero,
        "dtype": dtype,
        "perDeviceBatchSize": batch,
        "gradientAccumulationSteps": 1,
    }
    spec = parse_pipeline(
        {
            "metadata": {"name": "bench"},
            "spec": {
                "accelerator": "cpu",
                "deploymentType": "single_node",
                "actor": {"model": str(model)},
                "reward": {"model": str(model)},
                "data": {"datasets": ["kuberlhf/synthetic-pairs"], "maxSeqLen": seq_len},
                "storage": {"uri": "file:///tmp/bench"},
                "stages": {"sft": stage},
            },
        }
    ).spec
    shape = read_model_shape(str(model), "spec.actor.model")
    return estimate_pipeline(spec, {"actor": shape, "reward": shape}).stage("sft").per_gpu_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: mixed precision, as on a GPU")
    p.add_argument("--stages", default="0,3,3ds,2", help="which runs, in order: 0, 2, 3, 3ds (DeepSpeed-Chat's)")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="zero-memory-"))
    model = save_model(work / "opt-125m-random")
    runs = {"0": (0, None), "2": (2, None), "3": (3, None), "3ds": (3, DEEPSPEED_CHAT)}
    first = [runs[x] for x in args.stages.split(",")]
    order = first + [(0, None), (3, None)] * (args.repeats - 1)
    peaks: dict[str, list[int]] = {}
    bases: dict[str, list[int]] = {}
    for i, (zero, zero_config) in enumerate(order):
        label = f"{zero}" + ("-deepspeed-chat" if zero_config else "")
        t0 = time.time()
        reps = probe(model, zero, work / f"run{i}-zero{label}", args.seq_len, args.batch, zero_config, args.dtype)
        per_rank = [peak(r) for r in reps]
        phases = {name: [round(r["phases"][name]["host_peak"] / MIB) for r in reps] for name in reps[0]["phases"]}
        print(
            f"run {i}: ZeRO-{label} peak RSS per rank {[round(x / MIB) for x in per_rank]} MiB "
            f"(per phase {phases}; before loading {[round(baseline(r) / MIB) for r in reps]}; "
            f"local params {[r['loaded']['local_numel'] for r in reps]}; {time.time() - t0:.0f} s)",
            flush=True,
        )
        peaks.setdefault(label, []).extend(per_rank)
        bases.setdefault(label, []).extend(baseline(r) for r in reps)
    med = {z: statistics.median(v) for z, v in peaks.items()}
    base = {z: statistics.median(v) for z, v in bases.items()}
    model_share = {z: med[z] - base[z] for z in med}
    result = {
        "zero3_over_zero0_peak": med["3"] / med["0"],
        "dtype": args.dtype,
        "zero3_over_zero0_model_share": model_share["3"] / model_share["0"],
        "median_peak_mib": {z: m / MIB for z, m in med.items()},
        "median_before_loading_mib": {z: m / MIB for z, m in base.items()},
    }
    print(f"\nZeRO-3 / ZeRO-0 per-rank peak RSS: {result['zero3_over_zero0_peak']:.2f} (goal <= 0.6)")
    if "3-deepspeed-chat" in med:
        result["zero3_deepspeed_chat_over_zero0_peak"] = med["3-deepspeed-chat"] / med["0"]
        print(f"  with DeepSpeed-Chat's zero_optimization: {result['zero3_deepspeed_chat_over_zero0_peak']:.2f}")
    print(
        f"  peak minus the process before loading ({base['0'] / MIB:.0f} MiB of libraries): "
        f"{model_share['3'] / MIB:.0f} / {model_share['0'] / MIB:.0f} MiB = {result['zero3_over_zero0_model_share']:.2f}"
    )
    result["planner_over_measured"] = {}
    for zero in (z for z in (0, 2, 3) if str(z) in med):
        est = planner_estimate(model, zero, args.seq_len, args.batch, args.dtype)
        ratio = est / med[str(zero)]
        result["planner_over_measured"][zero] = ratio
        print(
            f"planner estimate / measured, ZeRO-{zero}: {est / MIB:.0f} / {med[str(zero)] / MIB:.0f} MiB = "
            f"{ratio:.2f} (goal 0.7-1.3)"
        )
    out = Path(os.environ.get("BENCH_RESULTS", work / "results.jsonl"))
    with out.open("a") as f:
        f.write(json.dumps({"bench": "zero_memory", **result}) + "\n")


if __name__ == "__main__":
    main()
