"""Step-3 mechanics on real DeepSpeed engines (gloo, world size 1, tiny random-weight models): both ways of
taking the actor's log-probs run generate_experience + train_rlhf end to end, and the EMA follows the actor's
optimizer steps (not its micro-batches) with gradient accumulation."""

from __future__ import annotations

from test_python_api import write_stage_outputs
from trainer_stage_helpers import run_probe

SCRIPT = """
import json, math
import torch
from kuberlhf.contract.spec import load_pipeline_file
from kuberlhf.data.format import format_prompt
from kuberlhf.models.loading import load_tokenizer
from kuberlhf.rlhf import ppo_math as pm
from kuberlhf.rlhf.engine import EngineOptions, RLHFEngine
from kuberlhf.rlhf.trainer import PPOSettings, PPOTrainer
from kuberlhf.training.distributed import init_distributed

spec = load_pipeline_file(EXAMPLE).spec
spec.stages.ppo.gradient_accumulation_steps = 2
spec.stages.ppo.ema.beta = 0.5  # large steps, so "moved" and "did not move" are far apart
init_distributed("cpu")
tok = load_tokenizer("out/tiny/sft/model", padding_side="left")
engine = RLHFEngine("out/tiny/sft/model", "out/tiny/reward/model", tok, EngineOptions.from_spec(spec, 1),
                    num_total_iters=10)
enc = tok([format_prompt("Name a color."), format_prompt("How do I boil an egg?")], return_tensors="pt",
          padding=True)
batch = {"prompt_input_ids": enc.input_ids, "prompt_attention_mask": enc.attention_mask}
name = "model.decoder.layers.0.fc1.weight"

def weights(module):
    return dict(module.named_parameters())[name].detach().clone()

out = {"settings": {}, "ema": []}
for reuse in (True, False):
    settings = PPOSettings.from_spec(spec.stages.ppo)
    settings.reuse_generation_logprobs = reuse
    settings.max_answer_len = 8
    trainer = PPOTrainer(engine, settings)
    torch.manual_seed(0)
    exp = trainer.generate_experience(batch)
    exp.update(trainer.advantages(exp))
    for micro in range(2):  # gradient accumulation 2: the optimizer steps after the second micro-batch only
        before_actor, before_ema = weights(engine.actor.module), weights(engine.ema.module)
        a, c = trainer.train_rlhf(exp)
        updated = engine.maybe_update_ema()
        actor, ema = weights(engine.actor.module), weights(engine.ema.module)
        beta = pm.ema_beta(0.5, int(engine.actor.global_steps), True)
        out["ema"].append({
            "reuse": reuse, "micro": micro, "updated": updated, "global_steps": int(engine.actor.global_steps),
            "actor_moved": float((actor - before_actor).abs().max()),
            "ema_moved": float((ema - before_ema).abs().max()),
            "ema_err": float((ema - (beta * before_ema + (1 - beta) * actor)).abs().max())})
    out["settings"][str(reuse)] = {"actor_loss": float(a), "critic_loss": float(c),
                                   "actions": int(exp["action_mask"].sum()),
                                   "finite": bool(torch.isfinite(exp["logprobs"]).all())}
print("MECH-RESULT " + json.dumps(out))
"""


def test_both_logprob_settings_train_end_to_end_and_ema_follows_optimizer_steps(repo_root, tmp_path):
    write_stage_outputs(tmp_path)
    code = f"EXAMPLE = {str(repo_root / 'examples/tiny-cpu.yaml')!r}\n" + SCRIPT
    res = run_probe(code, "MECH-RESULT", cwd=tmp_path)
    for reuse in ("True", "False"):
        s = res["settings"][reuse]
        assert s["finite"] and s["actions"] >= 2, (reuse, s)
        assert math_finite(s["actor_loss"]) and 0 < s["critic_loss"] < 1e6, (reuse, s)
    first, second, third, fourth = res["ema"]
    # micro-batch 1 of 2: no optimizer step, the actor and the EMA stay where they are
    assert not first["updated"] and first["global_steps"] == 0 and first["actor_moved"] == 0 == first["ema_moved"]
    # micro-batch 2: one optimizer step, one EMA update with that step's decay
    assert second["updated"] and second["global_steps"] == 1 and second["actor_moved"] > 0
    assert second["ema_moved"] > 0 and second["ema_err"] < 1e-6
    assert not third["updated"] and third["ema_moved"] == 0
    assert fourth["updated"] and fourth["global_steps"] == 2 and fourth["ema_err"] < 1e-6


def math_finite(x: float) -> bool:
    return x == x and abs(x) < 1e3
