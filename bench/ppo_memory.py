"""Benchmark: step 3's five models (actor, reference, EMA, critic, reward) per rank at ZeRO-3 against ZeRO-0, the
memory planner against the measured peak, and the planner's model states against DeepSpeed's own estimators.

An OPT-125m-sized actor (facebook/opt-125m's published config) and a smaller OPT reward model (hidden 256,
4 layers, OPT's 50272-token vocabulary: DeepSpeed-Chat also pairs a large actor with a small critic), random
weights, saved as step 1 and step 2 write them, are built by ``RLHFEngine`` exactly as the ppo stage builds them
(``kuberlhf.training.ppo_memory``), then one rollout and one PPO update run, on 2 CPU ranks (gloo, one thread
each, fp32), in the order ZeRO-0, ZeRO-3 per repeat (interleaved, so load from other processes hits both). It
prints each rank's peak resident memory per phase (load / generate / train), then

- ZeRO-3 / ZeRO-0 per-rank peak (the partitioning of all five models; the single-model goal is <= 0.6),
- the planner's per-rank estimate (``kuberlhf.planner`` for the same ppo stage spec, shapes from the saved
  config.json files, its CPU runtime reserve standing for the process) / the measured peak (goal within +-30 %),
- for the two trained models, the planner's model states / DeepSpeed's ``estimate_zero2_model_states_mem_needs``
  and ``estimate_zero3_model_states_mem_needs`` (mixed precision, which is what those estimators model) for
  this configuration and for the published ones (OPT-1.3B + 350M on 8 GPUs; 13B + 350M on 8; 66B + 350M on 64).

    python bench/ppo_memory.py [--out DIR] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from zero_memory import peak  # bench/, the script's own directory

MIB = 2**20
REWARD_CONFIG = {
    "hidden_size": 256,
    "ffn_dim": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "word_embed_proj_dim": 256,
}


def save_models(work: Path) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModel, AutoTokenizer, OPTConfig, OPTForCausalLM

    from kuberlhf.models.reward import RewardModel
    from kuberlhf.models.tiny import TINY_ASSETS
    from kuberlhf.planner.shapes import KNOWN_CONFIGS

    actor, reward = work / "actor-opt-125m", work / "reward-opt-h256"
    tok = AutoTokenizer.from_pretrained(TINY_ASSETS)
    base = {**KNOWN_CONFIGS["facebook/opt-125m"], "dropout": 0.0}
    torch.manual_seed(0)
    if not (actor / "config.json").exists():
        OPTForCausalLM(OPTConfig(**base)).save_pretrained(actor)
        tok.save_pretrained(actor)
    if not (reward / "config.json").exists():
        RewardModel(AutoModel.from_config(OPTConfig(**{**base, **REWARD_CONFIG}))).save_pretrained(
            reward, tokenizer=tok
        )
    return actor, reward


def probe(actor: Path, reward: Path, zero: int, out: Path, args: argparse.Namespace) -> list[dict]:
    from kuberlhf.training.memory import run_probe

    lengths = ["--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--answer-len", str(args.answer_len)]
    probe_args = ["--actor", str(actor), "--reward", str(reward), "--zero", str(zero), *lengths]
    return run_probe(out, probe_args, world=2, module="kuberlhf.training.ppo_memory")


def planner_stage(actor: Path, reward: Path, zero: int, args: argparse.Namespace):
    from kuberlhf.planner.estimate import estimate_pipeline
    from kuberlhf.planner.shapes import read_model_shape
    from kuberlhf.training.ppo_memory import ppo_spec

    spec = ppo_spec(str(actor), str(reward), zero, 2, args.batch, args.prompt_len, args.answer_len)
    shapes = {
        "actor": read_model_shape(str(actor), "spec.actor.model"),
        "reward": read_model_shape(str(reward), "spec.reward.model"),
    }
    return estimate_pipeline(spec, shapes).stage("ppo")


def deepspeed_ratios(n_params: int, largest: int, gpus: int, nodes: int) -> dict[str, float]:
    """Planner model states (bf16) / DeepSpeed's estimator, per GPU, ZeRO-2 and ZeRO-3."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from kuberlhf.planner.estimate import model_states

    world = gpus * nodes
    _, ds2 = estimate_zero2_model_states_mem_needs(n_params, gpus, nodes, cpu_offload=False)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(
        n_params, largest, gpus, nodes, cpu_offload=False, cpu_offload_params=False
    )
    return {
        "zero2": model_states(n_params, largest, world, 2, "bf16").gpu / ds2,
        "zero3": model_states(n_params, largest, world, 3, "bf16").gpu / ds3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--answer-len", type=int, default=16)
    p.add_argument("--no-runs", action="store_true", help="only the planner / DeepSpeed estimator ratios")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="ppo-memory-"))
    actor, reward = save_models(work)
    peaks: dict[int, list[int]] = {}
    for i, zero in enumerate([] if args.no_runs else [0, 3] * args.repeats):
        t0 = time.time()
        reps = probe(actor, reward, zero, work / f"run{i}-zero{zero}", args)
        per_rank = [peak(r) for r in reps]
        phases = {name: [round(r["phases"][name]["host_peak"] / MIB) for r in reps] for name in reps[0]["phases"]}
        held = {role: m["local_numel"] for role, m in reps[0]["models"].items()}
        full = {role: m["full_numel"] for role, m in reps[0]["models"].items()}
        print(
            f"run {i}: ZeRO-{zero} peak RSS per rank {[round(x / MIB) for x in per_rank]} MiB (per phase "
            f"{phases}; before loading {round(reps[0]['phases']['load']['host_before'] / MIB)} MiB; rank 0 holds "
            f"{held} of {full} parameters; {time.time() - t0:.0f} s)",
            flush=True,
        )
        peaks.setdefault(zero, []).extend(per_rank)
    med = {z: statistics.median(v) for z, v in peaks.items()}
    result: dict = {"median_peak_mib": {z: m / MIB for z, m in med.items()}, "planner_over_measured": {}}
    if med:
        result["zero3_over_zero0_peak"] = med[3] / med[0]
        print(f"\nfive models, ZeRO-3 / ZeRO-0 per-rank peak RSS: {result['zero3_over_zero0_peak']:.2f}")
    for zero in med:
        est = planner_stage(actor, reward, zero, args)
        ratio = est.per_gpu_bytes / med[zero]
        result["planner_over_measured"][zero] = ratio
        rows = ", ".join(f"{m.role} {m.states.gpu / MIB:.0f}" for m in est.models)
        print(
            f"planner estimate / measured, ZeRO-{zero}: {est.per_gpu_bytes / MIB:.0f} / {med[zero] / MIB:.0f} MiB "
            f"= {ratio:.2f} (goal 0.7-1.3; model states MiB: {rows}; working {est.working_bytes / MIB:.0f}, "
            f"runtime {est.reserve / MIB:.0f})"
        )
    from kuberlhf.planner.shapes import KNOWN_CONFIGS, read_model_shape, shape_from_config

    a, r = read_model_shape(str(actor), "actor"), read_model_shape(str(reward), "reward")
    cases = {"this bench (2 ranks)": (a, r, 2, 1)}
    small = shape_from_config(KNOWN_CONFIGS["facebook/opt-350m"])
    for name, gpus, nodes in (("opt-1.3b", 8, 1), ("opt-13b", 8, 1), ("opt-66b", 8, 8)):
        cases[f"{name} + opt-350m on {nodes} x {gpus}"] = (
            shape_from_config(KNOWN_CONFIGS[f"facebook/{name}"]),
            small,
            gpus,
            nodes,
        )
    result["planner_over_deepspeed"] = {}
    print("\nplanner model states / DeepSpeed's estimators (bf16 mixed precision, per GPU):")
    for name, (ash, rsh, gpus, nodes) in cases.items():
        actor_r = deepspeed_ratios(ash.causal_lm_params, ash.largest_layer_params, gpus, nodes)
        critic_r = deepspeed_ratios(rsh.backbone_params + rsh.embed_dim, rsh.largest_layer_params, gpus, nodes)
        result["planner_over_deepspeed"][name] = {"actor": actor_r, "critic": critic_r}
        print(
            f"  {name}: actor ZeRO-2 {actor_r['zero2']:.3f}, ZeRO-3 {actor_r['zero3']:.3f}; "
            f"critic ZeRO-2 {critic_r['zero2']:.3f}, ZeRO-3 {critic_r['zero3']:.3f}"
        )
    print("  (the frozen reference, EMA and reward models hold weights only; DeepSpeed has no estimator for them)")
    out = Path(os.environ.get("BENCH_RESULTS", work / "results.jsonl"))
    with out.open("a") as f:
        f.write(json.dumps({"bench": "ppo_memory", **result}) + "\n")


if __name__ == "__main__":
    main()
