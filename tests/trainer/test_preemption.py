"""SIGTERM (preemption, node drain, eviction) makes a training stage commit a resumable checkpoint and exit
EXIT_INTERRUPTED within the grace period; the next attempt resumes at that step. Two CPU ranks under our elastic
launcher, so the signal takes the pod's path: the kubelet signals PID 1 (the launcher), which forwards it to the
workers; they agree on the step to stop at (an all-reduce per step) and commit it together."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer_stage_helpers import PipelineRun, ok, run_stage, stage_env_for, tiny_manifest

from kuberlhf.contract.stage import ENV_STOP_GRACE_SECONDS, ENV_TERMINATION_LOG, EXIT_INTERRUPTED

GRACE_S = 120  # generous for 2 loaded shared cores; a tiny step + checkpoint takes a few seconds


def _step(text: str, total: int) -> int:
    done = re.findall(rf"(\d+)/{total}\b", text)
    return int(done[-1]) if done else 0


def test_sigterm_commits_a_checkpoint_and_the_next_attempt_resumes_there(s3_server, bucket_storage, tmp_path):
    total = 20
    run = PipelineRun(
        tiny_manifest("preempted", bucket_storage, stages={"sft": {"maxSteps": total, "checkpointEverySteps": 0}}),
        s3_server,
        tmp_path,
    )
    env = stage_env_for(run.manifest, "sft", s3_server, run.uid, {ENV_STOP_GRACE_SECONDS: str(GRACE_S)})
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "kuberlhf"), "stage", "sft"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 600
        while _step(err_path.read_text(errors="replace"), total) < 3:
            assert proc.poll() is None, err_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "the stage made no progress"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rc = proc.wait(timeout=GRACE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    waited = time.monotonic() - sent
    stderr = err_path.read_text(errors="replace")
    assert rc == EXIT_INTERRUPTED, f"rc={rc}\n{stderr[-4000:]}"
    assert "SIGTERM: committing a checkpoint after this step" in stderr
    match = re.search(r"stopped by SIGTERM after committing checkpoint step (\d+)", stderr)
    assert match, stderr[-4000:]
    stopped_at = int(match.group(1))
    assert 3 <= stopped_at < total
    store = run.store()
    assert [s for s, _ in store.list_checkpoints(run.layout.ckpt_root("sft"))] == [stopped_at]
    assert not store.is_complete(run.layout.stage_uri("sft"))
    print(f"stopped at step {stopped_at}, {waited:.1f}s after SIGTERM (machine loaded)")

    report = tmp_path / "termination-log"
    resumed = ok(run_stage(run.manifest, "sft", s3_server, run.uid, extra_env={ENV_TERMINATION_LOG: str(report)}))
    assert f"resuming sft from {run.layout.ckpt_uri('sft', stopped_at)}" in resumed.stdout
    assert store.is_complete(run.layout.stage_uri("sft"))
    # what the operator reads in workload-identity mode: the prefix and the digest of the committed manifest
    committed = store.read_manifest(run.layout.stage_uri("sft"))
    assert json.loads(report.read_text()) == {
        "kuberlhf": {"stage": "sft", "checkpoint": run.layout.stage_uri("sft"), "manifestSha256": committed.sha256}
    }
    steps = [m["step"] for m in run.metrics("sft") if m["split"] == "train"]
    assert steps == list(range(1, total + 1))  # every step once: nothing lost, nothing repeated
