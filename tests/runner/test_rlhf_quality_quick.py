"""The quality suite reduced to one task and fewer steps (``bench/rlhf_quality.py --tasks style --quick``: SFT 4
epochs, the reward model started from SFT (``stages.reward.initFromSft``, as in the full suite) for 15 steps, PPO
60 steps, each stage on one rank with the example's global batch; 128 fresh prompts): the real ``kuberlhf run`` on
data whose true reward the pipeline never sees. Asserts the direction of every goal of the full suite
(bench/RESULTS.md has the full numbers): the reward model ranks fresh pairs right (>= 0.9), PPO raises the TRUE
reward over SFT, the EMA policy is not behind the final actor, KL stays bounded, and the run records and plots the
true-reward curve. No timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_quality_suite_moves_the_true_reward(repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(
        [
            sys.executable,
            str(repo_root / "bench/rlhf_quality.py"),
            "--tasks",
            "style",
            "--quick",
            "--eval-prompts",
            "128",
            # the runner's own end-of-run evaluation (the suite skips it by default): the run must print the
            # true reward next to the reward-model score
            "--runner-samples",
            "1",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    res = json.loads((tmp_path / "results.json").read_text())["tasks"]["style"]["result"]
    assert res["rm_acc"] >= 0.9, res
    assert res["ppo"] > res["sft"] + 0.1, res
    assert res["ema"] >= res["ppo"] - 0.05, res
    assert 0 < res["kl_ppo"] < 10 and 0 < res["kl_ema"] < 10, res
    # step 3 logged the true reward of its rollouts (the curve kuberlhf run plots)
    records = [json.loads(x) for x in (tmp_path / "style/run/metrics.jsonl").read_text().splitlines() if x.strip()]
    curve = [r["true_reward"] for r in records if r.get("stage") == "ppo" and "true_reward" in r]
    assert len(curve) >= 10 and all(0 <= v <= 1 for v in curve)
    assert sum(curve[-5:]) / 5 > sum(curve[:5]) / 5, curve
    run_log = (tmp_path / "style/run.log").read_text()
    assert "mean true reward" in run_log and "eval accuracy" in run_log
