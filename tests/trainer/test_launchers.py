"""One rank, two ways in: `kuberlhf stage sft` with no launcher at all (world size 1 runs in the process), and
`kuberlhf stage sft --local_rank=0` with exactly the env the DeepSpeed launcher gives a rank. Both train the
same way. (Two ranks under the real `deepspeed` CLI: test_stages.py.)"""

from __future__ import annotations

import pytest
from trainer_stage_helpers import PipelineRun, ok, run_stage, tiny_manifest

from kuberlhf.training.distributed import dist_info, free_port

ONE_RANK = {"gpusPerNode": 1, "zeroStage": 0, "maxSteps": 8, "learningRate": 3e-3, "checkpointEverySteps": 0}


def deepspeed_launcher_env(master_port: int) -> dict[str, str]:
    """What deepspeed/launcher/launch.py sets for rank 0 of a 1-process, 1-node job."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "WORLD_SIZE": "1", "CROSS_RANK": "0",
            "CROSS_SIZE": "1", "LOCAL_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}


def test_single_process_and_deepspeed_local_rank_train_alike(s3_server, bucket_storage, tmp_path):
    manifest = tiny_manifest("one-rank", bucket_storage, stages={"sft": ONE_RANK})
    plain = PipelineRun(manifest, s3_server, tmp_path / "plain")
    plain.stage("sft")  # no RANK / LOCAL_RANK / WORLD_SIZE in the env: runs in this process
    launched = PipelineRun(manifest, s3_server, tmp_path / "launched")
    ok(run_stage(manifest, "sft", s3_server, launched.uid, extra_env=deepspeed_launcher_env(free_port()),
                 args=["--local_rank=0"]))

    runs = []
    for run in (plain, launched):
        assert run.store().is_complete(run.layout.model_uri("sft"))
        train = [m for m in run.metrics("sft") if m["split"] == "train"]
        assert [m["step"] for m in train] == list(range(1, 9))
        assert train[-1]["loss"] < train[0]["loss"] - 0.5, [m["loss"] for m in train]
        runs.append([m["loss"] for m in train])
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


def test_dist_info_from_torchrun_and_deepspeed_launcher_env():
    torchrun = {"RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "2"}
    deepspeed = {"RANK": "5", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "2", "CROSS_SIZE": "3"}
    for env in (torchrun, deepspeed):
        info = dist_info(env, rank=5, world=6)
        assert (info.local_rank, info.local_world_size, info.node_rank) == (1, 2, 2)
        assert not info.is_main and not info.is_local_main
    alone = dist_info({}, rank=0, world=1)
    assert alone.is_main and alone.is_local_main and alone.node_rank == 0 and alone.local_world_size == 1
