"""Clear errors from `kuberlhf stage` (exit code EXIT_USER_ERROR, one line naming the manifest field or dataset and
the fix), and an unavailable store told apart from them (EXIT_STORAGE_UNAVAILABLE: retried, not the user's fault).
Settings no worker could run are refused before any worker starts; the rest by the (single) worker."""

from __future__ import annotations

import json

import pytest
from trainer_stage_helpers import run_stage, tiny_manifest

from kuberlhf.contract.stage import ENV_STORAGE_RETRY_SECONDS, EXIT_STORAGE_UNAVAILABLE, EXIT_USER_ERROR
from kuberlhf.training.distributed import free_port


def single(storage_dir, stages=None, data=None, **spec):
    manifest = tiny_manifest("errors", {"uri": f"file://{storage_dir}"}, stages=stages, data=data)
    for stage in manifest["spec"]["stages"].values():
        stage["gpusPerNode"] = 1
    manifest["spec"].update(spec)
    return manifest


def failed(proc, *needles, code=EXIT_USER_ERROR):
    assert proc.returncode == code, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    last = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert last, proc.stderr[-4000:]
    for needle in needles:
        assert needle in last[-1], last[-1]
    assert "Traceback" not in proc.stderr
    return last[-1]


@pytest.mark.parametrize(("stage", "stages", "needles"), [
    ("sft", {"sft": {"dtype": "fp16"}}, ["spec.stages.sft.dtype", "fp16 needs CUDA", "bf16 or fp32"]),
    ("ppo", {"ppo": {"hybridEngine": True}}, ["spec.stages.ppo.hybridEngine", "CUDA"]),
    ("reward", {"reward": {"zeroStage": 0, "offload": True}}, ["spec.stages.reward.offload", "zeroStage"]),
    ("ppo", {"ppo": {"actorZeroStage": 0, "offload": True}}, ["spec.stages.ppo.offload", "actorZeroStage"]),
])
def test_settings_that_cannot_run_fail_before_workers_start(tmp_path, s3_server, stage, stages, needles):
    failed(run_stage(single(tmp_path, stages), stage, s3_server, "e1", timeout=120), *needles)


def test_missing_local_model_path(tmp_path, s3_server):
    manifest = single(tmp_path, actor={"model": str(tmp_path / "no-such-model")})
    failed(run_stage(manifest, "sft", s3_server, "e2", timeout=120), "spec.actor.model", "does not exist")
    manifest = single(tmp_path, reward={"model": "./models/missing-rm"})
    failed(run_stage(manifest, "reward", s3_server, "e2", timeout=120), "spec.reward.model", "does not exist")


def test_unknown_hub_model_offline(tmp_path, s3_server):
    manifest = single(tmp_path, actor={"model": "nobody/no-such-model"})
    failed(run_stage(manifest, "sft", s3_server, "e3", timeout=240), "spec.actor.model=nobody/no-such-model",
           "offline")


def test_unknown_dataset_and_missing_columns(tmp_path, s3_server):
    manifest = single(tmp_path, data={"datasets": ["nobody/no-such-dataset"]})
    failed(run_stage(manifest, "sft", s3_server, "e4", timeout=240), "nobody/no-such-dataset")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20)))
    manifest = single(tmp_path, data={"datasets": [str(bad)]})
    msg = failed(run_stage(manifest, "reward", s3_server, "e4", timeout=240), str(bad))
    assert "prompt" in msg or "chosen" in msg


def test_ppo_without_earlier_stages(tmp_path, s3_server):
    failed(run_stage(single(tmp_path), "ppo", s3_server, "e5", timeout=240), "step-1 (SFT) model is missing",
           "_COMPLETE")


def test_unreachable_store_is_retried_then_reported_as_unavailable_not_as_a_user_error(tmp_path, s3_server):
    """An S3 endpoint that refuses connections (the store restarting) is retried for the budget (one call with
    boto3's own retries takes ~12 s), then the stage exits EXIT_STORAGE_UNAVAILABLE, which the operator retries,
    instead of the user-error code it never retries."""
    manifest = tiny_manifest("outage", {"uri": "s3://kuberlhf/runs", "endpoint": f"http://127.0.0.1:{free_port()}"})
    manifest["spec"]["stages"]["sft"]["gpusPerNode"] = 1
    proc = run_stage(manifest, "sft", s3_server, "e6", extra_env={ENV_STORAGE_RETRY_SECONDS: "15"}, timeout=240)
    msg = failed(proc, "cannot reach the S3 endpoint", code=EXIT_STORAGE_UNAVAILABLE)
    assert "spec.storage.endpoint" in msg
    assert "storage unavailable, retrying in" in proc.stderr  # it waited for the store first
