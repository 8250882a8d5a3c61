"""Benchmark 5 (GPU): DeepSpeed-Chat's single-GPU recipe at full size, with random weights, on one GPU.

    .venv/bin/python bench/gpu_bench.py                  # on a machine with one CUDA GPU (no hub access needed)
    .venv/bin/python bench/gpu_bench.py --dry-run        # print the plan and model sizes, run nothing
    .venv/bin/python bench/gpu_bench.py --device cpu --tiny   # the same code path with tiny models (smoke test)

What it runs: ``examples/opt-1.3b-single-gpu.yaml`` (DeepSpeed-Chat's single_gpu preset: actor LoRA 128,
ZeRO 0, gradient checkpointing, prompt 256 + answer 256, generation batch 16) in bf16, with the actor and the
reward model built from OPT-1.3B and OPT-350M configuration values (``transformers.OPTConfig``, no download)
and random weights. Then:

- step 3: kuberlhf's ``RLHFEngine`` + ``PPOTrainer`` exactly as the ppo stage drives them
  (generate_experience, advantages, train_rlhf per micro-batch, EMA update), hybrid engine ON and OFF;
  samples/s, generated tokens/s and the generation share of a step;
- step 1: SFT tokens/s through the sft stage's pieces (``load_causal_lm`` -> ``deepspeed.initialize`` with
  ``train_ds_config``), sequences of ``maxSeqLen`` (512) tokens.

Random weights almost never sample EOS, so every answer runs the full 256 tokens: that is DeepSpeed-Chat's
benchmark setting (answers of 256 tokens). Numbers are printed next to DeepSpeed-Chat's published single
A6000-48G times (step 1 ~2900 s, step 2 ~670 s, step 3 ~1.2 h, total ~2.2 h for OPT-1.3B + OPT-350M), with
the projected step-3 time for DeepSpeed-Chat's step-3 data size (``--ds-chat-prompts``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from kuberlhf.planner.shapes import KNOWN_CONFIGS

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, emit  # noqa: E402

EXAMPLE = REPO / "examples" / "opt-1.3b-single-gpu.yaml"

# facebook/opt-1.3b and facebook/opt-350m config.json values (the planner's table of them), so no hub is needed.
OPT_1_3B = {k: v for k, v in KNOWN_CONFIGS["facebook/opt-1.3b"].items() if k != "model_type"}
OPT_350M = {k: v for k, v in KNOWN_CONFIGS["facebook/opt-350m"].items() if k != "model_type"}
# --tiny: the same architecture families scaled down (a CPU smoke test of every code path)
TINY_ACTOR = {**OPT_1_3B, "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 256, "num_attention_heads": 4,
              "word_embed_proj_dim": 64, "vocab_size": 512, "max_position_embeddings": 512}
TINY_REWARD = {**OPT_350M, "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 256, "num_attention_heads": 4,
               "word_embed_proj_dim": 32, "vocab_size": 512, "max_position_embeddings": 512}

# DeepSpeed-Chat README, "Coffee Time Training for a 1.3B ChatGPT Model", one A6000-48G.
PUBLISHED = {"gpu": "A6000-48G", "step1_s": 2900, "step2_s": 670, "step3_s": 1.2 * 3600, "total_s": 2.2 * 3600}
# Step-3 prompts of that run: Dahoas/rm-static (76,256 train rows) with data split 2,4,4 -> 40% for step 3.
DS_CHAT_STEP3_PROMPTS = int(76_256 * 0.4)


def param_count(cfg: dict[str, Any]) -> int:
    """Parameters of an OPT decoder (+ tied LM head) from its config values (pure; for --dry-run)."""
    h, f, n, v, p, e = (cfg["hidden_size"], cfg["ffn_dim"], cfg["num_hidden_layers"], cfg["vocab_size"],
                        cfg["max_position_embeddings"], cfg["word_embed_proj_dim"])
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    emb = v * e + (p + 2) * h
    proj = 0 if e == h else 2 * e * h
    final_ln = 2 * h if cfg["do_layer_norm_before"] else 0
    return n * layer + emb + proj + final_ln


def build_spec(tiny: bool, device: str, hybrid: bool, actor_dir: str, reward_dir: str):
    """The single-GPU example with local random-weight models, bf16 (fp32 on CPU), the hybrid engine on/off."""
    import yaml

    from kuberlhf.contract.spec import parse_pipeline

    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["accelerator"] = "cuda" if device == "cuda" else "cpu"
    spec["actor"] = {"model": actor_dir}
    spec["reward"] = {"model": reward_dir}
    dtype = "bf16" if device == "cuda" else "fp32"
    for st in spec["stages"].values():
        st["dtype"] = dtype
    spec["stages"]["ppo"]["hybridEngine"] = hybrid
    if tiny:
        spec["data"]["maxSeqLen"] = 64
        spec["stages"]["ppo"].update(maxPromptLen=16, maxAnswerLen=16, generationBatchSize=4, perDeviceBatchSize=4)
        spec["stages"]["sft"].update(perDeviceBatchSize=4, gradientAccumulationSteps=1)
        for st in ("sft", "ppo"):
            key = "lora" if st == "sft" else "actorLora"
            spec["stages"][st][key] = {"dim": 8, "moduleName": "decoder.layers."}
    return parse_pipeline(doc).spec


def write_models(root: Path, tiny: bool, device: str) -> tuple[Path, Path, Any]:
    """Random-weight actor (OPT-1.3B values) and reward model (OPT-350M values) directories + a tokenizer.
    The tokenizer is the shipped tiny BPE (ids < 512 fit any OPT vocabulary): token ids, not words, are what
    throughput depends on."""
    import torch
    from transformers import AutoModel, OPTConfig, OPTForCausalLM

    from kuberlhf.models import RewardModel, load_tokenizer
    from kuberlhf.models.tiny import TINY_MODEL_NAME

    tok = load_tokenizer(TINY_MODEL_NAME)
    actor_dir, reward_dir = root / "actor", root / "reward"
    init_device = "cuda" if device == "cuda" else "cpu"
    torch.manual_seed(1234)
    with torch.device(init_device):  # random init on the GPU: seconds instead of minutes on the CPU
        actor = OPTForCausalLM(OPTConfig(**(TINY_ACTOR if tiny else OPT_1_3B)))
        actor.save_pretrained(actor_dir)
        tok.save_pretrained(actor_dir)
        del actor
        reward = RewardModel(AutoModel.from_config(OPTConfig(**(TINY_REWARD if tiny else OPT_350M))))
        reward.save_pretrained(reward_dir, tokenizer=tok)
        del reward
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return actor_dir, reward_dir, tok


def random_prompts(n: int, length: int, vocab_lo: int, vocab_hi: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_lo, vocab_hi, (n, length), generator=g)
    return {"prompt_input_ids": ids, "prompt_attention_mask": torch.ones_like(ids)}


def free(*objs: Any) -> None:
    import torch

    for o in objs:
        del o
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_ppo(spec: Any, actor_dir: Path, reward_dir: Path, tok: Any, device: str, steps: int, warmup: int
              ) -> dict[str, Any]:
    import torch

    from kuberlhf.rlhf.engine import EngineOptions, RLHFEngine
    from kuberlhf.rlhf.trainer import PPOSettings, PPOTrainer
    from kuberlhf.stages.ppo import split_micro
    from kuberlhf.training.ds_config import DSConfigError

    st = spec.stages.ppo
    gen_bs = st.generation_batch_size
    micro = min(st.per_device_batch_size, gen_bs)
    try:
        options = EngineOptions.from_spec(spec, 1)
        tok.padding_side = "left"
        engine = RLHFEngine(str(actor_dir), str(reward_dir), tok, options,
                            num_total_iters=max(1, (steps + warmup) * math.ceil(gen_bs / micro)))
    except DSConfigError as e:
        return {"skipped": str(e)}
    trainer = PPOTrainer(engine, PPOSettings.from_spec(st), world_size=1)
    gen_time = [0.0]
    inner = trainer.generate

    def timed_generate(*a, **kw):
        sync(device)
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        sync(device)
        gen_time[0] += time.perf_counter() - t0
        return out

    trainer.generate = timed_generate
    tokens, total = 0, 0.0
    for i in range(warmup + steps):
        batch = random_prompts(gen_bs, st.max_prompt_len, 3, len(tok), seed=i)
        if i == warmup:
            gen_time[0] = 0.0
        sync(device)
        t0 = time.perf_counter()
        exp = trainer.generate_experience(batch)
        exp.update(trainer.advantages(exp))
        for _ in range(st.ppo_epochs):
            for mb in split_micro(exp, micro):
                trainer.train_rlhf(mb)
                engine.update_ema()
        sync(device)
        if i >= warmup:
            total += time.perf_counter() - t0
            tokens += int(exp["action_mask"].sum())
    res = {"samples_per_s": gen_bs * steps / total, "gen_tokens_per_s": tokens / total,
           "gen_share": gen_time[0] / total, "step_s": total / steps, "gen_batch": gen_bs,
           "prompt_len": st.max_prompt_len, "answer_len": st.max_answer_len,
           "mean_answer_tokens": tokens / (gen_bs * steps)}
    if device == "cuda":
        res["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    free(trainer, engine)
    return res


def bench_sft(spec: Any, actor_dir: Path, tok: Any, device: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch

    from kuberlhf.models import load_causal_lm
    from kuberlhf.models.lora import apply_lora
    from kuberlhf.rlhf.ppo_math import causal_lm_loss
    from kuberlhf.training.ds_config import stage_settings, train_ds_config
    from kuberlhf.training.loop import ds_initialize, make_optimizer, make_scheduler

    st = spec.stages.sft
    s = stage_settings(spec, "sft", 1)
    model = load_causal_lm(str(actor_dir), seed=st.seed, dropout=spec.actor.dropout,
                           gradient_checkpointing=st.gradient_checkpointing)
    apply_lora(model, st.lora, "spec.stages.sft.lora")
    opt = make_optimizer(model, st.learning_rate, st.weight_decay, st.offload,
                         st.lora.learning_rate if st.lora else None)
    engine = ds_initialize(model, train_ds_config(s), opt, make_scheduler(opt, st.lr_scheduler, 0, 10_000))
    engine.train()
    seq = spec.data.max_seq_len
    g = torch.Generator().manual_seed(0)
    micro_steps = (warmup + steps) * s.grad_accum
    tokens, total = 0, 0.0
    for i in range(micro_steps):
        ids = torch.randint(3, len(tok), (s.micro_batch, seq), generator=g).to(engine.device)
        mask = torch.ones_like(ids)
        sync(device)
        t0 = time.perf_counter()
        out = engine(input_ids=ids, attention_mask=mask, use_cache=False)
        loss = causal_lm_loss(out.logits, ids)
        engine.backward(loss)
        engine.step()
        sync(device)
        if i >= warmup * s.grad_accum:
            total += time.perf_counter() - t0
            tokens += ids.numel()
    res = {"tokens_per_s": tokens / total, "micro_batch": s.micro_batch, "grad_accum": s.grad_accum, "seq_len": seq,
           "zero_stage": s.zero_stage, "dtype": s.dtype, "lora_dim": st.lora.dim if st.lora else 0}
    if device == "cuda":
        res["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    free(engine, model, opt)
    return res


def plan(args: argparse.Namespace) -> dict[str, Any]:
    actor_cfg, reward_cfg = (TINY_ACTOR, TINY_REWARD) if args.tiny else (OPT_1_3B, OPT_350M)
    spec = build_spec(args.tiny, args.device, True, "/tmp/actor", "/tmp/reward")
    st = spec.stages.ppo
    return {"device": args.device, "tiny": args.tiny, "actor_params": param_count(actor_cfg),
            "reward_params": param_count(reward_cfg), "dtype": st.dtype.value, "ppo": {
                "generation_batch": st.generation_batch_size, "micro_batch": st.per_device_batch_size,
                "grad_accum": st.gradient_accumulation_steps, "prompt_len": st.max_prompt_len,
                "answer_len": st.max_answer_len, "actor_zero": st.actor_zero_stage, "critic_zero": st.critic_zero_stage,
                "actor_lora": st.actor_lora.dim if st.actor_lora else 0, "grad_ckpt": st.gradient_checkpointing,
                "ema": st.ema.enabled, "hybrid_engine": ["on", "off"]},
            "sft": {"micro_batch": spec.stages.sft.per_device_batch_size, "seq_len": spec.data.max_seq_len},
            "steps": args.steps, "warmup": args.warmup}


def report(res: dict[str, Any], prompts: int) -> None:
    pub = PUBLISHED
    print(f"\n== DeepSpeed-Chat single-GPU recipe, {'TINY smoke models' if res['plan']['tiny'] else 'OPT-1.3B actor + OPT-350M reward'}"
          f" (random weights), {res['plan']['dtype']}, device {res['device_name']} ==")
    for name in ("ppo_hybrid_on", "ppo_hybrid_off"):
        r = res.get(name, {})
        label = "step 3, hybrid engine " + ("ON " if name.endswith("on") else "OFF")
        if "error" in r or "skipped" in r:
            print(f"  {label}: {'skipped' if 'skipped' in r else 'FAILED'}: {r.get('skipped') or r.get('error')}")
            continue
        proj_h = prompts / r["samples_per_s"] / 3600
        versus = ("tiny smoke models: not comparable" if res["plan"]["tiny"] else
                  f"DeepSpeed-Chat {pub['gpu']}: {pub['step3_s'] / 3600:.1f} h; ours/theirs speed "
                  f"{pub['step3_s'] / 3600 / proj_h:.2f}x")
        print(f"  {label}: {r['samples_per_s']:7.2f} samples/s  {r['gen_tokens_per_s']:9.1f} gen tokens/s  "
              f"generation {100 * r['gen_share']:.0f}% of the step  ->  {prompts} prompts in {proj_h:.2f} h ({versus})")
    on, off = res.get("ppo_hybrid_on", {}), res.get("ppo_hybrid_off", {})
    if "samples_per_s" in on and "samples_per_s" in off:
        print(f"  hybrid engine speed-up (on/off): {on['samples_per_s'] / off['samples_per_s']:.2f}x")
    s = res.get("sft", {})
    if "tokens_per_s" in s:
        print(f"  step 1 SFT: {s['tokens_per_s']:9.1f} tokens/s (micro-batch {s['micro_batch']} x {s['seq_len']}, "
              f"ZeRO-{s['zero_stage']}, LoRA {s['lora_dim']}); DeepSpeed-Chat {pub['gpu']} step 1: "
              f"{pub['step1_s']} s for its run")
    elif s:
        print(f"  step 1 SFT: FAILED: {s.get('error')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="single-GPU DeepSpeed-Chat recipe benchmark (random weights)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models of the same families (smoke test)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and model sizes; run nothing")
    p.add_argument("--steps", type=int, default=4, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], choices=["hybrid_on", "hybrid_off", "sft"])
    p.add_argument("--ds-chat-prompts", type=int, default=DS_CHAT_STEP3_PROMPTS,
                   help="step-3 prompts of DeepSpeed-Chat's run, for the projected time (default: 40%% of "
                        "Dahoas/rm-static's 76,256 train rows)")
    p.add_argument("--workdir", default=None, help="where the random-weight models are written (default: tmp)")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny and not args.dry_run:
        p.error("--device cpu runs the full-size models for hours: add --tiny (smoke test) or --dry-run")
    from common import cpu_env

    if args.device == "cpu":
        cpu_env()
    the_plan = plan(args)
    if args.dry_run:
        print(json.dumps(the_plan, indent=2))
        print(f"published ({PUBLISHED['gpu']}): step 1 {PUBLISHED['step1_s']} s, step 2 {PUBLISHED['step2_s']} s, "
              f"step 3 {PUBLISHED['step3_s'] / 3600:.1f} h; step-3 prompts assumed {args.ds_chat_prompts}")
        return 0
    import torch

    from kuberlhf.training.distributed import init_distributed

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device visible; use --device cpu --tiny for a smoke test")
    init_distributed(args.device)
    res: dict[str, Any] = {"plan": the_plan, "device_name": torch.cuda.get_device_name(0) if args.device == "cuda"
                           else "cpu"}
    with tempfile.TemporaryDirectory(prefix="kuberlhf-gpu-bench-", dir=args.workdir) as d:
        t0 = time.time()
        actor_dir, reward_dir, tok = write_models(Path(d), args.tiny, args.device)
        res["model_write_s"] = time.time() - t0
        for hybrid in (True, False):
            key = f"ppo_hybrid_{'on' if hybrid else 'off'}"
            if key.removeprefix("ppo_") in args.skip:
                continue
            try:
                spec = build_spec(args.tiny, args.device, hybrid, str(actor_dir), str(reward_dir))
                res[key] = bench_ppo(spec, actor_dir, reward_dir, tok, args.device, args.steps, args.warmup)
            except Exception as e:  # noqa: BLE001 - report and go on with the other configurations
                traceback.print_exc()
                res[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
            free()
        if "sft" not in args.skip:
            try:
                spec = build_spec(args.tiny, args.device, False, str(actor_dir), str(reward_dir))
                res["sft"] = bench_sft(spec, actor_dir, tok, args.device, args.steps, args.warmup)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                res["sft"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    report(res, args.ds_chat_prompts)
    emit({"bench": "gpu", **res, "published": PUBLISHED})
    failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
