"""Benchmark 1: step-3 PPO throughput of kuberlhf's ``PPOTrainer`` (generate_experience + advantages +
train_rlhf on DeepSpeed engines) against the trainers users would pick, same tiny models, same prompt batches in
the same order, the same samples per PPO update, interleaved update by update:

- ``trl``: TRL 1.12's ``PPOTrainer`` (``trl.experimental.ppo``, the last release with PPO) as shipped, in its own
  venv made by this script (``~/.cache/kuberlhf/trl-1.12.0-torch-2.13.0``: torch==2.13.0 first, then trl==1.12.0),
  driven by ``bench/trl_ppo_peer.py``;
- ``trl-nogc``: the same with its two per-update ``gc.collect()`` calls replaced by no-ops (the best peer loop);
- ``ours-generate``: kuberlhf with ``decoder: generate`` (transformers' generate, the path before
  kuberlhf.rlhf.decode), to show what the decode path is worth;
- ``naive`` (``bench/naive_ppo.py``, generation without a KV cache): a reference row only.

    .venv/bin/python bench/ppo_bench.py [--rounds 8] [--answer-len 16 40] [--profile] [--no-trl] [--compile]

Prints samples/s of every side, the ratios (goal: ours >= 1.5x the best TRL loop), per-phase times of our step,
the optimizer-step cost of ours against torch's foreach clipping + fused AdamW on the same parameters, the machine
load (uptime) and (``--profile``) torch.profiler's top operators of our step. ``--compile`` adds a side whose
decoding step is torch.compile'd, compile time included in its total."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_env, emit, goal_line, interleave, tiny_spec, write_tiny_models  # noqa: E402

GOAL = 1.5  # ours / the best TRL loop (TRL with its gc calls disabled)
TRL_VERSION, TORCH_VERSION = "1.12.0", "2.13.0"
TRL_VENV = Path.home() / ".cache" / "kuberlhf" / f"trl-{TRL_VERSION}-torch-{TORCH_VERSION}"
PEER = Path(__file__).resolve().parent / "trl_ppo_peer.py"
UNMATCHED = (
    "TRL trains policy and value in one loss with one AdamW at the actor's learning rate (ours: two engines, the "
    "critic at its own rate); TRL scores the reward at the token before the first pad of the EOS-truncated answer "
    "(ours: the last non-pad token, DeepSpeed-Chat's), generates through accelerate's unwrap context, and runs "
    "plain PyTorch modules (ours: DeepSpeed engines, ZeRO 0, fp32)"
)


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


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def ensure_trl_venv() -> Path:
    """TRL's own venv, outside the clone: torch first (so trl's resolver keeps it), then trl."""
    py = TRL_VENV / "bin" / "python"
    stamp = TRL_VENV / ".kuberlhf-ready"
    if stamp.exists():
        return py
    print(f"making the TRL venv {TRL_VENV} (torch=={TORCH_VERSION}, then trl=={TRL_VERSION})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(TRL_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"trl=={TRL_VERSION}"], check=True)
    stamp.write_text(f"trl=={TRL_VERSION} torch=={TORCH_VERSION}\n")
    return py


class TRLPeer:
    """A TRL PPOTrainer in its own process, one PPO update per :meth:`step` (bench/trl_ppo_peer.py)."""

    def __init__(self, python: Path, cfg: dict[str, Any], workdir: Path, no_gc: bool):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "cfg.json").write_text(json.dumps(cfg))
        # not our process group's variables: accelerate would join it
        dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV")) and k not in dist_vars
        }
        env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        self.log = open(workdir / "stderr.log", "w")  # noqa: SIM115 (lives as long as the process)
        args = [str(python), str(PEER), str(workdir / "cfg.json"), *(["--no-gc"] if no_gc else [])]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )
        self._expect("TRL-READY")
        self.seconds: list[float] = []

    def _expect(self, prefix: str) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.log.flush()
                tail = Path(self.log.name).read_text()[-3000:]
                raise RuntimeError(f"the TRL peer exited (rc {self.proc.wait()}):\n{tail}")
            if line.startswith(prefix):
                return line.strip()

    def step(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.seconds.append(float(self._expect("TRL-STEP").split()[1]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def prompt_batches(spec: Any, tokenizer: Any, batch_size: int, cache_dir: Path) -> list[dict[str, Any]]:
    from kuberlhf.contract.spec import Stage
    from kuberlhf.data import PromptDataset, stage_rows
    from kuberlhf.training.loop import make_loader

    rows, _ = stage_rows(spec.data, Stage.ppo)
    ds = PromptDataset(rows, tokenizer, spec.stages.ppo.max_prompt_len, cache_dir=cache_dir, cache_key="bench")
    return list(make_loader(ds, batch_size, 0, 1, spec.stages.ppo.seed, 0))


def build_ours(
    spec: Any,
    actor_dir: Path,
    critic_dir: Path,
    tokenizer: Any,
    decoder: str = "auto",
    compile_decoder: bool = False,
):
    from kuberlhf.rlhf.engine import EngineOptions, RLHFEngine
    from kuberlhf.rlhf.trainer import PPOSettings, PPOTrainer

    options = EngineOptions.from_spec(spec, 1)
    options.ema_enabled = False  # the peers have no EMA: compare generate_experience + train_rlhf only
    engine = RLHFEngine(str(actor_dir), str(critic_dir), tokenizer, options, num_total_iters=10_000)
    settings = PPOSettings.from_spec(spec.stages.ppo)
    settings.decoder, settings.compile_decoder = decoder, compile_decoder
    return PPOTrainer(engine, settings, world_size=1)


def ppo_update(trainer: Any, batch: dict[str, Any], micro: int, epochs: int, clock: PhaseClock | None = None) -> int:
    from kuberlhf.stages.ppo import split_micro

    gen_exp, train = trainer.generate_experience, trainer.train_rlhf
    if clock is not None:
        gen_exp, train = clock.wrap("generate_experience", gen_exp), clock.wrap("train (actor+critic)", train)
    exp = gen_exp(batch)
    exp.update(trainer.advantages(exp))
    for _ in range(epochs):
        for mb in split_micro(exp, micro):
            train(mb)
    return int(exp["action_mask"].sum())


def unpadded(batches: list[dict[str, Any]]) -> list[list[int]]:
    return [
        ids[m.bool()].tolist()
        for b in batches
        for ids, m in zip(b["prompt_input_ids"], b["prompt_attention_mask"], strict=True)
    ]


def run_config(
    answer_len: int,
    rounds: int,
    profile: bool,
    tmp: Path,
    actor_dir: Path,
    critic_dir: Path,
    trl_python: Path | None,
    compile_side: bool,
) -> dict[str, Any]:
    import torch
    from naive_ppo import NaivePPO

    from kuberlhf.models import load_tokenizer

    spec = tiny_spec({"ppo": {"maxAnswerLen": answer_len}})
    st = spec.stages.ppo
    gen_bs = st.generation_batch_size
    micro = min(st.per_device_batch_size or gen_bs, gen_bs)
    tok = load_tokenizer(str(actor_dir), padding_side="left")
    batches = prompt_batches(spec, tok, gen_bs, tmp / "tok-cache")
    updates = rounds + 1  # + the warm-up round
    ours = build_ours(spec, actor_dir, critic_dir, tok)
    ours_gen = build_ours(spec, actor_dir, critic_dir, tok, decoder="generate")
    assert ours.decoder is not None and ours_gen.decoder is None
    naive = NaivePPO(
        str(actor_dir), str(critic_dir), tok, ours.s, actor_lr=st.actor_learning_rate, critic_lr=st.critic_learning_rate
    )
    clock = PhaseClock()
    ours.generate = clock.wrap("generate", ours.generate)
    it: dict[str, int] = {}
    tokens: dict[str, int] = {}

    def next_batch(side: str) -> dict[str, Any]:
        i = it.get(side, 0)
        it[side] = i + 1
        return batches[i % len(batches)]

    def kuberlhf_side(name: str, trainer: Any, phase_clock: PhaseClock | None = None):
        def run() -> None:
            tokens[name] = tokens.get(name, 0) + ppo_update(
                trainer, next_batch(name), micro, st.ppo_epochs, phase_clock
            )

        return run

    sides = {"ours": kuberlhf_side("ours", ours, clock), "ours-generate": kuberlhf_side("ours-generate", ours_gen)}
    compile_s = None
    if compile_side:
        t0 = time.perf_counter()
        ours_c = build_ours(spec, actor_dir, critic_dir, tok, compile_decoder=True)
        ppo_update(ours_c, batches[0], micro, st.ppo_epochs)  # the compile happens here, timed
        compile_s = time.perf_counter() - t0
        sides["ours-compiled"] = kuberlhf_side("ours-compiled", ours_c)
    peers: dict[str, TRLPeer] = {}
    if trl_python is not None:
        order = batches * ((updates + len(batches) - 1) // len(batches))
        cfg = {
            "actor_dir": str(actor_dir),
            "critic_dir": str(critic_dir),
            "batch": gen_bs,
            "prompts": unpadded(order[:updates]),
            "updates": updates,
            "ppo_epochs": st.ppo_epochs,
            "answer_len": answer_len,
            "temperature": st.temperature,
            "kl_coef": st.kl_coef,
            "clip_range": st.clip_range,
            "clip_range_value": st.clip_range_value,
            "gamma": st.gamma,
            "lam": st.lam,
            "actor_lr": st.actor_learning_rate,
            "seed": st.seed,
        }
        for name, no_gc in (("trl", False), ("trl-nogc", True)):
            peers[name] = TRLPeer(
                trl_python, {**cfg, "output_dir": str(tmp / name / "out")}, tmp / name / str(answer_len), no_gc
            )
            sides[name] = peers[name].step

    def naive_side() -> None:
        tokens["naive"] = tokens.get("naive", 0) + int(naive.step(next_batch("naive"))["action_mask"].sum())

    sides["naive"] = naive_side
    torch.manual_seed(0)
    load_before = load()
    try:
        interleave(sides, rounds=1, warmup=0)  # warm-up round, untimed
        clock.reset()
        tokens.clear()
        t = interleave(sides, rounds=rounds, warmup=0)
    finally:
        for peer in peers.values():
            peer.close()
    res: dict[str, Any] = {
        "answer_len": answer_len,
        "prompt_len": st.max_prompt_len,
        "batch": gen_bs,
        "micro_batch": micro,
        "rounds": rounds,
        "load_before": load_before,
        "load_after": load(),
        "samples_per_s": {},
        "unmatched": UNMATCHED if peers else None,
    }
    for side in sides:
        # a peer's own clock (go -> end of its update) leaves out the pipe round trip
        total = sum(peers[side].seconds[-rounds:]) if side in peers else t.total(side)
        res["samples_per_s"][side] = gen_bs * rounds / total
    sps = res["samples_per_s"]
    res["ratios"] = {f"ours/{k}": sps["ours"] / v for k, v in sps.items() if k != "ours"}
    if compile_s is not None:
        res["compile_first_update_s"] = compile_s
    ours_total = t.total("ours")
    ot = dict(clock.t)
    ot["score (3 forwards)"] = ot.pop("generate_experience") - ot["generate"]
    ot["advantages+glue"] = ours_total - sum(ot.values())
    res["ours_gen_share"] = ot["generate"] / ours_total
    res["ours_phases_ms_per_update"] = {k: 1000 * v / rounds for k, v in ot.items()}
    res["optimizer_step"] = optimizer_step_costs(ours)
    if profile:
        res["profile_top_ops"] = profile_ours(sides["ours"], rounds=max(2, rounds // 4))
    return res


def optimizer_step_costs(trainer: Any, reps: int = 40) -> dict[str, float]:
    """ms per optimizer step of the actor: our engine's step (clipping + fused AdamW + zero_grad), DeepSpeed's
    own per-tensor clipping (what the engine ran before), and torch's foreach clipping + fused AdamW + zero_grad
    on a copy of the same parameters, interleaved."""
    import torch
    from deepspeed.runtime.utils import clip_grad_norm_ as ds_clip

    engine = trainer.actor
    params = [p for p in engine.module.parameters() if p.requires_grad]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(twin, lr=1e-6, betas=(0.9, 0.95), fused=True)
    grads = [torch.randn_like(p) * 1e-3 for p in params]

    def fill(ps: list[torch.Tensor]) -> None:
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()

    def ours() -> None:
        engine.step()

    def ds_clipping() -> None:
        ds_clip(params, engine.gradient_clipping(), mpu=None)

    def torch_side() -> None:
        torch.nn.utils.clip_grad_norm_(twin, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {
        "ours_engine_step": 0.0,
        "deepspeed_clip_only": 0.0,
        "torch_foreach_clip_fused_adamw": 0.0,
        "tensors": len(params),
    }
    for _ in range(reps):
        for name, fn, ps in (
            ("ours_engine_step", ours, params),
            ("deepspeed_clip_only", ds_clipping, params),
            ("torch_foreach_clip_fused_adamw", torch_side, twin),
        ):
            fill(ps)
            t0 = time.perf_counter()
            fn()
            out[name] += 1000 * (time.perf_counter() - t0) / reps
    for p in params:
        p.grad = None
    return out


def profile_ours(step, rounds: int) -> str:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            with record_function("ppo_step"):
                step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48)


def report(res: dict[str, Any]) -> None:
    print(
        f"\n== step-3 PPO, tiny OPT, {res['batch']} prompts per update (micro-batch {res['micro_batch']}), prompt "
        f"<= {res['prompt_len']}, answer {res['answer_len']} tokens, {res['rounds']} interleaved rounds =="
    )
    print(f"  load average (1, 5, 15 min) before {res['load_before']}, after {res['load_after']}")
    for side, v in res["samples_per_s"].items():
        note = {
            "trl": "TRL 1.12 PPOTrainer as shipped",
            "trl-nogc": "TRL 1.12, its per-update gc.collect() disabled",
            "naive": "reference row only",
            "ours-generate": "kuberlhf with decoder=generate",
            "ours-compiled": "kuberlhf, compiled decode step",
        }.get(side, "kuberlhf (decoder=auto: static)")
        print(f"  {side:14s} {v:8.2f} samples/s   {note}")
    r = res["ratios"]
    if "ours/trl-nogc" in r:
        print("  " + goal_line("samples/s ours / best peer (TRL, gc off)", r["ours/trl-nogc"], GOAL))
        print(f"  samples/s ours / TRL as shipped: {r['ours/trl']:.2f}x")
    print(
        f"  samples/s ours / ours with generate: {r['ours/ours-generate']:.2f}x;  ours / naive: {r['ours/naive']:.2f}x"
    )
    if "compile_first_update_s" in res:
        print(f"  compiled side: first update (compile) {res['compile_first_update_s']:.1f} s")
    if res.get("unmatched"):
        print(f"  not matched: {res['unmatched']}")
    print(
        "  our update, ms: "
        + ", ".join(f"{k} {v:.1f}" for k, v in res["ours_phases_ms_per_update"].items())
        + f"  (generation {100 * res['ours_gen_share']:.0f}%)"
    )
    o = res["optimizer_step"]
    print(
        f"  actor optimizer step ({o['tensors']} tensors), ms: ours (engine.step) {o['ours_engine_step']:.3f}, "
        f"torch foreach clip + fused AdamW + zero_grad {o['torch_foreach_clip_fused_adamw']:.3f} "
        f"(ratio {o['ours_engine_step'] / o['torch_foreach_clip_fused_adamw']:.2f}x); DeepSpeed's clipping alone "
        f"{o['deepspeed_clip_only']:.3f}"
    )
    if "profile_top_ops" in res:
        print("  torch.profiler, our step, top operators by self CPU time:")
        print("\n".join("    " + line for line in res["profile_top_ops"].splitlines()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument(
        "--answer-len", type=int, nargs="+", default=[16, 40], help="answer lengths to run (40 = the tiny-cpu example)"
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler top operators of our step")
    p.add_argument("--no-trl", action="store_true", help="leave the TRL peers out (no venv needed)")
    p.add_argument("--compile", action="store_true", help="add a side with the decoding step torch.compile'd")
    args = p.parse_args(argv)
    trl_python = None if args.no_trl else ensure_trl_venv()
    cpu_env()
    from kuberlhf.training.distributed import init_distributed

    init_distributed("cpu")
    with tempfile.TemporaryDirectory(prefix="kuberlhf-bench-ppo-") as d:
        tmp = Path(d)
        actor_dir, critic_dir = write_tiny_models(tmp)
        for answer_len in args.answer_len:
            res = run_config(
                answer_len, args.rounds, args.profile, tmp, actor_dir, critic_dir, trl_python, args.compile
            )
            report(res)
            emit({"bench": "ppo", **{k: v for k, v in res.items() if k != "profile_top_ops"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
