"""The dpo and grpo stages for real: `kuberlhf stage` with 2 CPU ranks (DeepSpeed ZeRO-2, gloo), the tiny OPT,
the synthetic pairs and a real SeaweedFS bucket. DPO trains on step 2's pairs against its frozen reference; GRPO
scores groups of answers with a reward function read from the pipeline's bucket (no reward stage), keeps an
EMA and mixes in ptx. Both commit model/ (grpo: ema/ too) with _COMPLETE and their metrics.

The step-1 model they start from is the tiny OPT committed under ``sft/model/`` by the test (as the sft stage
commits it), not trained: the sft stage has its own tests, and running it here cost half of each test's time."""

from __future__ import annotations

import pytest
import torch
from trainer_stage_helpers import PipelineRun, tiny_manifest

REWARDS = b"""
def score(prompt, answer):
    # a verifiable-task stand-in: longer answers score more (so a group's answers rarely tie)
    return min(1.0, len(answer) / 40)
"""


def algorithm_run(name, algorithm, bucket_storage, s3_server, tmp_path_factory, stage, tiny_model_dir):
    manifest = tiny_manifest(name, bucket_storage)
    spec = manifest["spec"]
    spec["algorithm"] = algorithm
    spec["stages"] = {"sft": spec["stages"]["sft"], algorithm: stage}
    spec.pop("reward")
    run = PipelineRun(manifest, s3_server, tmp_path_factory.mktemp(name))
    run.store().upload_dir(str(tiny_model_dir), run.layout.model_uri("sft"), producer="kuberlhf-stage-sft")
    return run


@pytest.fixture(scope="module")
def dpo(s3_server, bucket_storage, tmp_path_factory, tiny_model_dir) -> PipelineRun:
    stage = {"nodes": 1, "gpusPerNode": 2, "dtype": "fp32", "perDeviceBatchSize": 4, "zeroStage": 2,
             "learningRate": 1e-3, "maxSteps": 3, "beta": 0.5, "labelSmoothing": 0.1, "rpoAlpha": 0.5}
    return algorithm_run("dpo", "dpo", bucket_storage, s3_server, tmp_path_factory, stage, tiny_model_dir)


def test_dpo_stage_trains_on_pairs_and_commits_its_model(dpo):
    from transformers import AutoModelForCausalLM

    dpo.stage("dpo")
    store = dpo.store()
    assert store.is_complete(dpo.layout.stage_uri("dpo")) and store.is_complete(dpo.layout.model_uri("dpo"))
    metrics = dpo.metrics("dpo")
    train = [m for m in metrics if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    for key in ("loss", "chosen_reward", "rejected_reward", "reward_accuracy", "margin", "lr"):
        assert all(m.get(key) is not None for m in train), key
    assert any(m["split"] == "eval" and "reward_accuracy" in m and "chosen_nll" in m for m in metrics)
    # the first step starts at the reference: DPO's loss is ln 2 whatever the smoothing, plus rpoAlpha x the NLL
    assert abs(train[0]["loss"] - 0.5 * train[0]["chosen_nll"] - 0.6931) < 0.05, train[0]
    name = "model.decoder.layers.0.fc1.weight"
    new = AutoModelForCausalLM.from_pretrained(dpo.fetch(dpo.layout.model_uri("dpo"), "dpo-model"))
    sft = AutoModelForCausalLM.from_pretrained(dpo.fetch(dpo.layout.model_uri("sft"), "sft-model"))
    assert not torch.equal(new.state_dict()[name], sft.state_dict()[name]), "DPO did not change the model"


def test_grpo_stage_with_a_reward_function_from_the_bucket(s3_server, bucket_storage, tmp_path_factory,
                                                           tiny_model_dir):
    uri = f"{bucket_storage['uri']}/code/rewards.py"
    stage = {"nodes": 1, "gpusPerNode": 2, "dtype": "fp32", "perDeviceBatchSize": 4, "actorZeroStage": 2,
             "generationBatchSize": 2, "groupSize": 2, "maxSteps": 2, "maxPromptLen": 32, "maxAnswerLen": 8,
             "actorLearningRate": 1e-4, "ptxCoef": 1.0, "ema": {"beta": 0.9}, "checkpointEverySteps": 1,
             "rewardFunction": f"{uri}:score"}
    run = algorithm_run("grpo", "grpo", bucket_storage, s3_server, tmp_path_factory, stage, tiny_model_dir)
    run.store().put_bytes(uri, REWARDS)
    run.stage("grpo")
    store = run.store()
    for target in (run.layout.stage_uri("grpo"), run.layout.model_uri("grpo"), run.layout.ema_uri("grpo")):
        assert store.is_complete(target), target
    assert not store.is_complete(run.layout.stage_uri("reward"))
    metrics = run.metrics("grpo")
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward", "kl", "policy_loss", "ptx_loss", "reward_std", "tied_groups", "answer_len"):
        assert all(m.get(key) is not None for m in metrics), key
    assert all(0.0 <= m["reward"] <= 1.0 and m["kl"] >= 0 for m in metrics)
    # the function's scores differ within groups, so the advantages are not all 0
    assert any(m["reward_std"] > 0 and m["tied_groups"] < 1 for m in metrics), metrics
    assert [s for s, _ in store.list_checkpoints(run.layout.ckpt_root("grpo"))] == [1]
