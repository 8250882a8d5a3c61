"""The README's "Python API" block, run verbatim in one process (DeepSpeed's init_distributed on gloo, world
size 1) from a directory laid out like after `kuberlhf run examples/tiny-cpu.yaml --output-dir out/tiny`
(tiny random-weight step-1 and step-2 models under out/tiny/). The same run then checks generate_experience's
shortcuts against full forward passes through the engines."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from trainer_stage_helpers import run_probe

REPORT = """
import json, math
import torch
from kuberlhf.rlhf import ppo_math as pm
from kuberlhf.rlhf.trainer import position_ids

# the shortcuts of generate_experience against plain full forwards through the same engines: the actor's
# log-probs taken from generation's logits, the reference's from a LM head run on the answer positions only
torch.manual_seed(1)
exp2 = trainer.generate_experience(prompt_batch)
with torch.no_grad():
    seq2, mask2, act2 = exp2["seq"], exp2["attention_mask"], exp2["action_mask"]
    full = {name: pm.token_logprobs(eng(input_ids=seq2, attention_mask=mask2, position_ids=position_ids(mask2),
                                        use_cache=False).logits, seq2) for name, eng in
            (("logprobs", engine.actor), ("ref_logprobs", engine.ref))}
diffs = {k: float(((exp2[k] - v).abs() * act2).max()) for k, v in full.items()}
print("API-RESULT " + json.dumps({
    "diffs": diffs, "actions2": int(act2.sum()),
    "keys": sorted(exp), "actor_loss": float(actor_loss), "critic_loss": float(critic_loss),
    "batch": int(exp["seq"].shape[0]), "prompt_len": int(prompt_batch["prompt_input_ids"].shape[1]),
    "seq_len": int(exp["seq"].shape[1]), "actions": exp["action_mask"].sum(1).tolist(),
    "left_padded": bool((prompt_batch["prompt_attention_mask"][:, -1] == 1).all()),
    "max_answer_len": trainer.s.max_answer_len, "ema": engine.ema is not None}))
"""


def readme_python_api(repo_root: Path) -> str:
    text = (repo_root / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's Python API section has no ```python block"
    return match.group(1)


def write_stage_outputs(root: Path) -> None:
    from kuberlhf.models import RewardModel, load_tokenizer
    from kuberlhf.models.tiny import TINY_MODEL_NAME, tiny_causal_lm

    tok = load_tokenizer(TINY_MODEL_NAME)
    sft, reward = root / "out/tiny/sft/model", root / "out/tiny/reward/model"
    tiny_causal_lm(1).save_pretrained(sft)
    tok.save_pretrained(sft)
    RewardModel.from_causal_lm_source(TINY_MODEL_NAME, seed=2).save_pretrained(reward, tokenizer=tok)


def test_readme_python_api_runs_in_one_process(repo_root, tmp_path):
    code = readme_python_api(repo_root)
    assert "RLHFEngine(" in code and "generate_experience(" in code and "train_rlhf(" in code
    (tmp_path / "examples").mkdir()
    shutil.copy(repo_root / "examples/tiny-cpu.yaml", tmp_path / "examples/tiny-cpu.yaml")
    write_stage_outputs(tmp_path)
    res = run_probe(code + REPORT, "API-RESULT", cwd=tmp_path)
    assert {"seq", "attention_mask", "action_mask", "logprobs", "ref_logprobs", "values", "scores"} <= \
        set(res["keys"])
    assert res["left_padded"] and res["batch"] == 2 and res["ema"]
    assert res["seq_len"] <= res["prompt_len"] + res["max_answer_len"]
    assert all(1 <= n <= res["max_answer_len"] for n in res["actions"]), res["actions"]
    # a finite clipped-surrogate loss and a positive value loss (the critic starts as a random reward model)
    assert abs(res["actor_loss"]) < 1e3 and 0 < res["critic_loss"] < 1e6
    # generate_experience's log-probs equal full forward passes (fp32: float rounding only)
    assert res["actions2"] >= 2
    assert res["diffs"]["logprobs"] < 1e-4 and res["diffs"]["ref_logprobs"] < 1e-4, res["diffs"]
