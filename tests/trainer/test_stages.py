"""The three stages for real: `kuberlhf stage` with 2 CPU ranks (DeepSpeed, gloo), the tiny OPT, the synthetic
preference data and a real SeaweedFS bucket; once with fp32 ZeRO-2 and once with bf16 ZeRO-3."""

from __future__ import annotations

import pytest
import torch
from trainer_stage_helpers import PipelineRun, tiny_manifest

from kuberlhf.models.tiny import tiny_causal_lm, tiny_config


@pytest.fixture(scope="module")
def zero2(s3_server, bucket_storage, tmp_path_factory) -> PipelineRun:
    return PipelineRun(tiny_manifest("zero2", bucket_storage), s3_server, tmp_path_factory.mktemp("zero2"))


@pytest.fixture(scope="module")
def zero3(s3_server, bucket_storage, tmp_path_factory) -> PipelineRun:
    z3 = {"zeroStage": 3, "dtype": "bf16", "maxSteps": 4}
    # the reward model starts from step 1's model (initFromSft, no spec.reward), read partitioned at ZeRO-3; its
    # small learning rate keeps it next to SFT's weights, which the test checks
    manifest = tiny_manifest("zero3", bucket_storage, stages={
        "sft": z3, "reward": {**z3, "initFromSft": True, "learningRate": 1e-5},
        "ppo": {"actorZeroStage": 3, "criticZeroStage": 3, "dtype": "bf16", "maxSteps": 2}})
    del manifest["spec"]["reward"]
    return PipelineRun(manifest, s3_server, tmp_path_factory.mktemp("zero3"))


def sft_eval_loss(model, tokenizer, manifest) -> float:
    """The SFT eval loss recomputed outside DeepSpeed with plain transformers on the stage's eval rows."""
    from kuberlhf.contract.spec import Stage, parse_pipeline
    from kuberlhf.data import SFTDataset, stage_rows
    from kuberlhf.rlhf.ppo_math import causal_lm_loss

    spec = parse_pipeline(manifest).spec
    _, eval_rows = stage_rows(spec.data, Stage.sft)
    ds = SFTDataset(eval_rows, tokenizer, spec.data.max_seq_len)
    losses = []
    # same batching as the stage's eval: rank r takes rows r, r+2, ...; 4 per batch; mean of batch means
    with torch.no_grad():
        for rank in range(2):
            idx = list(range(rank, len(ds) - len(ds) % 2, 2))
            per_rank = []
            for i in range(0, len(idx), 4):
                batch = ds.collate([ds[j] for j in idx[i:i + 4]])
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                per_rank.append(float(causal_lm_loss(out.logits, batch["labels"])))
            losses.append(sum(per_rank) / len(per_rank))
    return sum(losses) / len(losses)


def test_sft_zero2_learns_exports_and_reloads(zero2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zero2.stage("sft")
    store = zero2.store()
    assert store.is_complete(zero2.layout.stage_uri("sft")) and store.is_complete(zero2.layout.model_uri("sft"))
    train = [m for m in zero2.metrics("sft") if m["split"] == "train"]
    evals = [m for m in zero2.metrics("sft") if m["split"] == "eval"]
    assert [m["step"] for m in train] == list(range(1, 21))
    assert {"loss", "lr", "tokens_per_s", "time"} <= set(train[0])
    first, last = sum(m["loss"] for m in train[:3]) / 3, sum(m["loss"] for m in train[-3:]) / 3
    assert last < first - 1.0, f"20 SFT steps did not reduce the loss enough: {first:.3f} -> {last:.3f}"
    assert evals and evals[-1]["step"] == 20 and evals[-1]["perplexity"] > 1

    local = zero2.fetch(zero2.layout.model_uri("sft"), "sft-model")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in local.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(local).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    loss = sft_eval_loss(model, tokenizer, zero2.manifest)
    assert loss == pytest.approx(evals[-1]["loss"], rel=1e-3, abs=1e-3)


def test_reward_zero2_beats_chance_on_held_out_pairs(zero2):
    from kuberlhf.contract.spec import Stage, parse_pipeline
    from kuberlhf.data import PairDataset, stage_rows
    from kuberlhf.models.reward import RewardModel
    from kuberlhf.rlhf.ppo_math import pairwise_loss

    zero2.stage("reward")
    evals = [m for m in zero2.metrics("reward") if m["split"] == "eval"]
    assert evals[-1]["accuracy"] > 0.75, evals[-1]
    assert evals[-1]["chosen_score"] > evals[-1]["rejected_score"]

    local = zero2.fetch(zero2.layout.model_uri("reward"), "reward-model")
    assert {"config.json", "model.safetensors", "value_head.safetensors", "reward_config.json",
            "tokenizer.json"} <= {p.name for p in local.iterdir()}
    from transformers import AutoTokenizer

    rm = RewardModel.from_pretrained(local).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    spec = parse_pipeline(zero2.manifest).spec
    _, eval_rows = stage_rows(spec.data, Stage.reward)
    ds = PairDataset(eval_rows, tokenizer, spec.data.max_seq_len)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        _, scores = rm(batch["input_ids"], batch["attention_mask"])
    chosen, rejected = scores[: len(ds)], scores[len(ds):]
    accuracy = float((chosen > rejected).float().mean())
    assert len(ds) >= 20 and accuracy > 0.75, f"held-out accuracy {accuracy:.3f} on {len(ds)} pairs"
    assert float(pairwise_loss(chosen, rejected)) < 0.6931  # better than a constant scorer (log 2)


def test_ppo_zero2_with_ema_and_ptx(zero2):
    from transformers import AutoModelForCausalLM

    zero2.stage("sft")
    zero2.stage("reward")
    zero2.stage("ppo")
    store = zero2.store()
    for uri in (zero2.layout.stage_uri("ppo"), zero2.layout.model_uri("ppo"), zero2.layout.ema_uri()):
        assert store.is_complete(uri), uri
    metrics = zero2.metrics("ppo")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("reward", "kl", "actor_loss", "critic_loss", "ptx_loss", "return", "kl_coef", "samples_per_s",
                "gen_time_share"):
        assert all(m.get(key) is not None for m in metrics), key
    actor = AutoModelForCausalLM.from_pretrained(zero2.fetch(zero2.layout.model_uri("ppo"), "ppo-model"))
    ema = AutoModelForCausalLM.from_pretrained(zero2.fetch(zero2.layout.ema_uri(), "ppo-ema"))
    sft = AutoModelForCausalLM.from_pretrained(zero2.workdir / "sft-model") if (zero2.workdir / "sft-model").exists() \
        else AutoModelForCausalLM.from_pretrained(zero2.fetch(zero2.layout.model_uri("sft"), "sft-model"))
    name = "model.decoder.layers.0.fc1.weight"
    a, e, s = (m.state_dict()[name] for m in (actor, ema, sft))
    assert not torch.equal(a, s), "PPO did not change the actor"
    # the EMA moves from the SFT weights toward the actor but not all the way (beta 0.9, 3 x 2 updates)
    assert 0 < float((e - s).norm()) < float((a - s).norm())


def test_zero3_bf16_all_stages(zero3):
    from transformers import AutoModelForCausalLM

    from kuberlhf.models.reward import RewardModel

    for stage in ("sft", "reward", "ppo"):
        zero3.stage(stage)
        assert zero3.store().is_complete(zero3.layout.stage_uri(stage)), stage
    assert [m["step"] for m in zero3.metrics("ppo")] == [1, 2]
    model = AutoModelForCausalLM.from_pretrained(zero3.fetch(zero3.layout.model_uri("ppo"), "ppo-model"))
    assert model.config.model_type == "opt"
    # ZeRO-3 export gathered the full (not partitioned) weights
    assert model.model.decoder.embed_tokens.weight.shape == (tiny_config().vocab_size, 64)
    rm = RewardModel.from_pretrained(zero3.fetch(zero3.layout.model_uri("reward"), "rm"))
    assert rm.v_head.weight.shape == (1, 64) and float(rm.v_head.weight.detach().abs().sum()) > 0
    # initFromSft: the reward backbone is step 1's trained model, not the random init step 1 started from
    sft = AutoModelForCausalLM.from_pretrained(zero3.fetch(zero3.layout.model_uri("sft"), "sft-model")).model
    init = tiny_causal_lm(seed=1234).model
    name = "decoder.layers.0.fc1.weight"
    r, s, i = (m.state_dict()[name].float() for m in (rm.rwtransformer, sft, init))
    assert float((r - s).norm()) < 0.1 * float((i - s).norm()), (float((r - s).norm()), float((i - s).norm()))


def test_sft_interrupted_and_resumed_matches_uninterrupted(zero2, s3_server, bucket_storage, tmp_path):
    """A crash right after the step-10 checkpoint (the stage's own fault hook), then the same command again:
    it resumes from ckpt/step-10 and ends where the uninterrupted run (zero2, same spec) ended."""
    from safetensors.torch import load_file
    from trainer_stage_helpers import run_stage

    from kuberlhf.stages.supervised import FAIL_AT_STEP_ENV

    zero2.stage("sft")
    resumed = PipelineRun(tiny_manifest("resumed", bucket_storage), s3_server, tmp_path)
    crashed = run_stage(resumed.manifest, "sft", s3_server, resumed.uid, extra_env={FAIL_AT_STEP_ENV: "10"})
    assert crashed.returncode != 0
    store = resumed.store()
    assert not store.is_complete(resumed.layout.stage_uri("sft"))
    assert [step for step, _ in store.list_checkpoints(resumed.layout.ckpt_root("sft"))] == [10]

    resumed.stage("sft")  # same command again: resumes
    base = {(m["step"], m["split"]): m for m in zero2.metrics("sft")}
    again = {(m["step"], m["split"]): m for m in resumed.metrics("sft")}
    assert sorted(base) == sorted(again)  # the metrics file continues (steps 1-10 restored, 11-20 new)
    for key in base:
        assert again[key]["loss"] == pytest.approx(base[key]["loss"], rel=1e-4, abs=1e-4), key
    w1 = load_file(str(zero2.fetch(zero2.layout.model_uri("sft"), "sft-model") / "model.safetensors"))
    w2 = load_file(str(resumed.fetch(resumed.layout.model_uri("sft"), "sft-model") / "model.safetensors"))
    for name, tensor in w1.items():
        assert torch.allclose(tensor, w2[name], atol=1e-4), name


def test_ppo_interrupted_and_resumed_matches_uninterrupted(zero2, s3_server, bucket_storage, tmp_path):
    """PPO (2 ranks, ZeRO-2, EMA, ptx, adaptive KL) crashes right after its step-2 checkpoint and is started
    again: it resumes from ckpt/step-2 (actor + critic optimizer and scheduler, EMA weights, KL coefficient,
    RNG, prompt and ptx data positions) and ends where the uninterrupted run (zero2's ppo, same spec) ended."""
    from safetensors.torch import load_file
    from trainer_stage_helpers import run_stage

    from kuberlhf.stages.supervised import FAIL_AT_STEP_ENV

    zero2.stage("ppo")
    resumed = PipelineRun(zero2.manifest, s3_server, tmp_path)
    resumed.copy_stage_models_from(zero2, ("sft", "reward"))
    crashed = run_stage(resumed.manifest, "ppo", s3_server, resumed.uid, extra_env={FAIL_AT_STEP_ENV: "2"})
    assert crashed.returncode != 0
    store = resumed.store()
    assert not store.is_complete(resumed.layout.stage_uri("ppo"))
    assert [step for step, _ in store.list_checkpoints(resumed.layout.ckpt_root("ppo"))] == [2]

    resumed.stage("ppo")  # same command again: resumes at step 3
    base = {m["step"]: m for m in zero2.metrics("ppo")}
    again = {m["step"]: m for m in resumed.metrics("ppo")}
    assert sorted(base) == sorted(again) == [1, 2, 3]
    # the adaptive controller moved, so restoring it (not the spec's initial klCoef) is what step 3 tests
    assert base[3]["kl_coef"] != base[1]["kl_coef"]
    for step in base:
        for key in ("reward", "kl", "actor_loss", "critic_loss", "ptx_loss", "return", "kl_coef", "answer_len"):
            assert again[step][key] == pytest.approx(base[step][key], rel=1e-4, abs=1e-5), (step, key)
    for uri_of, name in ((lambda r: r.layout.model_uri("ppo"), "actor"), (lambda r: r.layout.ema_uri(), "ema")):
        w1 = load_file(str(zero2.fetch(uri_of(zero2), f"ppo-{name}-base") / "model.safetensors"))
        w2 = load_file(str(resumed.fetch(uri_of(resumed), f"ppo-{name}-resumed") / "model.safetensors"))
        assert w1.keys() == w2.keys()
        for key, tensor in w1.items():
            assert torch.allclose(tensor, w2[key], atol=1e-5), (name, key)


def test_zero3_killed_while_a_background_save_is_in_flight_resumes_at_zero3(zero3, s3_server, tmp_path):
    """ZeRO-3 (bf16, 2 ranks, each holding its own partition of weights and Adam state), a checkpoint after every
    step saved in the background: rank 0 dies while ckpt/step-2 is half uploaded (the stage's mid-save hook),
    after ckpt/step-1 was committed. The half-written step 2 (files there, no _COMPLETE) is never picked up: the
    same command resumes from ckpt/step-1 at ZeRO-3 and ends where the uninterrupted run (zero3's sft, the same
    spec without checkpoints) ended."""
    import copy
    import re

    from safetensors.torch import load_file
    from trainer_stage_helpers import run_stage

    from kuberlhf.stages.runtime import CRASH_EXIT_CODE, CRASH_MID_SAVE_ENV

    zero3.stage("sft")
    manifest = copy.deepcopy(zero3.manifest)
    manifest["spec"]["stages"]["sft"]["checkpointEverySteps"] = 1
    resumed = PipelineRun(manifest, s3_server, tmp_path)
    crashed = run_stage(manifest, "sft", s3_server, resumed.uid, extra_env={CRASH_MID_SAVE_ENV: "2"})
    codes = re.search(r"worker exit codes \[([^\]]*)\]", crashed.stdout + crashed.stderr)
    assert crashed.returncode != 0 and codes and str(CRASH_EXIT_CODE) in codes.group(1).split(", "), \
        crashed.stderr[-3000:]
    store = resumed.store()
    half = resumed.layout.ckpt_uri("sft", 2)
    assert store.exists(f"{half}/metrics.jsonl") and not store.is_complete(half)  # killed mid-upload
    assert [step for step, _ in store.list_checkpoints(resumed.layout.ckpt_root("sft"))] == [1]

    again = resumed.stage("sft")
    assert f"resuming sft from {resumed.layout.ckpt_uri('sft', 1)}" in again.stdout
    base = {(m["step"], m["split"]): m for m in zero3.metrics("sft")}
    after = {(m["step"], m["split"]): m for m in resumed.metrics("sft")}
    assert sorted(base) == sorted(after)
    for key in base:
        assert after[key]["loss"] == pytest.approx(base[key]["loss"], rel=1e-3), key
    w1 = load_file(str(zero3.fetch(zero3.layout.model_uri("sft"), "sft-model-z3") / "model.safetensors"))
    w2 = load_file(str(resumed.fetch(resumed.layout.model_uri("sft"), "sft-model") / "model.safetensors"))
    for name, tensor in w1.items():
        assert torch.allclose(tensor.float(), w2[name].float(), atol=1e-2), name


def test_deepspeed_launcher_two_ranks_matches_our_spawner(zero2, s3_server, tmp_path):
    """The real `deepspeed --num_gpus 2` CLI (on CPU) launching the stage module: it passes `--local_rank=N`
    and its own env (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, MASTER_*) to each rank. Same spec as
    zero2's sft, which `kuberlhf stage` ran with its own elastic spawner: same losses, same weights."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from trainer_stage_helpers import STAGE_TIMEOUT_S, ok

    from kuberlhf.training.distributed import free_port

    zero2.stage("sft")
    launched = PipelineRun(zero2.manifest, s3_server, tmp_path)
    manifest_file = tmp_path / "pipeline.json"
    manifest_file.write_text(json.dumps(zero2.manifest))
    # a user's shell outside Kubernetes: only the storage keys and where to put the outputs
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(s3_server.credentials_env(), KUBERLHF_NAMESPACE="test", KUBERLHF_PIPELINE_UID=launched.uid,
               PYTHONWARNINGS="ignore::FutureWarning")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    ok(subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                       "kuberlhf.stages.worker", "sft", "--pipeline", str(manifest_file)],
                      env=env, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S))
    assert launched.store().is_complete(launched.layout.stage_uri("sft"))
    base = {(m["step"], m["split"]): m["loss"] for m in zero2.metrics("sft")}
    again = {(m["step"], m["split"]): m["loss"] for m in launched.metrics("sft")}
    assert sorted(again) == sorted(base)
    for key, loss in base.items():
        assert again[key] == pytest.approx(loss, rel=1e-4, abs=1e-4), key
    w1 = load_file(str(zero2.fetch(zero2.layout.model_uri("sft"), "sft-model") / "model.safetensors"))
    w2 = load_file(str(launched.fetch(launched.layout.model_uri("sft"), "sft-ds") / "model.safetensors"))
    for name, tensor in w1.items():
        assert torch.allclose(tensor, w2[name], atol=1e-4), name
