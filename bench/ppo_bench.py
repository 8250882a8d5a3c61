"""Benchmark 1: step-3 PPO throughput of kuberlhf's ``PPOTrainer`` (generate_experience + advantages +
train_rlhf on DeepSpeed engines) against the trainers users would pick, same tiny models, same prompt batches in
the same order, the same samples per PPO update, interleaved update by update:

- ``trl``: TRL 1.12's ``PPOTrainer`` (``trl.experimental.ppo``, the last release with PPO) as shipped, in its own
  venv made by this script (``~/.cache/kuberlhf/trl-1.12.0-torch-2.13.0``: torch==2.13.0 first, then trl==1.12.0),
  driven by ``bench/trl_ppo_peer.py``;
- ``trl-nogc``: the same with its two per-update ``gc.collect()`` calls replaced by no-ops (the best peer loop);
- ``ours-generate``: kuberlhf with ``decoder: generate`` (transformers' generate, the path before
  kuberlhf.rlhf.decode), to show what the decode path is worth;
- ``naive`` (``bench/naive_ppo.py``, generation without a KV cache): a reference row only;
- ``ours-rolloutN`` (``--rollout N``): kuberlhf with ``rolloutBatchSize: N``: N prompts decoded together, then
  one PPO update per ``generationBatchSize`` of them, so the samples per PPO update are the other sides'.

    .venv/bin/python bench/ppo_bench.py [--rounds 8] [--answer-len 16 40] [--profile] [--no-trl] [--compile]
        [--model tiny|opt-125m] [--sides ours trl-nogc ...] [--rollout 32]

``--model opt-125m`` runs facebook/opt-125m's shape (random weights from its published config, no hub) for actor
and critic alike; there the default sides are ``ours`` and ``trl-nogc`` only (every side holds four 125M models
and two optimizers in memory).

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

from common import MODEL_SIZES, cpu_env, emit, goal_line, interleave, tiny_spec, write_tiny_models  # noqa: E402

GOAL = 1.5  # ours / the best TRL loop (TRL with its gc calls disabled)
ALL_SIDES = ("ours", "ours-generate", "trl", "trl-nogc", "naive")
DEFAULT_SIDES = {"tiny": ALL_SIDES, "opt-125m": ("ours", "trl-nogc")}
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
    return ppo_updates(trainer, [batch], micro, epochs, clock)


def ppo_updates(
    trainer: Any, batches: list[dict[str, Any]], micro: int, epochs: int, clock: PhaseClock | None = None
) -> int:
    """What the ppo stage does for one rollout of ``batches`` (kuberlhf.rlhf.rollout.rollouts: decoded together,
    then one PPO update per batch); returns the generated tokens."""
    from kuberlhf.rlhf.rollout import rollouts
    from kuberlhf.stages.ppo import split_micro

    gen_exp, train = trainer.generate_experience, trainer.train_rlhf
    if clock is not None:
        gen_exp, train = clock.wrap("generate_experience", gen_exp), clock.wrap("train (actor+critic)", train)
    tokens = 0
    for exp, _seconds in rollouts(gen_exp, batches, len(batches), trainer.pad_id):
        exp.update(trainer.advantages(exp))
        for _ in range(epochs):
            for mb in split_micro(exp, micro):
                train(mb)
        tokens += int(exp["action_mask"].sum())
    return tokens


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
    model: str = "tiny",
    wanted: tuple[str, ...] = ALL_SIDES,
    rollout: int | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    import torch
    from naive_ppo import NaivePPO

    from kuberlhf.models import load_tokenizer

    sizes = {"generationBatchSize": batch, "perDeviceBatchSize": batch} if batch else {}
    spec = tiny_spec({"ppo": {"maxAnswerLen": answer_len, **sizes}})
    st = spec.stages.ppo
    gen_bs = st.generation_batch_size
    micro = min(st.per_device_batch_size or gen_bs, gen_bs)
    tok = load_tokenizer(str(actor_dir), padding_side="left")
    batches = prompt_batches(spec, tok, gen_bs, tmp / "tok-cache")
    per_rollout = 1
    if rollout:
        if rollout % gen_bs:
            raise SystemExit(f"--rollout {rollout}: a multiple of generationBatchSize ({gen_bs})")
        per_rollout = rollout // gen_bs
    ours = build_ours(spec, actor_dir, critic_dir, tok)
    assert ours.decoder is not None
    clock = PhaseClock()
    ours.generate = clock.wrap("generate", ours.generate)
    it: dict[str, int] = {}
    tokens: dict[str, int] = {}
    samples: dict[str, int] = {}

    def next_batches(side: str, n: int = 1) -> list[dict[str, Any]]:
        i = it.get(side, 0)
        it[side] = i + n
        return [batches[(i + k) % len(batches)] for k in range(n)]

    def kuberlhf_side(name: str, trainer: Any, phase_clock: PhaseClock | None = None, n: int = 1):
        def run() -> None:
            group = next_batches(name, n)
            tokens[name] = tokens.get(name, 0) + ppo_updates(trainer, group, micro, st.ppo_epochs, phase_clock)
            samples[name] = samples.get(name, 0) + sum(len(b["prompt_input_ids"]) for b in group)

        return run

    sides = {"ours": kuberlhf_side("ours", ours, clock)}
    if "ours-generate" in wanted:
        ours_gen = build_ours(spec, actor_dir, critic_dir, tok, decoder="generate")
        assert ours_gen.decoder is None
        sides["ours-generate"] = kuberlhf_side("ours-generate", ours_gen)
    if per_rollout > 1:
        ours_r = build_ours(spec, actor_dir, critic_dir, tok)
        sides[f"ours-rollout{rollout}"] = kuberlhf_side(f"ours-rollout{rollout}", ours_r, n=per_rollout)
    compile_s = None
    if compile_side:
        t0 = time.perf_counter()
        ours_c = build_ours(spec, actor_dir, critic_dir, tok, compile_decoder=True)
        ppo_update(ours_c, batches[0], micro, st.ppo_epochs)  # the compile happens here, timed
        compile_s = time.perf_counter() - t0
        sides["ours-compiled"] = kuberlhf_side("ours-compiled", ours_c)
    peers: dict[str, TRLPeer] = {}
    trl_sides = [(name, name == "trl-nogc") for name in ("trl", "trl-nogc") if name in wanted]
    if trl_python is not None and trl_sides:
        updates = rounds + 1  # + the warm-up round
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
        for name, no_gc in trl_sides:
            peers[name] = TRLPeer(
                trl_python, {**cfg, "output_dir": str(tmp / name / "out")}, tmp / name / str(answer_len), no_gc
            )
            sides[name] = peers[name].step

    if "naive" in wanted:
        naive = NaivePPO(
            str(actor_dir),
            str(critic_dir),
            tok,
            ours.s,
            actor_lr=st.actor_learning_rate,
            critic_lr=st.critic_learning_rate,
        )

        def naive_side() -> None:
            (batch,) = next_batches("naive")
            tokens["naive"] = tokens.get("naive", 0) + int(naive.step(batch)["action_mask"].sum())
            samples["naive"] = samples.get("naive", 0) + len(batch["prompt_input_ids"])

        sides["naive"] = naive_side
    torch.manual_seed(0)
    load_before = load()
    try:
        interleave(sides, rounds=1, warmup=0)  # warm-up round, untimed
        clock.reset()
        tokens.clear()
        samples.clear()
        t = interleave(sides, rounds=rounds, warmup=0)
    finally:
        for peer in peers.values():
            peer.close()
    res: dict[str, Any] = {
        "model": model,
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
        res["samples_per_s"][side] = samples.get(side, gen_bs * rounds) / total
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
    """ms per optimizer step of the actor, interleaved: our engine's step (clipping + fused AdamW + zero_grad + LR
    schedule), DeepSpeed's own per-tensor clipping (what the engine ran before), and a plain torch loop's step on a
    copy of the same parameters in the same parameter groups (weight decay / none) with the same schedule: foreach
    clipping + fused AdamW + scheduler step + zero_grad (the baseline); also torch with one group and no schedule
    (the previous baseline, which left out work every training loop does)."""
    import torch
    from deepspeed.runtime.utils import clip_grad_norm_ as ds_clip

    from kuberlhf.training.loop import make_scheduler

    engine = trainer.actor
    params = [p for p in engine.module.parameters() if p.requires_grad]
    twin_of = {id(p): torch.nn.Parameter(p.detach().clone()) for p in params}
    twin = list(twin_of.values())
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [twin_of[id(p)] for p in g["params"]]}
        for g in engine.optimizer.param_groups
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=True)
    o = trainer.rlhf.options
    sched = make_scheduler(opt, o.lr_scheduler, o.warmup_steps, trainer.rlhf.num_total_iters)
    twin1 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt1 = torch.optim.AdamW(twin1, lr=1e-6, betas=(0.9, 0.95), fused=True)
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
        sched.step()
        opt.zero_grad(set_to_none=True)

    def torch_one_group() -> None:
        torch.nn.utils.clip_grad_norm_(twin1, 1.0, foreach=True)
        opt1.step()
        opt1.zero_grad(set_to_none=True)

    out = {
        "ours_engine_step": 0.0,
        "deepspeed_clip_only": 0.0,
        "torch_foreach_clip_fused_adamw": 0.0,
        "torch_one_group_no_schedule": 0.0,
        "tensors": len(params),
        "groups": len(groups),
    }
    for _ in range(reps):
        for name, fn, ps in (
            ("ours_engine_step", ours, params),
            ("deepspeed_clip_only", ds_clipping, params),
            ("torch_foreach_clip_fused_adamw", torch_side, twin),
            ("torch_one_group_no_schedule", torch_one_group, twin1),
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
        f"\n== step-3 PPO, {res['model']} OPT, {res['batch']} prompts per update (micro-batch {res['micro_batch']}), prompt "
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
        if side.startswith("ours-rollout"):
            note = f"kuberlhf, rolloutBatchSize {side[12:]} (decoded together, then one update per {res['batch']})"
        print(f"  {side:14s} {v:8.2f} samples/s   {note}")
    r = res["ratios"]
    if "ours/trl-nogc" in r:
        print("  " + goal_line("samples/s ours / best peer (TRL, gc off)", r["ours/trl-nogc"], GOAL))
    if "ours/trl" in r:
        print(f"  samples/s ours / TRL as shipped: {r['ours/trl']:.2f}x")
    for key, what in (("ours/ours-generate", "ours with generate"), ("ours/naive", "naive (reference)")):
        if key in r:
            print(f"  samples/s ours / {what}: {r[key]:.2f}x")
    for key in r:
        if key.startswith("ours/ours-rollout"):
            print(
                f"  samples/s {key[5:]} / ours (rolloutBatchSize = generationBatchSize): {1 / r[key]:.2f}x, at equal "
                "samples per PPO update"
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
        f"  actor optimizer step ({o['tensors']} tensors, {o['groups']} groups), ms: ours (engine.step) "
        f"{o['ours_engine_step']:.3f}, torch foreach clip + fused AdamW + LR schedule + zero_grad, same groups "
        f"{o['torch_foreach_clip_fused_adamw']:.3f} "
        f"(ratio {o['ours_engine_step'] / o['torch_foreach_clip_fused_adamw']:.2f}x, goal 1.0x); torch with one "
        f"group and no schedule {o['torch_one_group_no_schedule']:.3f}; DeepSpeed's clipping alone "
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
    p.add_argument("--model", choices=MODEL_SIZES, default="tiny", help="actor and critic size (random weights)")
    p.add_argument("--sides", nargs="+", choices=ALL_SIDES, default=None, help="sides to run (ours always runs)")
    p.add_argument(
        "--rollout", type=int, default=None, help="also run ours with this rolloutBatchSize (a multiple of --batch)"
    )
    p.add_argument(
        "--batch", type=int, default=None, help="prompts per PPO update = micro-batch (default: the example's 8)"
    )
    args = p.parse_args(argv)
    wanted = tuple(args.sides or DEFAULT_SIDES[args.model])
    uses_trl = any(side.startswith("trl") for side in wanted)
    trl_python = None if args.no_trl or not uses_trl else ensure_trl_venv()
    cpu_env()
    from kuberlhf.training.distributed import init_distributed

    init_distributed("cpu")
    with tempfile.TemporaryDirectory(prefix="kuberlhf-bench-ppo-") as d:
        tmp = Path(d)
        actor_dir, critic_dir = write_tiny_models(tmp, size=args.model)
        for answer_len in args.answer_len:
            res = run_config(
                answer_len,
                args.rounds,
                args.profile,
                tmp,
                actor_dir,
                critic_dir,
                trl_python,
                args.compile,
                model=args.model,
                wanted=wanted,
                rollout=args.rollout,
                batch=args.batch,
            )
            report(res)
            emit({"bench": "ppo", **{k: v for k, v in res.items() if k != "profile_top_ops"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
