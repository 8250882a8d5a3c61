"""The preflight: every check that needs no GPU and no download, on the validated spec. Each bad spec is named
by its field and a fix; the examples and the fixtures pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from kuberlhf.contract.preflight import CHECKS, PreflightError, Problem, check_spec, preflight
from kuberlhf.contract.rules import RULES
from kuberlhf.contract.spec import parse_pipeline, parse_spec

REPO = Path(__file__).resolve().parents[2]


def spec_of(accelerator: str = "cpu", deployment: str = "single_node", data=None, stages=None, **top):
    return parse_spec(
        {
            "deploymentType": deployment,
            "accelerator": accelerator,
            "actor": {"model": "kuberlhf/tiny-opt"},
            "reward": {"model": "kuberlhf/tiny-opt"},
            "data": data or {"datasets": ["kuberlhf/synthetic-pairs"]},
            "storage": {"uri": "s3://bucket/pipelines"},
            "stages": stages or {},
            **top,
        }
    )


DPO = {"algorithm": "dpo", "reward": None}
# (spec arguments, the field the problem names, words of the message or fix)
BAD = [
    ({"stages": {"sft": {"dtype": "fp16"}}}, "spec.stages.sft.dtype", "bf16 or fp32"),
    ({"stages": {"reward": {"dtype": "fp16"}}}, "spec.stages.reward.dtype", "bf16 or fp32"),
    ({"stages": {"ppo": {"dtype": "fp16"}}}, "spec.stages.ppo.dtype", "spec.accelerator to cuda"),
    ({"stages": {"ppo": {"hybridEngine": True}}}, "spec.stages.ppo.hybridEngine", "CUDA"),
    ({"stages": {"sft": {"lora": {"onlyOptimizeLora": True}}}}, "spec.stages.sft.lora.onlyOptimizeLora", "dim > 0"),
    ({"stages": {"reward": {"lora": {"onlyOptimizeLora": True}}}}, "spec.stages.reward.lora.onlyOptimizeLora", "dim"),
    (
        {"stages": {"ppo": {"actorLora": {"onlyOptimizeLora": True}}}},
        "spec.stages.ppo.actorLora.onlyOptimizeLora",
        "dim",
    ),
    (
        {"stages": {"ppo": {"criticLora": {"dim": 0, "onlyOptimizeLora": True}}}},
        "spec.stages.ppo.criticLora.onlyOptimizeLora",
        "dim > 0",
    ),
    ({"stages": {"reward": {"zeroStage": 0, "offload": True}}}, "spec.stages.reward.offload", "zeroStage to 2 or 3"),
    ({"stages": {"ppo": {"actorZeroStage": 0, "offload": True}}}, "spec.stages.ppo.offload", "actorZeroStage"),
    # DeepSpeed-Chat's step-3 refusal, reached through the presets (single_node: ZeRO-2, hybrid engine, no LoRA)
    ({"accelerator": "cuda", "stages": {"ppo": {"offload": True}}}, "spec.stages.ppo", "actorLora"),
    ({"data": {"datasets": ["kuberlhf/synthetic-pairs"], "split": "10,0,0"}}, "spec.data.split", "share"),
    ({"stages": {"ppo": {"ema": {"enabled": False}}}}, "spec.serving.useEma", "ema.enabled"),
    ({"data": {"datasets": ["kuberlhf/no-such-builtin"]}}, "spec.data.datasets[0].name", "kuberlhf/synthetic-pairs"),
    ({"data": {"datasets": [{"path": "s3://Bad_Bucket/x.jsonl"}]}}, "spec.data.datasets[0].path", "bucket"),
    ({"data": {"datasets": [{"path": "s3://bucket"}]}}, "spec.data.datasets[0].path", "no object"),
    ({"data": {"datasets": [{"name": "s3:/bucket/x.jsonl"}]}}, "spec.data.datasets[0].name", "path: s3://"),
    ({"data": {"datasets": [{"path": "gs://bucket/x.jsonl"}]}}, "spec.data.datasets[0].path", "s3://"),
    ({"data": {"datasets": [{"name": "data/pairs/v2"}]}}, "spec.data.datasets[0].name", "./data/pairs/v2"),
    (
        {"data": {"datasets": [{"path": "./p.jsonl", "adapter": "nobody/unknown"}]}},
        "spec.data.datasets[0].adapter",
        "Dahoas/rm-static",
    ),
    (
        {"data": {"datasets": ["kuberlhf/synthetic-pairs"], "unsupervised": "kuberlhf/nope"}},
        "spec.data.unsupervised.name",
        "unknown built-in",
    ),
    ({"actor": {"model": "s3://b/x"}}, "spec.actor.model", "bucket"),
    ({"reward": {"model": "kuberlhf/tiny-gpt"}}, "spec.reward.model", "kuberlhf/tiny-opt"),
    ({"actor": {"model": "s3://models/opt", "revision": "v1"}}, "spec.actor.revision", "hub name"),
    ({"reward": {"model": "./rm", "revision": "main"}}, "spec.reward.revision", "remove"),
    ({"stages": {"ppo": {"rolloutBatchSize": 6}}}, "spec.stages.ppo.rolloutBatchSize", "multiple"),
    # spec.algorithm: the stages of the other algorithms, the reward model, GRPO's group and reward function
    ({**DPO, "stages": {"dpo": {"dtype": "fp16"}}}, "spec.stages.dpo.dtype", "bf16 or fp32"),
    ({**DPO, "stages": {"dpo": {"lora": {"onlyOptimizeLora": True}}}}, "spec.stages.dpo.lora.onlyOptimizeLora", "dim"),
    ({**DPO, "stages": {"reward": {"epochs": 2}}}, "spec.stages.reward", "remove spec.stages.reward"),
    ({"algorithm": "dpo"}, "spec.reward", "remove spec.reward"),
    ({"reward": None}, "spec.reward", "give spec.reward.model"),
    ({"stages": {"dpo": {"beta": 0.5}}}, "spec.stages.dpo", "set spec.algorithm"),
    ({"algorithm": "grpo", "stages": {"grpo": {"dtype": "fp16"}}}, "spec.stages.grpo.dtype", "bf16 or fp32"),
    ({"algorithm": "grpo", "stages": {"grpo": {"hybridEngine": True}}}, "spec.stages.grpo.hybridEngine", "CUDA"),
    (
        {"algorithm": "grpo", "stages": {"grpo": {"actorLora": {"onlyOptimizeLora": True}}}},
        "spec.stages.grpo.actorLora.onlyOptimizeLora",
        "dim",
    ),
    ({"stages": {"grpo": {"groupSize": 8}}}, "spec.stages.grpo", "set spec.algorithm"),
    ({"algorithm": "grpo", "stages": {"grpo": {"groupSize": 1}}}, "spec.stages.grpo.groupSize", "2 or more"),
    (
        {"algorithm": "grpo", "stages": {"grpo": {"ema": {"enabled": False}}}},
        "spec.serving.useEma",
        "spec.stages.grpo.ema.enabled",
    ),
    (
        {"algorithm": "grpo", "reward": None, "stages": {"grpo": {"rewardFunction": "s3://Bad_Bucket/r.py:score"}}},
        "spec.stages.grpo.rewardFunction",
        "bucket",
    ),
]


@pytest.mark.parametrize(("kwargs", "field", "words"), BAD)
def test_each_check_names_the_field_and_the_fix(kwargs, field, words) -> None:
    problems = preflight(spec_of(**kwargs))
    assert [p.field for p in problems] == [field], problems
    assert words in str(problems[0])
    with pytest.raises(PreflightError) as err:
        check_spec(spec_of(**kwargs))
    assert field in str(err.value) and "fix:" in str(err.value)


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        ("no_such_module_xyz:score", "cannot import 'no_such_module_xyz' (ModuleNotFoundError"),
        ("posixpath:no_such_function", "'posixpath' has no function 'no_such_function'"),
        ("/nowhere/rewards.py:score", "/nowhere/rewards.py does not exist here"),
    ],
)
def test_a_reward_function_that_does_not_import_is_refused_where_it_runs(ref, words) -> None:
    """Where the stage runs (``kuberlhf run``, the stage pod: local=True) the function must import and exist; the
    operator (local=False) cannot import a module only the trainer image holds, so it leaves that to the stage."""
    spec = spec_of(algorithm="grpo", reward=None, stages={"grpo": {"rewardFunction": ref}})
    with pytest.raises(PreflightError) as err:
        check_spec(spec, local=True)
    assert [p.field for p in err.value.problems] == ["spec.stages.grpo.rewardFunction"], err.value
    assert words in str(err.value) and "fix: give 'module:function' importable in the trainer image" in str(err.value)
    assert preflight(spec, local=False) == []


def test_examples_and_good_specs_pass() -> None:
    for path in sorted((REPO / "examples").glob("*.yaml")):
        if "kind: RLHFPipeline" in path.read_text():
            assert preflight(parse_pipeline(path.read_text()).spec) == [], path
    # only the resolved value counts: fp16 on GPUs, a whole bucket as storage, LoRA-only with a rank
    assert (
        preflight(
            spec_of(
                "cuda",
                stages={"sft": {"dtype": "fp16", "lora": {"dim": 8, "onlyOptimizeLora": True}}},
                storage={"uri": "s3://bucket"},
            )
        )
        == []
    )
    assert preflight(spec_of(actor={"model": "facebook/opt-1.3b", "revision": "main"})) == []
    # step 1 may take all of its data from sftOnly
    assert (
        preflight(
            spec_of(
                data={
                    "datasets": ["kuberlhf/synthetic-pairs"],
                    "split": "0,5,5",
                    "sftOnly": ["kuberlhf/synthetic-pairs"],
                }
            )
        )
        == []
    )


def test_local_paths_are_checked_only_where_they_are_read(tmp_path: Path, monkeypatch) -> None:
    missing = {"data": {"datasets": [{"path": str(tmp_path / "nope.jsonl")}]}, "actor": {"model": "./no-model"}}
    assert preflight(spec_of(**missing)) == []  # the operator: the paths are inside the pods
    fields = [p.field for p in preflight(spec_of(**missing), local=True)]
    assert fields == ["spec.data.datasets[0].path", "spec.actor.model"]
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert preflight(spec_of(data={"datasets": ["./pairs.jsonl"]}), local=True) == []


def test_problems_are_not_repeated_and_checks_extend() -> None:
    # actor and critic share spec.stages.ppo.offload: one problem, not two
    spec = spec_of(stages={"ppo": {"actorZeroStage": 0, "criticZeroStage": 0, "offload": True}})
    assert [p.field for p in preflight(spec)] == ["spec.stages.ppo.offload"] * 2  # one per zero field
    assert len({str(p) for p in preflight(spec)}) == 2

    def no_big_batches(spec, options):
        if spec.stages.sft.per_device_batch_size > 2:
            yield Problem("spec.stages.sft.perDeviceBatchSize", "too big", "lower it")

    assert [p.field for p in preflight(spec_of(), checks=(*CHECKS, no_big_batches))] == [
        "spec.stages.sft.perDeviceBatchSize"
    ]


def test_every_rule_is_exercised_and_has_one_message() -> None:
    named = {field for _, field, _ in BAD}
    for rule in RULES:
        assert rule.field in named, f"no bad spec in BAD exercises {rule.field}"
        assert rule.text == f"{rule.field}: {rule.message}; fix: {rule.fix}"
