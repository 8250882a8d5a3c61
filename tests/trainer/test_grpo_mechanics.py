"""GRPO on real DeepSpeed engines (gloo, world size 1, tiny random-weight models), through the Python API: the
PPO trainer's generation samples groupSize answers per prompt (each group's rows adjacent, same prompt), a reward
function from a file scores them, advantages are normalised within each group, one actor step moves the actor and
the EMA follows it; there is no critic and no reward model."""

from __future__ import annotations

from test_python_api import write_stage_outputs
from trainer_stage_helpers import run_probe

SCRIPT = """
import json
import torch
from kuberlhf.contract.spec import parse_pipeline
from kuberlhf.data.format import format_prompt
from kuberlhf.models.loading import load_tokenizer
from kuberlhf.rlhf.code_reward import CodeReward
from kuberlhf.rlhf.engine import EngineOptions, RLHFEngine
from kuberlhf.rlhf.grpo import GRPOSettings, GRPOTrainer
from kuberlhf.training.distributed import init_distributed

doc = {"apiVersion": "kuberlhf.io/v1alpha1", "kind": "RLHFPipeline", "metadata": {"name": "g"},
       "spec": {"accelerator": "cpu", "algorithm": "grpo", "actor": {"model": "kuberlhf/tiny-opt"},
                "data": {"datasets": ["kuberlhf/synthetic-pairs"]}, "storage": {"uri": "file:///tmp/x"},
                "stages": {"grpo": {"groupSize": 3, "maxAnswerLen": 6, "rewardFunction": "rewards.py:score",
                                    "ema": {"beta": 0.5}, "learningRate": 0.01, "actorLora": {"dim": 0},
                                    "gradientAccumulationSteps": 1}}}}
spec = parse_pipeline(doc).spec
init_distributed("cpu")
tok = load_tokenizer("out/tiny/sft/model", padding_side="left")
engine = RLHFEngine("out/tiny/sft/model", None, tok, EngineOptions.from_spec(spec, 1, stage="grpo"),
                    num_total_iters=10, train_critic=False)
reward = CodeReward.load(spec.stages.grpo.reward_function, timeout_s=5)
trainer = GRPOTrainer(engine, GRPOSettings.from_spec(spec.stages.grpo), reward_fn=reward)
enc = tok([format_prompt("Name a color."), format_prompt("How do I boil an egg?")], return_tensors="pt",
          padding=True)
batch = {"prompt_input_ids": enc.input_ids, "prompt_attention_mask": enc.attention_mask}
torch.manual_seed(0)
exp = trainer.generate_experience(batch)
name = "model.decoder.layers.0.fc1.weight"
w = lambda m: dict(m.named_parameters())[name].detach().clone()
before_actor, before_ema = w(engine.actor.module), w(engine.ema.module)
loss, kl = trainer.train_rlhf(exp)
updated = engine.maybe_update_ema()
print("GRPO-RESULT " + json.dumps({
    "rows": int(exp["seq"].shape[0]), "prompts": exp["prompts"].tolist(), "scores": exp["scores"].tolist(),
    "advantages": exp["advantages"].tolist(), "loss": float(loss), "kl": float(kl), "updated": updated,
    "actor_moved": float((w(engine.actor.module) - before_actor).abs().max()),
    "ema_moved": float((w(engine.ema.module) - before_ema).abs().max()),
    "critic": engine.critic is None and engine.reward is None, "trained": sorted(engine.trained_engines())}))
"""

REWARDS = """
SEEN = []
def score(prompt, answer):
    # a verifiable-task stand-in: longer answers score higher; the prompt must arrive as the model saw it
    assert "Human:" in prompt and prompt.rstrip().endswith("Assistant:"), prompt
    return float(len(answer.split()))
"""


def test_grpo_groups_code_reward_and_one_actor_step(repo_root, tmp_path):
    write_stage_outputs(tmp_path)
    (tmp_path / "rewards.py").write_text(REWARDS)
    res = run_probe(SCRIPT, "GRPO-RESULT", cwd=tmp_path)
    assert res["rows"] == 6 and res["critic"] and res["trained"] == ["actor"]
    prompts, scores, adv = res["prompts"], res["scores"], res["advantages"]
    for g in range(2):  # each group: three answers to one prompt, advantages centred within the group
        rows = range(3 * g, 3 * g + 3)
        assert all(prompts[i] == prompts[3 * g] for i in rows)
        assert abs(sum(adv[i] for i in rows)) < 1e-4
        order = sorted(rows, key=lambda i: scores[i])
        assert [adv[i] for i in order] == sorted(adv[i] for i in rows)  # higher reward, higher advantage
    assert prompts[0] != prompts[3]
    assert res["kl"] >= 0 and res["updated"] and res["actor_moved"] > 0 and res["ema_moved"] > 0
