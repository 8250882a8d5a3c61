"""`kuberlhf train`: DeepSpeed-Chat's e2e_rlhf.py flags -> an RLHFPipeline that the CRD schema accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml
from typer.testing import CliRunner

from kuberlhf.contract.spec import SpecError, Stage, parse_pipeline
from kuberlhf.runner.deepspeed_chat import (
    build_train_pipeline,
    expand_model_name,
    pipeline_name_for,
    steps_to_stages,
)

REPO = Path(__file__).resolve().parents[2]


def crd_schema() -> dict:
    crd = yaml.safe_load((REPO / "crds" / "rlhfpipelines.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


def validate_with_crd(doc: dict) -> None:
    """The CRD's openAPIV3Schema is OpenAPI 3.0 (boolean exclusiveMinimum/Maximum, as in JSON Schema draft 4):
    validate with the draft-4 validator; the Kubernetes extensions (x-kubernetes-*) are ignored as unknown
    keywords, which is what the API server's structural checks add on top."""
    jsonschema.Draft4Validator(crd_schema()).validate(doc)


def cli():
    from kuberlhf.cli import app

    return app


def test_model_shorthand_and_any_causal_lm() -> None:
    assert expand_model_name("1.3b") == "facebook/opt-1.3b"
    assert expand_model_name("350m") == "facebook/opt-350m"
    # any HF causal LM, local directory or URI is kept as given
    for name in ("EleutherAI/pythia-160m", "meta-llama/Llama-2-7b-hf", "./my-model", "s3://b/models/x"):
        assert expand_model_name(name) == name
    with pytest.raises(SpecError, match="empty"):
        expand_model_name("  ")


def test_steps_and_names() -> None:
    assert steps_to_stages([3, 1]) == [Stage.sft, Stage.ppo]
    assert steps_to_stages([2, 2]) == [Stage.reward]
    with pytest.raises(SpecError, match="--step"):
        steps_to_stages([4])
    assert pipeline_name_for("facebook/opt-1.3b") == "opt-1-3b-rlhf"
    assert pipeline_name_for("EleutherAI/Pythia_160M") == "pythia-160m-rlhf"


@pytest.mark.parametrize("deployment, gpus, sft_zero, actor_lora", [
    ("single_gpu", 1, 0, 128),  # DeepSpeed-Chat single_gpu: LoRA 128 on the actor, ZeRO 0
    ("single_node", 8, 2, None),
    ("multi_node", 8, 3, None),
])
def test_presets_per_deployment_type(deployment: str, gpus: int, sft_zero: int, actor_lora: int | None) -> None:
    p = build_train_pipeline(actor_model="facebook/opt-1.3b", reward_model="facebook/opt-350m",
                             deployment_type=deployment)
    assert p.spec.stages.sft.gpus_per_node == gpus
    assert p.spec.stages.sft.zero_stage == sft_zero
    got_lora = p.spec.stages.ppo.actor_lora.dim if p.spec.stages.ppo.actor_lora else None
    assert got_lora == actor_lora


def test_single_node_13b_takes_deepspeed_chats_13b_script_and_its_plan_fits(tmp_path: Path) -> None:
    """`e2e_rlhf.py --actor-model facebook/opt-13b --deployment-type single_node` runs the run_13b.sh scripts: steps
    1 and 3 at ZeRO-3 with gradient checkpointing. `kuberlhf train` emits the same, the preflight passes (it refused
    the 1.3B table's ZeRO-2 for 13B), and `kuberlhf plan` of the emitted manifest fits 8 x 80 GiB; a flag the user
    gives still wins, and a 1.3B actor keeps the single_node table (ZeRO-2)."""
    out = tmp_path / "13b.yaml"
    res = CliRunner().invoke(cli(), ["train", "--actor-model", "13b", "--deployment-type", "single_node",
                                     "--emit", str(out)])
    assert res.exit_code == 0, res.output
    st = yaml.safe_load(out.read_text())["spec"]["stages"]
    assert (st["sft"]["zeroStage"], st["sft"]["gradientCheckpointing"]) == (3, True)
    assert (st["ppo"]["actorZeroStage"], st["ppo"]["criticZeroStage"], st["ppo"]["gradientCheckpointing"]) == (
        3, 3, True)
    assert st["reward"]["zeroStage"] == 0  # step 2 trains the 350m reward model (run_350m.sh)
    plan = CliRunner().invoke(cli(), ["plan", str(out)])
    assert plan.exit_code == 0, plan.output
    assert plan.output.count("yes on 1 x 8 x 80.0 GiB") == 3, plan.output
    flagged = build_train_pipeline(actor_model="13b", reward_model="350m", deployment_type="single_node",
                                   actor_zero_stage=2)
    assert (flagged.spec.stages.sft.zero_stage, flagged.spec.stages.ppo.actor_zero_stage) == (2, 2)
    small = build_train_pipeline(actor_model="1.3b", reward_model="350m", deployment_type="single_node")
    assert (small.spec.stages.sft.zero_stage, small.spec.stages.ppo.actor_zero_stage) == (2, 2)
    assert not small.spec.stages.sft.gradient_checkpointing


def test_zero_stage_flags_map_like_deepspeed_chat() -> None:
    p = build_train_pipeline(actor_model="1.3b", reward_model="350m", deployment_type="single_node",
                             actor_zero_stage=3, reward_zero_stage=1)
    st = p.spec.stages
    assert (st.sft.zero_stage, st.ppo.actor_zero_stage) == (3, 3)
    assert (st.reward.zero_stage, st.ppo.critic_zero_stage) == (1, 1)
    assert p.spec.actor.model == "facebook/opt-1.3b"


def test_bad_deployment_type_names_the_field() -> None:
    with pytest.raises(SpecError, match="spec.deploymentType"):
        build_train_pipeline(actor_model="a/b", reward_model="c/d", deployment_type="two_gpus")


@pytest.mark.parametrize("deployment", ["single_gpu", "single_node", "multi_node"])
def test_emit_validates_against_the_crd_and_round_trips(tmp_path: Path, deployment: str) -> None:
    out = tmp_path / "pipeline.yaml"
    res = CliRunner().invoke(cli(), ["train", "--actor-model", "EleutherAI/pythia-410m", "--reward-model", "350m",
                                     "--deployment-type", deployment, "--actor-zero-stage", "2",
                                     "--dataset", "Dahoas/rm-static", "--dataset", "Dahoas/full-hh-rlhf",
                                     "--emit", str(out)])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(out.read_text())
    validate_with_crd(doc)  # what the API server's structural schema checks
    assert doc["kind"] == "RLHFPipeline" and doc["spec"]["deploymentType"] == deployment
    assert doc["spec"]["actor"]["model"] == "EleutherAI/pythia-410m"
    assert doc["spec"]["stages"]["sft"]["zeroStage"] == 2
    again = parse_pipeline(out.read_text())
    assert again.to_wire() == doc  # the wire form is a fixed point of the spec models
    assert [d.name for d in again.spec.data.datasets] == ["Dahoas/rm-static", "Dahoas/full-hh-rlhf"]


def test_emit_to_stdout_with_steps_keeps_yaml_clean() -> None:
    res = CliRunner().invoke(cli(), ["train", "--emit", "-", "--step", "1", "2"])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.stdout)
    validate_with_crd(doc)
    assert "--step is for local runs" in res.stderr


def test_crd_schema_rejects_what_the_models_reject() -> None:
    """Sanity of the check itself: an unknown enum value fails the schema validation."""
    p = build_train_pipeline(actor_model="1.3b", reward_model="350m")
    doc = p.to_wire()
    doc["spec"]["deploymentType"] = "two_gpus"
    with pytest.raises(jsonschema.ValidationError):
        validate_with_crd(doc)


def test_train_bad_flags_exit_2_and_run_nothing(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli(), ["train", "--deployment-type", "single_gpu", "--step", "1", "7",
                                     "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "--step" in res.stderr and "nothing was run" in res.stderr
    assert not (tmp_path / "o").exists()


def test_emit_refuses_a_spec_that_cannot_run(tmp_path: Path) -> None:
    """The preflight runs before anything is written: here a dataset URI with a bucket and no object."""
    out = tmp_path / "p.yaml"
    res = CliRunner().invoke(cli(), ["train", "--deployment-type", "single_node", "--actor-zero-stage", "0",
                                     "--dataset", "s3://bucket", "--emit", str(out)])
    assert res.exit_code == 2, res.output
    assert "spec.data.datasets[0].path" in res.stderr and "nothing was run" in res.stderr
    assert not out.exists()


def test_train_step_3_without_steps_1_and_2_says_what_to_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The local path of `kuberlhf train` (any HF causal LM: here a local tiny OPT directory): step 3 alone
    needs steps 1 and 2 in the object store (the embedded SeaweedFS starts, finds nothing, and says so)."""
    res = CliRunner().invoke(cli(), ["train", "--actor-model", str(tiny_model_dir), "--reward-model",
                                     str(tiny_model_dir), "--deployment-type", "single_gpu", "--accelerator", "cpu",
                                     "--dataset", "kuberlhf/synthetic-pairs", "--output-dir", str(tmp_path / "o"),
                                     "--step", "3"])
    assert res.exit_code == 1, res.output
    assert "needs the output of step 1: supervised fine-tuning (SFT)" in res.stderr
    assert "--step 1 2 3" in res.stderr
    assert "embedded SeaweedFS" in res.stdout


def test_step_flags_take_several_values_like_e2e_rlhf() -> None:
    res = CliRunner().invoke(cli(), ["train", "--step", "1", "2", "3", "--emit", "-"])
    assert res.exit_code == 0, res.output
    assert "--step is for local runs" not in res.stderr  # all three steps: nothing to warn about


def tiny_llama_dir(out: Path) -> Path:
    """A 2-layer Llama (hidden 64) with random weights and the shipped tokenizer, in hub layout."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(REPO / "trainer_image" / "kuberlhf" / "assets" / "tiny-opt")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "kuberlhf"
    return subprocess.run([str(exe), "train", *args], env={**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"},
                          capture_output=True, text=True, timeout=300)


def test_train_step_1_runs_the_single_gpu_recipe_on_a_hub_layout_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`kuberlhf train` for real, as DeepSpeed-Chat's e2e_rlhf.py is used: a model directory laid out like a hub
    model (config, safetensors, tokenizer files), the single_gpu recipe (ZeRO 0, micro-batch 16 x gradient
    accumulation 8, LoRA dim 128 on the actor: a rank above the tiny model's hidden size 64 still trains, it only
    saves nothing), step 1 only, on CPU with the embedded SeaweedFS. The SFT model comes out merged (no LoRA
    weights) and loads with plain transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kuberlhf.data import stage_rows

    model_dir = tiny_model_dir
    pipeline = build_train_pipeline(actor_model=str(model_dir), reward_model=str(model_dir),
                                    deployment_type="single_gpu", datasets=["kuberlhf/synthetic-pairs"],
                                    accelerator="cpu")
    sft = pipeline.spec.stages.sft
    assert (sft.zero_stage, sft.per_device_batch_size, sft.gradient_accumulation_steps, sft.lora.dim) == (0, 16, 8, 128)
    out = tmp_path / "out"
    proc = run_train(["--actor-model", str(model_dir), "--reward-model", str(model_dir), "--deployment-type",
                      "single_gpu", "--step", "1", "--accelerator", "cpu", "--dataset", "kuberlhf/synthetic-pairs",
                      "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "step 1: supervised fine-tuning (SFT)" in proc.stdout and "step 3" not in proc.stdout
    assert not (out / "reward").exists() and not (out / "ppo").exists()  # --step 1 ran step 1 only

    # one optimizer step per 16 x 8 = 128 training rows, as the single_gpu recipe says
    train_rows, _ = stage_rows(pipeline.spec.data, Stage.sft)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in records if r["stage"] == "sft" and r["split"] == "train"]
    assert steps == list(range(1, len(train_rows) // 128 + 1)) and len(steps) >= 2

    weights = load_file(str(out / "sft" / "model.safetensors"))
    assert not any("lora" in k for k in weights)  # adapters merged into the plain OPT weights
    before = load_file(str(model_dir / "model.safetensors"))
    name = "model.decoder.layers.0.fc1.weight"
    assert weights[name].shape == before[name].shape and not torch.equal(weights[name], before[name])
    model = AutoModelForCausalLM.from_pretrained(out / "sft").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    ids = tokenizer(" Human: What is the capital of France? Assistant:", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == model.config.vocab_size


def test_train_all_steps_on_a_llama_with_deepspeed_chat_length_flags(tmp_path: Path) -> None:
    """Any HF causal LM through all three steps: a tiny Llama (layer names without the default LoRA moduleName
    'decoder.layers.': LoRA dim 128 goes on its decoder blocks), the single_gpu recipe, ptx on, capped with
    DeepSpeed-Chat's length flags and --max-steps so it takes seconds on a CPU."""
    from safetensors.torch import load_file

    from kuberlhf.models.reward import RewardModel

    model_dir = tiny_llama_dir(tmp_path / "llama")
    flags = ["--max-steps", "2", "--max-seq-len", "64", "--max-prompt-seq-len", "24", "--max-answer-seq-len", "8"]
    common = ["--actor-model", str(model_dir), "--reward-model", str(model_dir), "--deployment-type", "single_gpu",
              "--accelerator", "cpu", "--dataset", "kuberlhf/synthetic-pairs", "--unsupervised-dataset",
              "kuberlhf/synthetic-corpus", *flags]
    emitted = yaml.safe_load(run_train([*common, "--emit", "-"]).stdout)
    spec = emitted["spec"]
    assert spec["data"]["maxSeqLen"] == 64 and spec["stages"]["ppo"]["maxAnswerLen"] == 8
    assert {spec["stages"][s]["maxSteps"] for s in ("sft", "reward", "ppo")} == {2}
    assert spec["stages"]["sft"]["lora"]["dim"] == 128 and spec["stages"]["ppo"]["actorLora"]["dim"] == 128

    out = tmp_path / "out"
    proc = run_train([*common, "--step", "1", "2", "3", "--output-dir", str(out), "--samples", "1"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for stage in ("sft", "reward", "ppo"):
        assert [r["step"] for r in records if r["stage"] == stage and r["split"] == "train"] == [1, 2], stage
    ppo = [r for r in records if r["stage"] == "ppo"]
    assert all(r["ptx_loss"] is not None and r["reward"] is not None for r in ppo)
    for d in (out / "sft", out / "ppo" / "model", out / "ppo" / "ema"):
        weights = load_file(str(d / "model.safetensors"))
        assert "model.layers.0.mlp.up_proj.weight" in weights and not any("lora" in k for k in weights), d
    rm = RewardModel.from_pretrained(out / "reward")
    assert rm.config.model_type == "llama"
    assert "kuberlhf chat --model" in proc.stdout
