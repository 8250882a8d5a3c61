"""A one-rank fp32 stage runs ZeRO 1/2 as ZeRO 0 (ds_config.effective_zero_stage), and a checkpoint an earlier
release wrote at ZeRO 2 on one rank resumes into it (training.zero_resume): the resumed step lands where the
uninterrupted ZeRO 2 run's does. Real DeepSpeed engines on gloo, world size 1, in a subprocess (the process group and
DeepSpeed's globals stay out of the test process)."""

from __future__ import annotations

import pytest
from trainer_stage_helpers import run_probe

from kuberlhf.training.ds_config import TrainSettings, train_ds_config

SCRIPT = """
import copy, json, sys, tempfile
from pathlib import Path
import torch
from kuberlhf.models.tiny import tiny_causal_lm
from kuberlhf.training.checkpoint import load_engines, save_engines
from kuberlhf.training.distributed import init_distributed
from kuberlhf.training.ds_config import TrainSettings, train_ds_config
from kuberlhf.training.loop import ds_initialize, make_optimizer, make_scheduler
from kuberlhf.training.zero_resume import CheckpointLayoutError

init_distributed("cpu")
zero0 = train_ds_config(TrainSettings(field="spec.stages.sft", accelerator="cpu", world_size=1, micro_batch=4,
                                      grad_accum=1, zero_stage=2, dtype="fp32"))
zero2 = copy.deepcopy(zero0)
zero2["zero_optimization"]["stage"] = 2  # what an earlier release ran on one rank

def build(config):
    model = tiny_causal_lm(7)
    opt = make_optimizer(model, 1e-2, 0.1, offload=False)  # weight decay: two parameter groups
    return ds_initialize(model, config, opt, make_scheduler(opt, "cosine", 1, 10))

ids = torch.randint(2, 512, (4, 24), generator=torch.Generator().manual_seed(0))

def train(engine, steps):
    for _ in range(steps):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

out = {"stages": [zero0["zero_optimization"]["stage"]]}
with tempfile.TemporaryDirectory() as d:
    old = build(zero2)
    out["stages"].append(old.zero_optimization_stage())
    train(old, 2)
    save_engines({"model": old}, Path(d), 2, 0, {})
    train(old, 1)  # the uninterrupted run's third step
    new = build(zero0)
    load_engines({"model": new}, Path(d), 2, 0)
    out["resumed"] = {"global_steps": new.global_steps}
    train(new, 1)
    a, b = dict(old.module.named_parameters()), dict(new.module.named_parameters())
    out["max_param_diff"] = max(float((a[n] - b[n]).abs().max()) for n in a)
    out["lr"] = [old.get_lr()[0], new.get_lr()[0]]
    # the other way round (an older release resuming a ZeRO 0 checkpoint at ZeRO 2) is refused naming the fix
    save_engines({"model": new}, Path(d), 3, 0, {})
    try:
        load_engines({"model": build(zero2)}, Path(d), 3, 0)
        out["refused"] = None
    except CheckpointLayoutError as e:
        out["refused"] = str(e)
print("RESUME-RESULT " + json.dumps(out))
"""


def settings(**kw):
    base = dict(
        field="spec.stages.sft",
        accelerator="cpu",
        world_size=1,
        micro_batch=4,
        grad_accum=1,
        zero_stage=2,
        dtype="fp32",
    )
    return TrainSettings(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "stage"),
    [
        ({}, 0),
        ({"zero_stage": 1}, 0),
        ({"zero_stage": 3}, 3),
        ({"world_size": 2}, 2),
        ({"dtype": "bf16"}, 2),
        ({"offload": True}, 2),
    ],
)
def test_only_a_one_rank_fp32_stage_without_offload_runs_zero_1_2_as_zero_0(kw, stage) -> None:
    assert train_ds_config(settings(**kw))["zero_optimization"]["stage"] == stage


def test_a_one_rank_zero2_checkpoint_resumes_into_zero0_and_trains_on_the_same() -> None:
    res = run_probe(SCRIPT, "RESUME-RESULT")
    assert res["stages"] == [0, 2]
    assert res["resumed"]["global_steps"] == 2
    assert res["lr"][0] == pytest.approx(res["lr"][1])
    # a step at lr 1e-2 moves weights by ~1e-2; without Adam's restored moments it would land elsewhere by as much
    assert res["max_param_diff"] < 1e-5, res
    assert "ZeRO 0" in res["refused"] and "resume it on one rank" in res["refused"], res
