"""Benchmark 2: SFT tokens/s of kuberlhf's DeepSpeed path (the step-1 stage's own pieces: ``load_causal_lm``,
``make_optimizer``, ``make_scheduler``, ``train_ds_config`` -> ``deepspeed.initialize``, engine forward /
backward / step) against a bare PyTorch loop with the same model weights, batches, AdamW, schedule and gradient
clipping. Same process, interleaved step by step.

    .venv/bin/python bench/sft_bench.py [--steps 40] [--zero 0 2] [--model tiny|opt-125m]

``--model opt-125m``: facebook/opt-125m's shape with random weights (from its published config, no hub), the
same tokenizer and batches.

Goal: ours >= 0.9x the bare loop (DeepSpeed's overhead bounded)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODEL_SIZES, cpu_env, emit, goal_line, interleave, sized_causal_lm, tiny_spec  # noqa: E402

GOAL = 0.9


def sft_batches(spec: Any, tokenizer: Any, micro: int, cache_dir: Path) -> list[dict[str, Any]]:
    from kuberlhf.contract.spec import Stage
    from kuberlhf.data import SFTDataset, stage_rows
    from kuberlhf.training.loop import make_loader

    rows, _ = stage_rows(spec.data, Stage.sft)
    ds = SFTDataset(
        rows, tokenizer, spec.data.max_seq_len, spec.stages.sft.mask_prompt, cache_dir=cache_dir, cache_key="bench"
    )
    return list(make_loader(ds, micro, 0, 1, spec.stages.sft.seed, 0))


def run_config(
    zero: int, steps: int, tmp: Path, profile: bool = False, model: str = "tiny", micro: int | None = None
) -> dict[str, Any]:
    import torch

    from kuberlhf.models import load_causal_lm, load_tokenizer
    from kuberlhf.models.tiny import TINY_MODEL_NAME
    from kuberlhf.rlhf.ppo_math import causal_lm_loss
    from kuberlhf.training.ds_config import stage_settings, train_ds_config
    from kuberlhf.training.loop import ds_initialize, make_optimizer, make_scheduler

    spec = tiny_spec({"sft": {"zeroStage": zero, **({"perDeviceBatchSize": micro} if micro else {})}})
    st = spec.stages.sft
    s = stage_settings(spec, "sft", 1)
    tok = load_tokenizer(TINY_MODEL_NAME)
    source = TINY_MODEL_NAME
    if model != "tiny":  # on disk once, loaded by both sides like a step-1 input
        source = str(tmp / f"model-{model}")
        if not Path(source).exists():
            sized_causal_lm(model, st.seed).save_pretrained(source)
    batches = sft_batches(spec, tok, s.micro_batch, tmp / "tok-cache")
    lr = st.learning_rate  # the example's, else the deploymentType preset's
    total = 10_000

    # ours: exactly the objects run_sft builds (a one-rank fp32 ZeRO 1/2 stage runs as ZeRO 0: effective_zero_stage)
    config = train_ds_config(s)
    lm = load_causal_lm(source, seed=st.seed, dropout=spec.actor.dropout)
    opt = make_optimizer(lm, lr, st.weight_decay, st.offload)
    engine = ds_initialize(lm, config, opt, make_scheduler(opt, st.lr_scheduler, st.warmup_steps, total))
    sides = {"ours": engine}
    if config["zero_optimization"]["stage"] != zero:
        # the stage as configured, what DeepSpeed runs when asked for it (and what kuberlhf ran before)
        asked = {**config, "zero_optimization": {**config["zero_optimization"], "stage": zero}}
        lm2 = load_causal_lm(source, seed=st.seed, dropout=spec.actor.dropout)
        opt2 = make_optimizer(lm2, lr, st.weight_decay, st.offload)
        sides["as_configured"] = ds_initialize(lm2, asked, opt2,
                                               make_scheduler(opt2, st.lr_scheduler, st.warmup_steps, total))
    # bare: same weights (same seed), same optimizer factory and schedule, plain autograd + clipping
    bare = load_causal_lm(source, seed=st.seed, dropout=spec.actor.dropout)
    bare_opt = make_optimizer(bare, lr, st.weight_decay, False)
    bare_sched = make_scheduler(bare_opt, st.lr_scheduler, st.warmup_steps, total)
    for e in sides.values():
        e.train()
    bare.train()
    it = {"bare": 0, **dict.fromkeys(sides, 0)}
    tokens = {"bare": 0.0, **dict.fromkeys(sides, 0.0)}

    def deepspeed_side(name: str):
        e = sides[name]

        def run() -> None:
            b = batches[it[name] % len(batches)]
            it[name] += 1
            out = e(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            loss = causal_lm_loss(out.logits, b["labels"])
            e.backward(loss)
            e.step()
            tokens[name] += float(b["attention_mask"].sum())

        return run

    ours = deepspeed_side("ours")

    def baseline() -> None:
        b = batches[it["bare"] % len(batches)]
        it["bare"] += 1
        out = bare(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        loss = causal_lm_loss(out.logits, b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), s.gradient_clipping)
        bare_opt.step()
        bare_sched.step()
        bare_opt.zero_grad(set_to_none=True)
        tokens["bare"] += float(b["attention_mask"].sum())

    fns = {"ours": ours, "bare": baseline, **({"as_configured": deepspeed_side("as_configured")}
                                              if "as_configured" in sides else {})}
    interleave(fns, rounds=0, warmup=3)
    tokens.update(dict.fromkeys(tokens, 0.0))
    t = interleave(fns, rounds=steps, warmup=0)
    res = {
        "model": model,
        "zero_stage": zero,
        "zero_stage_run": engine.zero_optimization_stage(),
        "dtype": s.dtype,
        "micro_batch": s.micro_batch,
        "max_seq_len": spec.data.max_seq_len,
        "steps": steps,
        "ours_tokens_per_s": tokens["ours"] / t.total("ours"),
        "bare_tokens_per_s": tokens["bare"] / t.total("bare"),
        "ours_step_ms_median": 1000 * t.median("ours"),
        "bare_step_ms_median": 1000 * t.median("bare"),
    }
    res["ratio"] = res["ours_tokens_per_s"] / res["bare_tokens_per_s"]
    res["ratio_median_step"] = t.median("bare") / t.median("ours")
    if "as_configured" in sides:
        res["as_configured_tokens_per_s"] = tokens["as_configured"] / t.total("as_configured")
        res["as_configured_ratio"] = res["as_configured_tokens_per_s"] / res["bare_tokens_per_s"]
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                ours()
        res["profile_top_ops"] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48
        )
    return res


def report(res: dict[str, Any]) -> None:
    print(
        f"\n== SFT, {res['model']} OPT, ZeRO-{res['zero_stage']} {res['dtype']}, micro-batch {res['micro_batch']} x "
        f"<= {res['max_seq_len']} tokens, {res['steps']} interleaved steps =="
    )
    if res["zero_stage_run"] != res["zero_stage"]:
        print(f"  zeroStage {res['zero_stage']} on one fp32 rank runs as ZeRO-{res['zero_stage_run']} "
              f"(ds_config.effective_zero_stage); DeepSpeed at ZeRO-{res['zero_stage']} as configured: "
              f"{res['as_configured_tokens_per_s']:9.1f} tokens/s = {res['as_configured_ratio']:.2f}x bare")
    print(
        f"  ours (DeepSpeed): {res['ours_tokens_per_s']:9.1f} tokens/s  median step {res['ours_step_ms_median']:.1f} ms"
    )
    print(
        f"  bare PyTorch    : {res['bare_tokens_per_s']:9.1f} tokens/s  median step {res['bare_step_ms_median']:.1f} ms"
    )
    print(
        "  "
        + goal_line("SFT tokens/s ours/bare", res["ratio"], GOAL)
        + f"  (by median step: {res['ratio_median_step']:.2f}x)"
    )
    if "profile_top_ops" in res:
        print("  torch.profiler, 10 DeepSpeed steps, top operators by self CPU time:")
        print("\n".join("    " + line for line in res["profile_top_ops"].splitlines()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--zero", type=int, nargs="+", default=[0, 2], help="ZeRO stages to run (0 = tiny-cpu example)")
    p.add_argument("--profile", action="store_true", help="torch.profiler top operators of the DeepSpeed step")
    p.add_argument("--model", choices=MODEL_SIZES, default="tiny", help="model size (random weights)")
    p.add_argument("--micro-batch", type=int, default=None, help="perDeviceBatchSize (default: the example's 16)")
    args = p.parse_args(argv)
    cpu_env()
    from kuberlhf.training.distributed import init_distributed

    init_distributed("cpu")
    with tempfile.TemporaryDirectory(prefix="kuberlhf-bench-sft-") as d:
        for zero in args.zero:
            res = run_config(zero, args.steps, Path(d), args.profile, args.model, args.micro_batch)
            report(res)
            emit({"bench": "sft", **{k: v for k, v in res.items() if k != "profile_top_ops"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
