"""Benchmark 1: step-3 PPO throughput of kuberlhf's ``PPOTrainer`` (generate_experience + advantages +
train_rlhf on DeepSpeed engines) against the naive baseline of ``bench/naive_ppo.py``, same process, same tiny
models, same prompts, interleaved rounds.

    .venv/bin/python bench/ppo_bench.py [--rounds 8] [--answer-len 16 64] [--profile]

Prints samples/s and generated tokens/s of both sides, the ratio (goal >= 2x), the generation share of a step,
a per-phase breakdown of both sides, and (``--profile``) torch.profiler's top operators of our step."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_env, emit, goal_line, interleave, tiny_spec, write_tiny_models  # noqa: E402

GOAL = 2.0


class PhaseClock:
    """Accumulates wall time per phase name."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
        return timed

    def reset(self) -> None:
        self.t.clear()


def prompt_batches(spec: Any, tokenizer: Any, batch_size: int, cache_dir: Path) -> list[dict[str, Any]]:
    from kuberlhf.contract.spec import Stage
    from kuberlhf.data import PromptDataset, stage_rows
    from kuberlhf.training.loop import make_loader

    rows, _ = stage_rows(spec.data, Stage.ppo)
    ds = PromptDataset(rows, tokenizer, spec.stages.ppo.max_prompt_len, cache_dir=cache_dir, cache_key="bench")
    return list(make_loader(ds, batch_size, 0, 1, spec.stages.ppo.seed, 0))


def build_ours(spec: Any, actor_dir: Path, critic_dir: Path, tokenizer: Any):
    from kuberlhf.rlhf.engine import EngineOptions, RLHFEngine
    from kuberlhf.rlhf.trainer import PPOSettings, PPOTrainer

    options = EngineOptions.from_spec(spec, 1)
    options.ema_enabled = False  # the baseline has no EMA: compare generate_experience + train_rlhf only
    engine = RLHFEngine(str(actor_dir), str(critic_dir), tokenizer, options, num_total_iters=10_000)
    return PPOTrainer(engine, PPOSettings.from_spec(spec.stages.ppo), world_size=1)


def run_config(answer_len: int, rounds: int, profile: bool, tmp: Path, actor_dir: Path, critic_dir: Path
               ) -> dict[str, Any]:
    import torch
    from naive_ppo import NaivePPO

    from kuberlhf.models import load_tokenizer
    from kuberlhf.stages.ppo import split_micro

    spec = tiny_spec({"ppo": {"maxAnswerLen": answer_len}})
    st = spec.stages.ppo
    gen_bs = st.generation_batch_size
    micro = min(st.per_device_batch_size or gen_bs, gen_bs)
    tok = load_tokenizer(str(actor_dir), padding_side="left")
    batches = prompt_batches(spec, tok, gen_bs, tmp / "tok-cache")
    trainer = build_ours(spec, actor_dir, critic_dir, tok)
    naive = NaivePPO(str(actor_dir), str(critic_dir), tok, trainer.s, actor_lr=st.actor_learning_rate,
                     critic_lr=st.critic_learning_rate)

    ours_clock, base_clock = PhaseClock(), PhaseClock()
    trainer.generate = ours_clock.wrap("generate", trainer.generate)
    naive.generate = base_clock.wrap("generate", naive.generate)
    naive.score = base_clock.wrap("score (4 forwards)", naive.score)
    naive.train = base_clock.wrap("train (actor+critic)", naive.train)
    gen_exp = ours_clock.wrap("generate_experience", trainer.generate_experience)
    train_rlhf = ours_clock.wrap("train (actor+critic)", trainer.train_rlhf)
    tokens = {"ours": 0, "naive": 0}
    it = {"ours": 0, "naive": 0}

    def ours() -> None:
        batch = batches[it["ours"] % len(batches)]
        it["ours"] += 1
        exp = gen_exp(batch)
        exp.update(trainer.advantages(exp))
        for _ in range(st.ppo_epochs):
            for mb in split_micro(exp, micro):
                train_rlhf(mb)
        tokens["ours"] += int(exp["action_mask"].sum())

    def baseline() -> None:
        batch = batches[it["naive"] % len(batches)]
        it["naive"] += 1
        exp = naive.step(batch)
        tokens["naive"] += int(exp["action_mask"].sum())

    torch.manual_seed(0)
    interleave({"ours": ours, "naive": baseline}, rounds=1, warmup=1)
    for clock in (ours_clock, base_clock):
        clock.reset()
    tokens.update(ours=0, naive=0)
    t = interleave({"ours": ours, "naive": baseline}, rounds=rounds, warmup=0)
    res: dict[str, Any] = {"answer_len": answer_len, "prompt_len": st.max_prompt_len, "batch": gen_bs,
                           "rounds": rounds}
    for side in ("ours", "naive"):
        total = t.total(side)
        res[f"{side}_samples_per_s"] = gen_bs * rounds / total
        res[f"{side}_gen_tokens_per_s"] = tokens[side] / total
    res["ratio_samples"] = res["ours_samples_per_s"] / res["naive_samples_per_s"]
    res["ratio_tokens"] = res["ours_gen_tokens_per_s"] / res["naive_gen_tokens_per_s"]
    ours_total, base_total = t.total("ours"), t.total("naive")
    ot = dict(ours_clock.t)
    ot["score (4 forwards)"] = ot.pop("generate_experience") - ot["generate"]
    ot["advantages+glue"] = ours_total - sum(ot.values())
    bt = dict(base_clock.t)
    bt["advantages+glue"] = base_total - sum(bt.values())
    res["ours_gen_share"] = ot["generate"] / ours_total
    res["naive_gen_share"] = bt["generate"] / base_total
    res["phases_ms_per_step"] = {k: {"ours": 1000 * ot.get(k, 0.0) / rounds, "naive": 1000 * bt.get(k, 0.0) / rounds}
                                 for k in ("generate", "score (4 forwards)", "train (actor+critic)", "advantages+glue")}
    if profile:
        res["profile_top_ops"] = profile_ours(ours, rounds=max(2, rounds // 4))
    return res


def profile_ours(step, rounds: int) -> str:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            with record_function("ppo_step"):
                step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48)


def report(res: dict[str, Any]) -> None:
    print(f"\n== step-3 PPO, tiny OPT, batch {res['batch']}, prompt <= {res['prompt_len']}, "
          f"answer {res['answer_len']} tokens, {res['rounds']} interleaved rounds ==")
    print(f"  ours : {res['ours_samples_per_s']:8.2f} samples/s  {res['ours_gen_tokens_per_s']:9.1f} gen tokens/s"
          f"  (generation {100 * res['ours_gen_share']:.0f}% of the step)")
    print(f"  naive: {res['naive_samples_per_s']:8.2f} samples/s  {res['naive_gen_tokens_per_s']:9.1f} gen tokens/s"
          f"  (generation {100 * res['naive_gen_share']:.0f}% of the step)")
    print("  " + goal_line("PPO samples/s ours/naive", res["ratio_samples"], GOAL))
    print(f"  PPO gen tokens/s ours/naive: {res['ratio_tokens']:.2f}x")
    print(f"  {'phase (ms per step)':24s} {'ours':>9s} {'naive':>9s} {'ours/naive time':>16s}")
    for phase, v in res["phases_ms_per_step"].items():
        rel = v["ours"] / v["naive"] if v["naive"] > 0 else float("nan")
        print(f"  {phase:24s} {v['ours']:9.1f} {v['naive']:9.1f} {rel:15.2f}x")
    if "profile_top_ops" in res:
        print("  torch.profiler, our step, top operators by self CPU time:")
        print("\n".join("    " + line for line in res["profile_top_ops"].splitlines()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--answer-len", type=int, nargs="+", default=[16, 64],
                   help="answer lengths to run (16 = the tiny-cpu example)")
    p.add_argument("--profile", action="store_true", help="torch.profiler top operators of our step")
    args = p.parse_args(argv)
    cpu_env()
    from kuberlhf.training.distributed import init_distributed

    init_distributed("cpu")
    with tempfile.TemporaryDirectory(prefix="kuberlhf-bench-ppo-") as d:
        tmp = Path(d)
        actor_dir, critic_dir = write_tiny_models(tmp)
        for answer_len in args.answer_len:
            res = run_config(answer_len, args.rounds, args.profile, tmp, actor_dir, critic_dir)
            report(res)
            emit({"bench": "ppo", **{k: v for k, v in res.items() if k != "profile_top_ops"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
