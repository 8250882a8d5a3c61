"""The DeepSpeed config builder: pure spec -> dict, and clear errors for combinations that cannot run."""

from __future__ import annotations

import pytest

from kuberlhf.contract.spec import parse_pipeline
from kuberlhf.training.ds_config import DSConfigError, TrainSettings, eval_ds_config, stage_settings, train_ds_config


def pipeline(accelerator="cpu", **stages):
    return parse_pipeline({
        "metadata": {"name": "p"},
        "spec": {"accelerator": accelerator, "deploymentType": "single_node",
                 "actor": {"model": "kuberlhf/tiny-opt"}, "reward": {"model": "kuberlhf/tiny-opt"},
                 "data": {"datasets": ["kuberlhf/synthetic-pairs"]}, "storage": {"uri": "file:///tmp/x"},
                 "stages": stages},
    }).spec


def settings(**kw):
    base = dict(field="spec.stages.sft", accelerator="cpu", world_size=2, micro_batch=4, grad_accum=2,
                zero_stage=2, dtype="bf16")
    return TrainSettings(**{**base, **kw})


def test_train_config_batch_sizes_zero_and_precision():
    cfg = train_ds_config(settings())
    assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert "offload_optimizer" not in cfg["zero_optimization"] and "hybrid_engine" not in cfg
    assert "bf16" not in train_ds_config(settings(dtype="fp32"))


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_all_zero_stages(zero):
    assert train_ds_config(settings(zero_stage=zero))["zero_optimization"]["stage"] == zero


def test_offload_and_gpu_only_features():
    z3 = train_ds_config(settings(zero_stage=3, offload=True))["zero_optimization"]
    assert z3["offload_optimizer"] == {"device": "cpu"} and z3["offload_param"] == {"device": "cpu"}
    z2 = train_ds_config(settings(zero_stage=2, offload=True))["zero_optimization"]
    assert "offload_param" not in z2
    gpu = train_ds_config(settings(accelerator="cuda", dtype="fp16", hybrid_engine=True, max_out_tokens=64))
    assert gpu["fp16"]["enabled"] and gpu["hybrid_engine"]["enabled"] and gpu["hybrid_engine"]["max_out_tokens"] == 64


def test_eval_config_shards_only_at_zero3():
    assert eval_ds_config(settings(zero_stage=2))["zero_optimization"]["stage"] == 0
    assert eval_ds_config(settings(zero_stage=3))["zero_optimization"]["stage"] == 3
    # DeepSpeed's memory-efficient linear replaces torch.nn.functional.linear process-wide: the trained and the
    # frozen models of a stage ask for the same
    assert eval_ds_config(settings(zero_stage=3))["zero_optimization"]["memory_efficient_linear"] is True
    assert train_ds_config(settings(zero_stage=3))["zero_optimization"]["memory_efficient_linear"] is True


def test_frozen_model_offload_is_its_own_switch():
    """offloadReferenceModel / offloadRewardModel (DeepSpeed-Chat's) move a frozen ZeRO-3 model's partitions to
    CPU memory whatever the trained twin does; at ZeRO-0 there is nothing to offload."""
    assert eval_ds_config(settings(zero_stage=3), offload=True)["zero_optimization"]["offload_param"] == {
        "device": "cpu"}
    assert "offload_param" not in eval_ds_config(settings(zero_stage=3, offload=True), offload=False)[
        "zero_optimization"]
    assert "offload_param" not in eval_ds_config(settings(zero_stage=2), offload=True)["zero_optimization"]


@pytest.mark.parametrize(("kw", "needles"), [
    ({"zero_stage": 4}, ["spec.stages.sft.zeroStage", "0, 1, 2 or 3"]),
    ({"micro_batch": 0}, ["spec.stages.sft", "perDeviceBatchSize"]),
    ({"offload": True, "zero_stage": 0}, ["spec.stages.sft.offload", "zeroStage", "2 or 3"]),
])
def test_clear_errors(kw, needles):
    with pytest.raises(DSConfigError) as err:
        train_ds_config(settings(**kw))
    for needle in needles:
        assert needle in str(err.value)


def test_stage_settings_from_spec():
    spec = pipeline(ppo={"actorZeroStage": 3, "criticZeroStage": 2, "perDeviceBatchSize": 2})
    actor = stage_settings(spec, "ppo", world_size=2, role="actor")
    critic = stage_settings(spec, "ppo", world_size=2, role="critic")
    assert (actor.zero_stage, critic.zero_stage, actor.micro_batch) == (3, 2, 2)
    assert actor.hybrid_engine is False  # presets turn the hybrid engine off on CPU
    with pytest.raises(DSConfigError, match="spec.stages.reward.offload"):
        train_ds_config(stage_settings(pipeline(reward={"zeroStage": 0, "offload": True}), "reward", 1))


def test_stage_settings_have_no_fallbacks_of_their_own():
    """Unset preset-governed fields are an error, not a silent code-level default."""
    spec = pipeline()
    spec.stages.sft.zero_stage = None
    with pytest.raises(DSConfigError, match="spec.stages.sft.zeroStage is unset"):
        stage_settings(spec, "sft", 1)


def test_buckets_sized_to_the_model_and_explicit_values_kept():
    from kuberlhf.training.ds_config import DEEPSPEED_DEFAULT_BUCKET, DEEPSPEED_DEFAULT_SUB_GROUP, sized_buckets

    z3 = sized_buckets(train_ds_config(settings(zero_stage=3)), 768)["zero_optimization"]
    assert z3["reduce_bucket_size"] == 768**2 and "allgather_bucket_size" not in z3
    assert z3["sub_group_size"] == 16 * 768**2  # OPT-125m: ~9.4 M-element optimizer sub-groups
    z2 = sized_buckets(train_ds_config(settings(zero_stage=2)), 768)["zero_optimization"]
    assert z2["reduce_bucket_size"] == z2["allgather_bucket_size"] == 768**2 and "sub_group_size" not in z2
    big = sized_buckets(train_ds_config(settings(zero_stage=3)), 30_000)["zero_optimization"]
    # never above DeepSpeed's defaults
    assert (big["reduce_bucket_size"], big["sub_group_size"]) == (DEEPSPEED_DEFAULT_BUCKET, DEEPSPEED_DEFAULT_SUB_GROUP)
    explicit = train_ds_config(settings(zero_stage=3))
    explicit["zero_optimization"]["reduce_bucket_size"] = 123
    assert sized_buckets(explicit, 768)["zero_optimization"]["reduce_bucket_size"] == 123
    z0 = train_ds_config(settings(zero_stage=0))
    assert sized_buckets(z0, 768) == z0
