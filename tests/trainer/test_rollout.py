"""Rollouts decoupled from PPO updates (kuberlhf.rlhf.rollout): with rolloutBatchSize equal to
generationBatchSize the losses are the coupled loop's exactly; a rollout of two experience batches is decoded in
one call and split back into updates of generationBatchSize rows. Real DeepSpeed engines (gloo, world size 1,
tiny random-weight models) in a subprocess."""

from __future__ import annotations

import torch
from test_python_api import write_stage_outputs
from trainer_stage_helpers import run_probe

from kuberlhf.rlhf.rollout import merge_prompt_batches

SCRIPT = """
import json
import torch
from kuberlhf.contract.spec import load_pipeline_file
from kuberlhf.data.format import format_prompt
from kuberlhf.models.loading import load_tokenizer
from kuberlhf.rlhf.engine import EngineOptions, RLHFEngine
from kuberlhf.rlhf.rollout import rollouts
from kuberlhf.rlhf.trainer import PPOSettings, PPOTrainer
from kuberlhf.training.distributed import init_distributed

spec = load_pipeline_file(EXAMPLE).spec
spec.stages.ppo.ema.enabled = False
init_distributed("cpu")
tok = load_tokenizer("out/tiny/sft/model", padding_side="left")
questions = [["Name a color.", "How do I boil an egg?"], ["What is 2 + 2?", "Say hi."], ["Why?", "A fruit?"]]
batches = []
for qs in questions:
    enc = tok([format_prompt(q) for q in qs], return_tensors="pt", padding=True)
    batches.append({"prompt_input_ids": enc.input_ids, "prompt_attention_mask": enc.attention_mask})

def run(mode):
    torch.manual_seed(0)
    engine = RLHFEngine("out/tiny/sft/model", "out/tiny/reward/model", tok, EngineOptions.from_spec(spec, 1),
                        num_total_iters=10)
    settings = PPOSettings.from_spec(spec.stages.ppo)
    settings.max_answer_len = 8
    trainer = PPOTrainer(engine, settings)
    torch.manual_seed(1)
    if mode == "coupled":  # the loop before rolloutBatchSize
        exps = (trainer.generate_experience(b) for b in batches)
    else:
        exps = (e for e, _ in rollouts(trainer.generate_experience, batches, int(mode), trainer.pad_id))
    losses, rows = [], []
    for exp in exps:
        exp.update(trainer.advantages(exp))
        a, c = trainer.train_rlhf(exp)
        losses.append([float(a), float(c)])
        rows.append(int(exp["seq"].shape[0]))
    return {"losses": losses, "rows": rows}

print("ROLLOUT-RESULT " + json.dumps({m: run(m) for m in ("coupled", "1", "2")}))
"""


def test_equal_rollout_and_generation_batch_give_the_coupled_losses(repo_root, tmp_path) -> None:
    write_stage_outputs(tmp_path)
    code = f"EXAMPLE = {str(repo_root / 'examples/tiny-cpu.yaml')!r}\n" + SCRIPT
    res = run_probe(code, "ROLLOUT-RESULT", cwd=tmp_path, timeout=400)
    assert res["1"] == res["coupled"]  # same losses, bit for bit
    assert len(res["coupled"]["losses"]) == 3
    # two experience batches per rollout: still one update per generation batch of 2 prompts (the last rollout
    # holds the third batch alone), with finite losses
    assert res["2"]["rows"] == [2, 2, 2]
    assert all(abs(x) < 1e6 for pair in res["2"]["losses"] for x in pair)


def test_merged_prompts_keep_each_row_right_aligned() -> None:
    a = {
        "prompt_input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
        "prompt_attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
    }
    b = {"prompt_input_ids": torch.tensor([[3, 4]]), "prompt_attention_mask": torch.tensor([[1, 1]])}
    m = merge_prompt_batches([a, b], pad_id=0)
    assert m["prompt_input_ids"].tolist() == [[0, 5, 6], [7, 8, 9], [0, 3, 4]]
    assert m["prompt_attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1], [0, 1, 1]]
    assert merge_prompt_batches([a], pad_id=0) is a
