"""`kuberlhf run examples/tiny-cpu.yaml` for real: embedded SeaweedFS, the three stage entrypoints as local
processes, killed mid-PPO and resumed, outputs checked with plain transformers and the trained reward model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-cpu.yaml"

pytestmark = pytest.mark.slow


def test_resumed_run_succeeds_without_redoing_finished_stages(tiny_run) -> None:
    assert tiny_run.second_rc == 0, tiny_run.second_log[-4000:]
    assert tiny_run.orphans == []  # killing the run's process group stopped every stage process
    log = tiny_run.second_log
    assert re.search(r"step 1: supervised fine-tuning \(SFT\): skipped", log)
    assert re.search(r"step 2: reward model: skipped", log)
    assert f"resuming from checkpoint step-{tiny_run.killed_at_step}" in log
    state = json.loads((tiny_run.out / "run.json").read_text())
    assert state["attempts"] == {"sft": 1, "reward": 1, "ppo": 2}
    # the resumed attempt started at the checkpoint: its first logged step is after it
    ppo_steps = [r["step"] for r in _metrics(tiny_run) if r["stage"] == "ppo" and r.get("split", "train") == "train"]
    assert sorted(ppo_steps) == list(range(1, max(ppo_steps) + 1))  # no gap and no duplicate across attempts
    assert "is not reachable from this machine" in tiny_run.first_log  # the kind endpoint was overridden, loudly


def _metrics(tiny_run) -> list[dict]:
    return [json.loads(line) for line in (tiny_run.out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_models_load_with_plain_transformers(tiny_run) -> None:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    out = tiny_run.out
    for d in (out / "sft", out / "ppo" / "model", out / "ppo" / "ema"):
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d)
        ids = tok(" Human: What is the capital of France? Assistant:", return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids).logits
        assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    backbone = AutoModel.from_pretrained(out / "reward")  # the reward model's backbone is plain HF too
    assert backbone.config.model_type == "opt" and (out / "reward" / "value_head.safetensors").exists()
    assert (out / "ppo" / "ema" / "model.safetensors").read_bytes() != (out / "ppo" / "model" / "model.safetensors").read_bytes()


def test_metrics_and_plots(tiny_run) -> None:
    from PIL import Image

    records = _metrics(tiny_run)
    by_stage = {s: [r for r in records if r["stage"] == s] for s in ("sft", "reward", "ppo")}
    assert all(by_stage.values())
    assert any("loss" in r for r in by_stage["sft"]) and any(r.get("split") == "eval" for r in by_stage["sft"])
    assert any("accuracy" in r for r in by_stage["reward"] if r.get("split") == "eval")
    assert all(k in by_stage["ppo"][0] for k in ("reward", "kl", "actor_loss", "critic_loss", "ptx_loss"))
    sft_loss = [r["loss"] for r in by_stage["sft"] if r.get("split", "train") == "train"]
    assert sft_loss[-1] < 0.5 * sft_loss[0]
    for name in ("sft_loss.png", "reward_model.png", "ppo.png"):
        path = tiny_run.out / "plots" / name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] >= 700


def test_ppo_raises_the_reward_model_score_on_heldout_prompts(tiny_run) -> None:
    """Measured here, not read from the logs: greedy answers of the SFT policy and of the final (EMA) policy to
    all of the PPO stage's held-out prompts (the run's own report reads 64), scored by the trained reward model.
    Since politeness carries no preference in the data, PPO's gain is in the answers, not in added closings:
    measured +5.44 -> +6.81 greedy on 269 prompts (+1.1 / +0.9 sampled at the run's temperature 0.7, +0.6 at 1.0)."""
    from kuberlhf.contract.spec import load_pipeline_file
    from kuberlhf.runner.samples import evaluate_policies, heldout_prompts

    pipeline = load_pipeline_file(str(EXAMPLE))
    prompts = heldout_prompts(pipeline)
    assert len(prompts) >= 50
    out = tiny_run.out
    ev = evaluate_policies({"sft": out / "sft", "ppo": out / "ppo" / "ema"}, out / "reward", prompts,
                           max_new_tokens=pipeline.spec.stages.ppo.max_answer_len, temperature=0.0)
    sft, ppo = ev["policies"]["sft"]["mean_score"], ev["policies"]["ppo"]["mean_score"]
    print(f"mean RM score on {len(prompts)} held-out prompts: SFT {sft:+.3f}, PPO (EMA) {ppo:+.3f}")
    assert ppo > sft + 0.5, (sft, ppo)
    # the run's own end-of-run report agrees
    evaluation = json.loads((out / "run.json").read_text())["evaluation"]
    assert evaluation["finalMeanScore"] > evaluation["sftMeanScore"]
    assert "mean reward-model score on" in tiny_run.second_log and "kuberlhf chat --model" in tiny_run.second_log
    # multi-turn: the share of follow-up answers on 64 held-out dialogues that stay on the first turn's subject
    # (greedy). A model that ignores the earlier turn scores ~0.1-0.2 (tests/data/test_dialogues.py); the issue's
    # goal is >= 0.8 for SFT and PPO (measured SFT 1.00, PPO 0.98: docs/local.md)
    assert evaluation["heldoutDialogues"] == 64
    assert evaluation["sftOnSubject"] >= 0.85 and evaluation["finalOnSubject"] >= 0.8, evaluation
    assert "stay on the conversation's subject" in tiny_run.second_log
