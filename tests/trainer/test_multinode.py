"""A 2-node stage for real: two separate `kuberlhf stage sft` processes (NODE_RANK 0 and 1, one rank each, the
same MASTER_ADDR/MASTER_PORT), as the two pods of an Indexed Job run them. Each node has its own scratch and
tokenised-data cache (KUBERLHF_CACHE, XDG_CACHE_HOME), like separate pod disks, and the stage writes ZeRO-2
state, so every rank holds its own optimizer shard: each node uploads its own files and rank 0 commits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trainer_stage_helpers import PipelineRun, stage_env_for, tiny_manifest

from kuberlhf.stages.supervised import CRASH_EXIT_CODE, FAIL_AT_STEP_ENV

NODE_TIMEOUT_S = 300
STEPS, CKPT_EVERY = 4, 2


def run_two_nodes(run: PipelineRun, stage: str, disks: Path, extra_env: dict[str, str] | None = None
                  ) -> list[subprocess.CompletedProcess]:
    """Start node 0 and node 1 of the stage at once and wait for both."""
    from kuberlhf.training.distributed import free_port

    port = str(free_port())
    kuberlhf = str(Path(sys.executable).parent / "kuberlhf")
    procs = []
    for node in (0, 1):
        disk = disks / f"node{node}-disk"
        env = stage_env_for(run.manifest, stage, run.s3, run.uid, {
            "NODE_RANK": str(node), "MASTER_PORT": port, "KUBERLHF_CACHE": str(disk / "kuberlhf"),
            "XDG_CACHE_HOME": str(disk / "xdg"), "KUBERLHF_KEEP_WORKDIR": "1", **(extra_env or {})})
        assert env["NNODES"] == "2" and env["NPROC_PER_NODE"] == "1"
        procs.append(subprocess.Popen([kuberlhf, "stage", stage], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    out = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=NODE_TIMEOUT_S)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def logs(procs: list[subprocess.CompletedProcess]) -> str:
    return "\n".join(f"--- node {i} (rc {p.returncode}) ---\n{p.stdout[-3000:]}" for i, p in enumerate(procs))


def node_files(disks: Path, node: int) -> set[str]:
    """The files node ``node`` wrote into its own step-N checkpoint directory (relative paths)."""
    (ckpt,) = (disks / f"node{node}-disk" / "kuberlhf" / "work").glob(f"*-sft-*/node{node}/ckpt/step-{CKPT_EVERY}")
    return {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def two_nodes(s3_server, bucket_storage, tmp_path_factory) -> dict[str, Any]:
    manifest = tiny_manifest("multinode", bucket_storage, stages={"sft": {
        "nodes": 2, "gpusPerNode": 1, "zeroStage": 2, "maxSteps": STEPS, "checkpointEverySteps": CKPT_EVERY, "tensorboard": True}})
    tmp = tmp_path_factory.mktemp("multinode")
    run = PipelineRun(manifest, s3_server, tmp)
    crashed = run_two_nodes(run, "sft", tmp / "first", {FAIL_AT_STEP_ENV: str(CKPT_EVERY)})
    store = run.store()
    ckpt_uri = run.layout.ckpt_uri("sft", CKPT_EVERY)
    state = {"run": run, "crashed": crashed, "first_disks": tmp / "first",
             "stage_complete_after_crash": store.is_complete(run.layout.stage_uri("sft")),
             "ckpts_after_crash": [s for s, _ in store.list_checkpoints(run.layout.ckpt_root("sft"))],
             "ckpt_manifest": json.loads(store.get_bytes(f"{ckpt_uri}/manifest.json"))
             if store.exists(f"{ckpt_uri}/manifest.json") else None}
    state["resumed"] = run_two_nodes(run, "sft", tmp / "second")
    state["second_disks"] = tmp / "second"
    return state


def test_crash_after_a_two_node_checkpoint_commits_both_nodes_shards(two_nodes) -> None:
    crashed = two_nodes["crashed"]
    # node 0's rank hit the crash hook; node 1's rank may exit with the same code or lose its peer
    assert all(p.returncode != 0 for p in crashed), logs(crashed)
    assert f"exit codes [{CRASH_EXIT_CODE}]" in crashed[0].stdout, logs(crashed)
    assert not two_nodes["stage_complete_after_crash"]
    assert two_nodes["ckpts_after_crash"] == [CKPT_EVERY]
    listed = {f["path"] for f in two_nodes["ckpt_manifest"]["files"]}
    # every node's own files (its ZeRO-2 optimizer shard, its trainer state) are in the committed manifest
    mine = [node_files(two_nodes["first_disks"], node) for node in (0, 1)]
    assert mine[0] and mine[1] and mine[0] <= listed and mine[1] <= listed
    tag = f"model/step-{CKPT_EVERY}"
    assert f"{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt" in mine[0]
    assert f"{tag}/zero_pp_rank_1_mp_rank_00_optim_states.pt" in mine[1]
    assert "trainer_state_rank0.pt" in mine[0] and "trainer_state_rank1.pt" in mine[1]
    # node 1 wrote only its own shard: the commit merged two disks, not one node's view
    assert f"{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt" not in mine[1]
    assert two_nodes["ckpt_manifest"]["extra"]["step"] == CKPT_EVERY


def test_restarted_two_node_stage_resumes_and_commits(two_nodes) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resumed, run = two_nodes["resumed"], two_nodes["run"]
    assert all(p.returncode == 0 for p in resumed), logs(resumed)
    store = run.store()
    assert store.is_complete(run.layout.stage_uri("sft")) and store.is_complete(run.layout.model_uri("sft"))
    train = [m["step"] for m in run.metrics("sft") if m["split"] == "train"]
    assert train == list(range(1, STEPS + 1))  # steps 1-2 restored from the checkpoint, 3-4 trained after it
    # the second attempt started from the committed checkpoint, which both nodes downloaded to their own disk
    assert f"resuming sft from {run.layout.ckpt_uri('sft', CKPT_EVERY)}" in resumed[0].stdout, logs(resumed)
    assert "resuming" not in resumed[1].stdout  # said once, by rank 0
    for node in (0, 1):
        (ckpt,) = (two_nodes["second_disks"] / f"node{node}-disk" / "kuberlhf" / "work").glob(
            f"*-sft-*/node{node}/ckpt/step-{CKPT_EVERY}")
        assert (ckpt / f"model/step-{CKPT_EVERY}/zero_pp_rank_{node}_mp_rank_00_optim_states.pt").is_file()
    local = run.fetch(run.layout.model_uri("sft"), "sft-model")
    model = AutoModelForCausalLM.from_pretrained(local).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    ids = tokenizer(" Human: hello Assistant:", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_tensorboard_events_are_committed_with_the_stage_and_show_each_step_once(two_nodes, tmp_path) -> None:
    """`tensorboard: true`: rank 0's event files are part of the stage's outputs (``sft/tensorboard/``, committed
    and listed in the stage manifest); after the crash and the resume on another node's disk, the loss series
    holds every step exactly once with the values of metrics.jsonl."""
    from test_loop_helpers import tensorboard_scalars_in

    run = two_nodes["run"]
    store = run.store()
    uri = run.layout.tensorboard_uri("sft")
    assert uri == f"{run.layout.stage_uri('sft')}/tensorboard" and store.is_complete(uri)
    stage_files = {f.path for f in store.read_manifest(run.layout.stage_uri("sft")).files}
    assert any(p.startswith("tensorboard/events.out.tfevents.") for p in stage_files), stage_files
    scalars = tensorboard_scalars_in(run.fetch(uri, "tb"))
    metrics = {m["step"]: m for m in run.metrics("sft") if m["split"] == "train"}
    assert [step for step, _ in scalars["sft/train/loss"]] == list(range(1, STEPS + 1))
    for step, value in scalars["sft/train/loss"]:
        assert value == pytest.approx(metrics[step]["loss"], rel=1e-6)
    assert {"sft/train/lr", "sft/train/tokens_per_s", "sft/eval/loss", "sft/eval/perplexity"} <= set(scalars)
