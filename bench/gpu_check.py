"""The GPU check (issue 11): every case of :data:`CASES` in its own process with a hard time limit, one JSON of
every result, error and timing in OUT_DIR (rewritten after every case and every measured phase, so a killed run
still leaves what it had), and a short summary on stdout. Run through ``hack/gpu-check.sh``, which installs
what the GPU machine lacks first.

    python bench/gpu_check.py --out OUT_DIR [--cpu] [--cases a,b] [--selftest] [--budget-s 450] [--list]

A case is a :class:`Case`: a name, a body ``run(ctx, **params)`` that returns a dict of results (raising on a
failed check), the params, a time limit and whether it needs CUDA. To add one, write the body (or reuse
``gpu_check_stages.run_stage_case``) and add a line to :data:`CASES`; bench/README.md says more.

Files in OUT_DIR (the device tool brings back at most 8): ``gpu-check.json``, ``gpu-check.log`` (every case's
output, capped per case), ``gpu-check-summary.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu_decode_case  # noqa: E402
from gpu_check_stages import run_stage_case  # noqa: E402

SCHEMA = "kuberlhf-gpu-check-v1"
JSON_NAME, LOG_NAME, SUMMARY_NAME = "gpu-check.json", "gpu-check.log", "gpu-check-summary.txt"
LOG_CAP_PER_CASE = 1 << 20  # bytes of each case's output copied into gpu-check.log (head + tail)
# a case that reported its result gets this long to exit
EXIT_GRACE_S = float(os.environ.get("GPU_CHECK_EXIT_GRACE_S", "20"))
# how often a running case's partial results are copied into the report
PROGRESS_EVERY_S = float(os.environ.get("GPU_CHECK_PROGRESS_S", "5"))
DEFAULT_BUDGET_S = 450  # the whole run, install included (hack/gpu-check.sh passes what is left)
CPU_LIMIT_FACTOR = 4  # --cpu: the case limits are sized for a GPU, a shared 2-core box is far slower


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[..., dict[str, Any]]  # run(ctx, **params) in the case's own process
    about: str
    params: dict[str, Any] = field(default_factory=dict)
    budget_s: float = 120.0  # hard wall-clock limit of the case's process
    cuda_only: bool = False  # recorded as skipped by --cpu
    selftest: bool = False  # only run when named or with --selftest


def stage(
    name: str, stage_name: str, about: str, budget_s: float = 100.0, cuda_only: bool = False, **params: Any
) -> Case:
    return Case(name, functools.partial(run_stage_case, stage=stage_name), about, params, budget_s, cuda_only)


def _selftest_raise(ctx: CaseContext) -> dict[str, Any]:
    ctx.record(phases={"before_failure": {"calls": 1}})
    raise RuntimeError("deliberate failure (selftest): the run must record this traceback and go on")


def _selftest_hang(ctx: CaseContext) -> dict[str, Any]:
    ctx.record(phases={"before_hang": {"calls": 1}})
    time.sleep(3600)
    return {}


def _collectives(ctx: CaseContext) -> dict[str, Any]:
    """kuberlhf's collective helpers on the stage's process group (NCCL on CUDA): a tensor on the device
    :func:`collective_device` names must reduce, the object collectives must round-trip."""
    import torch
    import torch.distributed as dist

    from kuberlhf.training import distributed as D

    info = D.init_distributed("cpu" if ctx.cpu else "cuda")
    try:
        backend = str(dist.get_backend())
        t = torch.tensor([2.0], dtype=torch.float64, device=D.collective_device(backend))
        dist.all_reduce(t)
        gathered = D.all_gather_object({"rank": info.rank})
        D.barrier()
        out = {"backend": backend, "device": str(t.device), "all_reduce": float(t.item()), "gathered": gathered}
    finally:
        D.destroy()
    if out["all_reduce"] != 2.0 or gathered != [{"rank": 0}]:
        raise AssertionError(f"collectives gave {out}")
    return out


def _selftest_exit_hang(ctx: CaseContext) -> dict[str, Any]:
    import atexit

    atexit.register(time.sleep, 3600)  # a teardown that never ends, after the result is written
    return {"reported": True}


# Order matters: the overall budget cuts the tail, so the cases the issue asks for come first; the hybrid-engine
# cases come after the others because they wait for DeepSpeed's inference kernels, JIT-built in the background
# meanwhile. Expected on one H200 (not yet measured): install ~1 min, each case 20-60 s.
CASES: tuple[Case, ...] = (
    Case(
        "collectives",
        _collectives,
        "the process group of a stage (NCCL on CUDA) and kuberlhf's collective helpers",
        budget_s=60,
    ),
    stage(
        "sft-z2-bf16",
        "sft",
        "step 1, OPT-125m, ZeRO-2, bf16, a mid-run checkpoint",
        zero=2,
        dtype="bf16",
        checkpoint_every=3,
    ),
    stage(
        "reward-z2-bf16", "reward", "step 2, OPT-350m backbone, ZeRO-2, bf16", zero=2, dtype="bf16", actor="opt-350m"
    ),
    stage(
        "ppo-z2-bf16",
        "ppo",
        "step 3, OPT-125m actor + OPT-350m critic, ZeRO-2, bf16, EMA + ptx, hybrid off",
        zero=2,
        dtype="bf16",
        hybrid=False,
    ),
    stage(
        "sft-z3-fp16-lora",
        "sft",
        "step 1, OPT-125m, ZeRO-3, fp16 loss scaling, LoRA 8 merged at export",
        zero=3,
        dtype="fp16",
        lora=8,
    ),
    stage(
        "reward-z3-fp16", "reward", "step 2, OPT-350m backbone, ZeRO-3, fp16", zero=3, dtype="fp16", actor="opt-350m"
    ),
    stage(
        "ppo-z3-fp16",
        "ppo",
        "step 3, ZeRO-3 actor/critic/ref/reward/EMA, fp16, EMA + ptx, hybrid off",
        zero=3,
        dtype="fp16",
        hybrid=False,
    ),
    stage(
        "ppo-z2-bf16-hybrid",
        "ppo",
        "step 3, ZeRO-2, bf16, hybrid engine on",
        budget_s=200,
        cuda_only=True,
        zero=2,
        dtype="bf16",
        hybrid=True,
    ),
    stage(
        "ppo-z3-fp16-hybrid-lora",
        "ppo",
        "step 3, ZeRO-3, fp16, hybrid engine on, actor LoRA 8 at a high rate (its weights move in 4 steps)",
        budget_s=150,
        cuda_only=True,
        zero=3,
        dtype="fp16",
        hybrid=True,
        lora=8,
        lora_lr=1e-2,
    ),
    Case(
        "decode-opt1.3b",
        gpu_decode_case.run,
        "step-3 rollout generation, OPT-1.3B-sized: kuberlhf.rlhf.decode eager and compiled (CUDA graphs) vs "
        "generate, fp32 equivalence then bf16 tokens/s",
        budget_s=150,
    ),
    stage(
        "sft-z0-bf16-lora128-gc",
        "sft",
        "step 1 as the single_gpu recipe runs it: ZeRO-0, bf16, LoRA 128, gradient checkpointing",
        zero=0,
        dtype="bf16",
        lora=128,
        gradient_checkpointing=True,
    ),
    Case(
        "selftest-export-mismatch",
        functools.partial(run_stage_case, stage="sft"),
        "step 1 with its exported weights scaled by 1.5 before the reload: the comparison must fail",
        {"zero": 2, "dtype": "bf16", "corrupt_export": True},
        selftest=True,
    ),
    Case(
        "selftest-raise", _selftest_raise, "a case that raises: recorded with its traceback", selftest=True, budget_s=30
    ),
    Case(
        "selftest-exit-hang",
        _selftest_exit_hang,
        "a case that reports, then hangs in teardown: ok, killed after the grace period, noted",
        selftest=True,
        budget_s=60,
    ),
    Case("selftest-hang", _selftest_hang, "a case that hangs: killed at its time limit", selftest=True, budget_s=3),
)


def case_by_name(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise SystemExit(f"unknown case {name!r}; known: {', '.join(c.name for c in CASES)}")


def select(names: str | None, selftest: bool) -> list[Case]:
    if names:
        return [case_by_name(n.strip()) for n in names.split(",") if n.strip()]
    return [c for c in CASES if selftest or not c.selftest]


# --- the case's process ---------------------------------------------------------------------------------------
class CaseContext:
    """What a case body gets: its scratch dir, the run's shared dir (fixtures), the mode, and ``record`` to
    save partial results as it goes (the parent reads them even if the process is killed)."""

    def __init__(self, name: str, cpu: bool, work: Path, shared: Path, result_file: Path):
        self.name, self.cpu, self.work, self.shared, self.result_file = name, cpu, work, shared, result_file
        self.partial: dict[str, Any] = {}

    def record(self, **values: Any) -> None:
        self.partial.update(values)
        write_json(self.result_file, {"status": "running", **self.partial})


def json_default(o: Any) -> Any:
    with contextlib.suppress(Exception):
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist() if o.numel() <= 16 else f"<tensor {tuple(o.shape)}>"
    return str(o)


def finite(o: Any) -> Any:
    """NaN and infinities as strings: strict JSON has neither, and an fp16 overflow must still be readable."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic rewrite: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite(data), indent=1, default=json_default, allow_nan=False) + "\n")
    os.replace(tmp, path)


def die_with_parent(poll_s: float = 1.0) -> None:
    """A case runs in its own session so a time-out can kill its whole group; that also hides it from a kill
    of the run itself (the device tool's time limit, a test killing the run). So the case watches its parent
    and takes its group down when the parent is gone, instead of holding the GPU as an orphan."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def child_main(args: argparse.Namespace) -> int:
    die_with_parent()
    case = case_by_name(args.child)
    result_file = Path(args.result)
    ctx = CaseContext(case.name, args.cpu, Path(args.case_work), Path(args.shared), result_file)
    ctx.record()
    try:
        out = case.run(ctx, **case.params)
    except BaseException as e:  # noqa: BLE001 - every failure is a result
        traceback.print_exc()  # into the run log too
        write_json(
            result_file,
            {
                **ctx.partial,
                "status": "failed",
                "error": f"{type(e).__name__}: {e}"[:2000],
                "traceback": traceback.format_exc()[-12000:],
            },
        )
        return 1
    write_json(result_file, {**ctx.partial, **(out or {}), "status": "ok"})
    return 0


# --- the parent --------------------------------------------------------------------------------------------
def child_env(cpu: bool, shared: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "LOCAL_WORLD_SIZE",
            "MASTER_PORT",
            "MASTER_ADDR",
            "KUBERLHF_PIPELINE",
            "KUBERLHF_LOCAL_OUTPUT",
        )
    }
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        PYTHONWARNINGS="ignore",
        KUBERLHF_CACHE=str(shared / "cache"),
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(shared / "torch_extensions"))
    if cpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    else:
        env.setdefault("DS_ACCELERATOR", "cuda")
    return env


def copy_log(src: Path, log: Path, title: str) -> str:
    """Append ``src`` to the run log (head and tail when long); return its last 3000 characters."""
    data = src.read_bytes() if src.exists() else b""
    if len(data) > LOG_CAP_PER_CASE:
        half = LOG_CAP_PER_CASE // 4
        data = data[:half] + b"\n[... cut ...]\n" + data[-(LOG_CAP_PER_CASE - half) :]
    with log.open("ab") as f:
        f.write(f"\n===== {title} =====\n".encode() + data)
    return data[-3000:].decode(errors="replace")


def read_result(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wait_case(
    proc: subprocess.Popen,
    result_file: Path,
    timeout: float,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[int, str]:
    """Wait for a case's process: until it exits ("exit"), its time limit ("limit"), or EXIT_GRACE_S after it
    reported a final result without exiting ("grace"); the last two kill its process group. Every
    PROGRESS_EVERY_S ``on_progress`` gets what the case recorded so far (the report in OUT_DIR then holds it
    even if this whole run is killed)."""
    deadline = time.monotonic() + timeout
    reported_at = None
    next_progress = time.monotonic() + PROGRESS_EVERY_S
    while True:
        try:
            return proc.wait(timeout=0.5), "exit"
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        partial = read_result(result_file)
        if reported_at is None and partial.get("status") in ("ok", "failed"):
            reported_at = now
        if on_progress is not None and now >= next_progress and partial:
            on_progress(partial)
            next_progress = now + PROGRESS_EVERY_S
        ending = "limit" if now >= deadline else ("grace" if reported_at and now - reported_at > EXIT_GRACE_S else "")
        if ending:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(), ending


def run_case(
    case: Case,
    args: argparse.Namespace,
    shared: Path,
    log: Path,
    timeout: float,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    work = shared / "cases" / case.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result_file, case_log = work / "result.json", work / "output.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        case.name,
        "--result",
        str(result_file),
        "--case-work",
        str(work),
        "--shared",
        str(shared),
    ] + (["--cpu"] if args.cpu else [])
    t0 = time.monotonic()
    with case_log.open("wb") as out:
        # own session: a time-out kills the case and anything it started
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(args.cpu, shared), start_new_session=True
        )
        rc, ending = wait_case(proc, result_file, timeout, on_progress)
    wall = time.monotonic() - t0
    res = read_result(result_file)
    tail = copy_log(case_log, log, f"{case.name} (rc {rc}, {wall:.1f} s)")
    final = res.get("status") in ("ok", "failed")
    if ending == "limit" and not final:
        res.update(status="timeout", error=f"killed at its time limit of {timeout:.0f} s")
    elif ending != "exit":  # it reported, then did not exit (a teardown hang a stage pod would have too)
        res["exit"] = f"did not exit within {EXIT_GRACE_S:.0f} s of reporting its result: killed"
    elif final and rc != (0 if res["status"] == "ok" else 1):
        res["exit"] = f"exited with {rc} after reporting its result"  # e.g. a crash in interpreter teardown
    elif not final:
        res.update(status="crashed", error=f"the case's process exited with {rc} before reporting a result")
    res.update(rc=rc, wall_s=round(wall, 2), timeout_s=round(timeout, 1))
    if res["status"] != "ok":
        res["log_tail"] = tail
    return res


def environment(cpu: bool) -> dict[str, Any]:
    """Versions and the GPU, read without importing torch in the parent (a CUDA context here would hold
    memory the cases need, and a broken CUDA install must not stop the run)."""
    import importlib.metadata as md
    import platform

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_mode": cpu,
        "cpus": os.cpu_count(),
        "executable": sys.executable,
    }
    pkgs = {}
    for name in (
        "torch",
        "deepspeed",
        "transformers",
        "peft",
        "accelerate",
        "safetensors",
        "tokenizers",
        "datasets",
        "pyarrow",
        "pydantic",
        "numpy",
        "fsspec",
        "huggingface-hub",
        "kuberlhf",
    ):
        try:
            pkgs[name] = md.version(name)
        except md.PackageNotFoundError:
            pkgs[name] = None
    env["packages"] = pkgs
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["gpus"] = [line.strip() for line in q.stdout.splitlines() if line.strip()]
    if shutil.which("nvcc"):
        with contextlib.suppress(Exception):
            env["nvcc"] = (
                subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
                .stdout.strip()
                .splitlines()[-1]
            )
    return env


def start_prebuild(shared: Path, log_dir: Path) -> subprocess.Popen | None:
    """JIT-build DeepSpeed's inference op (what the hybrid engine loads) in the background while the other
    cases run: torch's extension loader makes a later loader wait for this build instead of starting its own."""
    code = (
        "import time; t=time.time(); from deepspeed.ops.op_builder import InferenceBuilder; "
        "InferenceBuilder().load(); print(f'PREBUILD_OK {time.time()-t:.1f}', flush=True)"
    )
    env = child_env(False, shared)
    env.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 2) // 2)))
    out = (log_dir / "prebuild.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def prebuild_result(proc: subprocess.Popen | None, log_dir: Path, log: Path) -> dict[str, Any] | None:
    if proc is None:
        return None
    rc = proc.poll()
    if rc is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    tail = copy_log(log_dir / "prebuild.log", log, "prebuild of DeepSpeed's inference op")
    ok = rc == 0 and "PREBUILD_OK" in tail
    res: dict[str, Any] = {"status": "ok" if ok else ("unfinished" if rc is None else "failed"), "rc": rc}
    if ok:
        res["build_s"] = float(tail.rsplit("PREBUILD_OK", 1)[1].split()[0])
    else:
        res["log_tail"] = tail
    return res


def figures(r: dict[str, Any]) -> str:
    bits = []
    for key, fmt in (
        ("tokens_per_s", "{:.0f} tok/s"),
        ("train_phase_samples_per_s", "{:.1f} samples/s"),
        ("samples_per_s", "{:.2f} samples/s"),
        ("gen_tokens_per_s", "{:.0f} gen tok/s"),
        ("peak_gib", "peak {:.1f} GiB"),
    ):
        if isinstance(r.get(key), (int, float)):
            bits.append(fmt.format(r[key]))
    plan = r.get("planner") or {}
    if isinstance(plan.get("estimate_over_measured"), (int, float)):
        bits.append(f"planner {plan['estimate_gib']:.1f} GiB = {plan['estimate_over_measured']:.2f}x peak")
    gaps = (r.get("facts") or {}).get("generation_logprobs_vs_forward") or []
    if gaps:
        bits.append(f"gen/forward logprob gap {gaps[-1]['mean_abs']:.2g}")
    actor = (r.get("facts") or {}).get("actor") or {}
    if "hybrid_inference_containers" in actor:
        bits.append(f"hybrid kernels on {actor['hybrid_inference_containers']} layers")
    if r.get("exit"):
        bits.append(f"[{r['exit']}]")
    exports = r.get("exports") or []
    if exports:
        bits.append("exports " + ",".join(f"{e['dir']}:{'ok' if e.get('match') else 'MISMATCH'}" for e in exports))
    return "  ".join(bits)


def summary_text(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"GPU check ({'CPU dry run' if env['cpu_mode'] else ', '.join(env.get('gpus') or ['no GPU seen'])}); "
        f"python {env['python']}, torch {env['packages'].get('torch')}, deepspeed "
        f"{env['packages'].get('deepspeed')}, transformers {env['packages'].get('transformers')}"
    ]
    for name, r in report["cases"].items():
        status = r.get("status", "?")
        detail = figures(r) if status == "ok" else (r.get("error") or r.get("reason") or "").splitlines()[0][:160]
        lines.append(f"  {status.upper():8} {name:26} {r.get('wall_s', 0):6.1f} s  {detail}")
    pb = report.get("prebuild")
    if pb:
        lines.append(
            f"  prebuild of the inference op: {pb['status']}"
            + (f" in {pb['build_s']:.0f} s" if "build_s" in pb else "")
        )
    counts: dict[str, int] = {}
    for r in report["cases"].values():
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    lines.append(f"  total {report['wall_s']:.0f} s: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / LOG_NAME
    shared = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kuberlhf-gpu-check-"))
    shared.mkdir(parents=True, exist_ok=True)
    cases = select(args.cases, args.selftest)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": args.budget_s,
        "environment": environment(args.cpu),
        "cases": {},
        "wall_s": 0.0,
    }
    if args.install_info and Path(args.install_info).exists():
        report["install"] = json.loads(Path(args.install_info).read_text())
    for c in cases:
        report["cases"][c.name] = {"status": "pending", "about": c.about, "params": c.params}
    write_json(out / JSON_NAME, report)
    needs_op = not args.cpu and any(c.params.get("hybrid") for c in cases)
    prebuild = start_prebuild(shared, shared) if needs_op else None
    try:
        for c in cases:
            entry = report["cases"][c.name]
            left = deadline - time.monotonic()
            limit = c.budget_s * (CPU_LIMIT_FACTOR if args.cpu and not c.selftest else 1)
            if args.cpu and c.cuda_only:
                entry.update(status="skipped", reason="needs CUDA (--cpu)")
            elif left < min(limit, 20):
                entry.update(status="not-run", reason=f"the run's budget of {args.budget_s:.0f} s is spent")
            else:
                entry.update(status="running")
                write_json(out / JSON_NAME, report)
                print(f"-- {c.name}: {c.about} (limit {min(limit, left):.0f} s)", flush=True)

                def progress(partial: dict[str, Any], entry: dict[str, Any] = entry) -> None:
                    entry.update({**partial, "status": "running"})
                    write_json(out / JSON_NAME, report)

                entry.update(run_case(c, args, shared, log, min(limit, left), progress))
                print(
                    f"   {entry['status']} in {entry['wall_s']:.1f} s  "
                    f"{figures(entry) if entry['status'] == 'ok' else entry.get('error', '')[:200]}",
                    flush=True,
                )
            report["wall_s"] = time.monotonic() - t_start
            write_json(out / JSON_NAME, report)
    finally:
        report["prebuild"] = prebuild_result(prebuild, shared, log)
        report["wall_s"] = time.monotonic() - t_start
        write_json(out / JSON_NAME, report)
        text = summary_text(report)
        (out / SUMMARY_NAME).write_text(text + "\n")
        print("\n" + text, flush=True)
        if not args.workdir and not args.keep_workdir:
            shutil.rmtree(shared, ignore_errors=True)
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["cases"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="kuberlhf's GPU check: stages on CUDA, one JSON of every result")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="OUT_DIR for the JSON, log, summary")
    p.add_argument("--cpu", action="store_true", help="dry run on CPU: DS_ACCELERATOR=cpu, tiny sizes, fp16 -> fp32")
    p.add_argument("--cases", help="comma-separated case names (default: every non-selftest case)")
    p.add_argument("--selftest", action="store_true", help="also run the deliberately failing cases")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall clock for all cases")
    p.add_argument("--workdir", help="scratch for models, stores and caches (default: a temp dir, removed)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--install-info", help="JSON written by hack/gpu-check.sh's install step (added to the report)")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--case-work", help=argparse.SUPPRESS)
    p.add_argument("--shared", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.list:
        for c in CASES:
            flags = ", ".join(f for f, on in (("CUDA only", c.cuda_only), ("selftest", c.selftest)) if on)
            print(f"{c.name:26} {c.budget_s:5.0f} s  {c.about}" + (f"  [{flags}]" if flags else ""))
        return 0
    return child_main(args) if args.child else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
