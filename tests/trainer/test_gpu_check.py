"""The GPU check (hack/gpu-check.sh + bench/gpu_check.py) cannot rot: its CPU dry run runs end to end here, through
the same stage entrypoint and export checks as on a GPU (DS_ACCELERATOR=cpu, gloo, tiny sizes, fp16 -> fp32;
the hybrid-engine cases are CUDA-only and recorded as skipped), and the report is read back from its JSON."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

# failing cases first: the cases after them must still run
DRY_RUN_CASES = [
    "collectives",
    "selftest-raise",
    "selftest-hang",
    "selftest-exit-hang",
    "selftest-export-mismatch",
    "ppo-z3-fp16",
]


def test_the_case_registry_covers_the_cuda_matrix() -> None:
    from gpu_check import CASES

    real = [c for c in CASES if not c.selftest]
    assert len({c.name for c in CASES}) == len(CASES)
    stages = [(c.run.keywords["stage"], c.params) for c in real if getattr(c.run, "keywords", None)]
    for st in ("sft", "reward", "ppo"):
        assert {(p["zero"], p["dtype"]) for s, p in stages if s == st} >= {(2, "bf16"), (3, "fp16")}, st
    assert {p.get("hybrid", False) for s, p in stages if s == "ppo"} == {True, False}
    assert all(c.cuda_only for c in real if c.params.get("hybrid"))
    assert any(p.get("lora") for s, p in stages if s == "ppo" and p.get("hybrid"))


def test_every_stage_case_manifest_is_a_valid_pipeline_on_both_accelerators() -> None:
    """What the GPU run would otherwise find first: a case whose manifest the spec (or its rules) rejects."""
    from gpu_check import CASES
    from gpu_check_stages import manifest

    from kuberlhf.contract.spec import parse_pipeline
    from kuberlhf.training.ds_config import stage_settings, train_ds_config

    for c in CASES:
        stage = getattr(c.run, "keywords", {}).get("stage")
        if stage is None:
            continue
        for cuda in (True, False):
            if not cuda and c.cuda_only:
                continue
            params = {**c.params, "dtype": "fp32" if not cuda and c.params["dtype"] == "fp16" else c.params["dtype"]}
            spec = parse_pipeline(manifest("gpucheck", stage, params, "/m/a", "/m/r", "file:///s", cuda)).spec
            for role in ("actor", "critic") if stage == "ppo" else (None,):
                train_ds_config(stage_settings(spec, stage, 1, role=role))  # what preflight checks


class _Counter:
    """A peak counter with CUDA's semantics (peak since the last reset, never below what is allocated), for
    the nesting logic only; the GPU run reads the real allocator's."""

    def __init__(self) -> None:
        self.now = self.top = 0.0

    def use(self, gib: float) -> None:
        self.now = gib
        self.top = max(self.top, gib)

    def peak(self) -> float:
        return self.top

    def reset_peak(self) -> None:
        self.top = self.now

    def allocated(self) -> float:
        return self.now

    def sync(self) -> None:
        pass


def test_probes_keep_each_phase_peak_when_phases_nest() -> None:
    from gpu_check_stages import Probes

    mem = _Counter()
    changes = []
    probes = Probes(mem, lambda: changes.append(1))
    with probes.phase("outer"):
        mem.use(5.0)
        mem.use(2.0)
        with probes.phase("inner"):  # resets the counter: the outer phase must keep its 5 GiB
            mem.use(3.0)
        mem.use(1.0)
        with probes.phase("inner"):
            mem.use(4.0)
            mem.use(2.0)
    ph = probes.summary()
    assert ph["outer"]["peak_gib"] == 5.0 and ph["outer"]["calls"] == 1
    assert ph["inner"]["peak_gib"] == 4.0 and ph["inner"]["calls"] == 2 and ph["inner"]["allocated_after_gib"] == 2.0
    assert "mean_after_first_s" in ph["inner"] and len(changes) == 3


def test_a_run_killed_mid_case_leaves_the_case_partial_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_PROGRESS_S": "0.2"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--cases", "selftest-hang", "--out", str(out)]
        + ["--workdir", str(tmp_path / "work")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        case: dict = {}
        while time.monotonic() < deadline and "before_hang" not in case.get("phases", {}):
            time.sleep(0.1)
            with contextlib.suppress(OSError, ValueError, KeyError):
                case = json.loads((out / "gpu-check.json").read_text())["cases"]["selftest-hang"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run dies mid-case (the device tool's time limit)
        proc.wait()
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["cases"]["selftest-hang"]["status"] == "running"
    assert "before_hang" in report["cases"]["selftest-hang"]["phases"]

    # the case (in a session of its own) does not outlive the run as an orphan holding the GPU
    def case_alive() -> bool:
        ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        return f"--result {tmp_path / 'work'}" in ps

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and case_alive():
        time.sleep(0.2)
    assert not case_alive()


def test_cpu_dry_run_records_every_case_and_goes_on_after_failures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "hack" / "gpu-check.sh"),
            "--cpu",
            str(out),
            "--",
            "--cases",
            ",".join(DRY_RUN_CASES),
            "--workdir",
            str(tmp_path / "work"),
        ],
        env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_EXIT_GRACE_S": "2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # the selftests fail, on purpose
    report = json.loads((out / "gpu-check.json").read_text())
    cases = report["cases"]
    assert list(cases) == DRY_RUN_CASES
    assert report["schema"] == "kuberlhf-gpu-check-v1" and report["environment"]["cpu_mode"] is True
    assert report["install"]["steps"] == []  # --cpu installs nothing

    assert cases["collectives"]["status"] == "ok" and cases["collectives"]["backend"] == "gloo"
    raised = cases["selftest-raise"]
    assert raised["status"] == "failed" and "deliberate failure" in raised["error"]
    assert "Traceback" in raised["traceback"] and "_selftest_raise" in raised["traceback"]
    hang = cases["selftest-hang"]
    assert hang["status"] == "timeout" and hang["wall_s"] < 30
    assert "before_hang" in hang["phases"]  # what it recorded before it was killed survives

    exit_hang = cases["selftest-exit-hang"]
    assert exit_hang["status"] == "ok" and exit_hang["reported"] and "did not exit" in exit_hang["exit"]
    assert exit_hang["wall_s"] < 30

    bad = cases["selftest-export-mismatch"]
    assert bad["status"] == "failed" and "does not reproduce the engine" in bad["error"], bad.get("error")
    assert "CheckFailed" in bad["traceback"]
    assert {"train", "export"} <= set(bad["phases"])  # it trained and exported first
    assert [(e["dir"], e["match"]) for e in bad["exports"]] == [("model", False)]
    assert bad["exports"][0]["rel_diff"] > 10 * bad["exports"][0]["rtol"]

    ppo = cases["ppo-z3-fp16"]
    assert ppo["status"] == "ok", ppo.get("traceback") or ppo.get("log_tail")
    assert ppo["params"]["dtype"] == "fp32"  # fp16 runs only on CUDA
    assert {e["dir"] for e in ppo["exports"]} == {"model", "ema"}
    for e in ppo["exports"]:
        assert e["match"] and e["finite"] and e["rel_diff"] <= e["rtol"] and e["kind"] == "causal_lm"
        assert e["ref_max_abs"] > 0
    steps = ppo["manifest_stage"]["maxSteps"]
    phases = ppo["phases"]
    assert phases["generate_experience"]["calls"] == steps and phases["generate_experience"]["answer_tokens"] > 0
    assert phases["train_rlhf"]["calls"] == phases["train_ptx"]["calls"] >= steps
    assert phases["ema_update"]["calls"] > 1  # started at the actor, then followed it
    assert ppo["metrics"]["steps"] == steps and all(len(v) == steps for v in ppo["metrics"]["losses"].values())
    assert ppo["samples_per_s"] > 0 and ppo["gen_tokens_per_s"] > 0
    for role in ("actor", "critic", "ema"):
        assert ppo["facts"][role]["zero_stage"] == 3 and ppo["facts"][role]["backend"] == "gloo", role
    gaps = ppo["facts"]["generation_logprobs_vs_forward"]
    assert [g["call"] for g in gaps] == [1, steps]  # first and last micro-batch (one per step here)
    assert all(0 <= g["mean_abs"] <= g["max_abs"] < 1e-3 for g in gaps)  # fp32 on CPU: rounding only
    assert ppo["facts"]["actor"]["global_steps"] == 2 * steps  # one PPO + one ptx step per micro-batch
    plan = ppo["planner"]  # the planner's estimate of the case (next to the device peak on CUDA)
    assert plan["estimate_gib"] > plan["states_gib"] > 0 and plan["host_peak_rss_gib"] > 0
    assert "estimate_over_measured" not in plan  # no device peak on the CPU

    summary = (out / "gpu-check-summary.txt").read_text()
    assert "OK       ppo-z3-fp16" in summary and "TIMEOUT  selftest-hang" in summary
    assert summary.strip() in proc.stdout
    log = (out / "gpu-check.log").read_text()
    assert "===== ppo-z3-fp16" in log and "deliberate failure" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-summary.txt", "gpu-check.json", "gpu-check.log"]


def test_decode_case_dry_run_compares_the_static_decoder_with_generate(tmp_path: Path) -> None:
    """The GPU check's decode case on the tiny OPT family (``--cpu``): equivalence to generate and timings."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--cpu",
            "--cases",
            "decode-opt1.3b",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    case = json.loads((out / "gpu-check.json").read_text())["cases"]["decode-opt1.3b"]
    assert case["status"] == "ok", case
    assert case["equivalence_fp32"]["tokens_equal"] and case["equivalence_fp32"]["max_logit_diff"] <= 1e-5
    assert set(case["timings"]) == {"generate", "static"} and case["speedup_vs_generate"]["static"] > 0
