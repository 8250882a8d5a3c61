"""The memory planner: model shapes against the real transformers classes, model states against DeepSpeed's own
estimators, the examples against the hardware their comments claim, and ``kuberlhf plan``'s table and exit
status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kuberlhf.contract.spec import parse_pipeline
from kuberlhf.planner.check import memory_problems, offline_shapes, plan_problems
from kuberlhf.planner.estimate import GiB, activation_bytes, estimate_pipeline, model_states, parse_quantity
from kuberlhf.planner.shapes import KNOWN_CONFIGS, ShapeError, read_model_shape, shape_from_config

REPO = Path(__file__).resolve().parents[2]


def real_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("name", list(KNOWN_CONFIGS))
def test_known_opt_configs_count_what_transformers_builds(name):
    """Each known OPT config, built by transformers on the meta device (no memory), has exactly the planner's
    parameter count (opt-1.3b: 1.316 B, opt-66b: 65.7 B)."""
    from transformers import AutoModel, OPTConfig, OPTForCausalLM

    cfg = OPTConfig(**KNOWN_CONFIGS[name])
    shape = shape_from_config(KNOWN_CONFIGS[name])
    with torch.device("meta"):
        model = OPTForCausalLM(cfg)
        assert real_params(model) == shape.causal_lm_params
        assert real_params(AutoModel.from_config(cfg)) == shape.backbone_params
    assert max(p.numel() for p in model.parameters()) == shape.largest_layer_params


@pytest.mark.parametrize("arch", ["llama", "gpt2", "tiny-opt"])
def test_other_architectures_count_what_transformers_builds(arch, tmp_path):
    """config.json of a Llama (gated MLP, GQA, untied head), a GPT-2 and the shipped tiny OPT, read from a local
    hub-layout directory."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if arch == "tiny-opt":
        shape = read_model_shape("kuberlhf/tiny-opt", "spec.actor.model")
        from kuberlhf.models.tiny import tiny_config

        config = tiny_config()
    else:
        config = {
            "llama": LlamaConfig(
                vocab_size=1000,
                hidden_size=64,
                intermediate_size=176,
                num_hidden_layers=3,
                num_attention_heads=8,
                num_key_value_heads=2,
                tie_word_embeddings=False,
            ),
            "gpt2": GPT2Config(vocab_size=1000, n_embd=64, n_layer=3, n_head=4, n_positions=128),
        }[arch]
        config.save_pretrained(tmp_path)
        shape = read_model_shape(str(tmp_path), "spec.actor.model")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if arch == "gpt2":  # GPT-2 has learned positions and no OPT-style extra 2; the planner ignores positions there
        assert abs(real_params(model) - shape.causal_lm_params) <= 128 * 64
    else:
        assert real_params(model) == shape.causal_lm_params


def test_an_unreadable_hub_name_that_is_not_known_is_an_error_naming_the_field():
    with pytest.raises(ShapeError, match="spec.actor.model=someorg/unknown-7b"):
        read_model_shape("someorg/unknown-7b", "spec.actor.model")


def test_a_hub_name_is_read_from_the_local_hub_cache_and_an_unresolvable_hub_costs_no_retries(tmp_path, monkeypatch):
    """A config.json in the hub cache (the hub's own layout) is read offline; with the cache empty and the hub's
    host unresolvable, the planner falls back to its known configs at once instead of huggingface_hub's five
    retries with backoff (~31 s per model, measured)."""
    import time

    from huggingface_hub import constants

    config = dict(KNOWN_CONFIGS["facebook/opt-1.3b"], num_hidden_layers=3)
    snapshot = tmp_path / "models--someorg--opt-3l" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (tmp_path / "models--someorg--opt-3l" / "refs").mkdir()
    (tmp_path / "models--someorg--opt-3l" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert read_model_shape("someorg/opt-3l", "spec.actor.model").num_layers == 3

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://no-such-hub.invalid")
    t0 = time.monotonic()
    assert read_model_shape("facebook/opt-13b", "spec.actor.model").source == "known OPT config"
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("n_params", [125_000_000, 1_300_000_000, 13_000_000_000, 66_000_000_000])
@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (1, 8), (8, 8)])
@pytest.mark.parametrize("offload", [False, True])
def test_model_states_match_deepspeeds_estimators(n_params, nodes, gpus, offload):
    """Mixed-precision model states per GPU at ZeRO-2 and ZeRO-3 against DeepSpeed's
    estimate_zero2/3_model_states_mem_needs (the functions behind estimate_zero*_all_live)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    largest = n_params // 50
    world = nodes * gpus
    _, ds2 = estimate_zero2_model_states_mem_needs(n_params, gpus, nodes, cpu_offload=offload)
    ours2 = model_states(n_params, largest, world, 2, "bf16", offload).gpu
    _, ds3, _ = estimate_zero3_model_states_mem_needs(
        n_params, largest, gpus, nodes, cpu_offload=offload, cpu_offload_params=offload
    )
    ours3 = model_states(n_params, largest, world, 3, "bf16", offload).gpu
    assert ours2 == pytest.approx(ds2, rel=0.01)
    assert ours3 == pytest.approx(ds3, rel=0.01)


def test_lora_keeps_states_for_the_adapters_only_and_checkpointing_cuts_activations():
    full = model_states(1_000_000_000, 10**7, 1, 0, "bf16")
    lora = model_states(1_000_000_000, 10**7, 1, 0, "bf16", trainable=10_000_000)
    assert full.weights == lora.weights == 2 * 10**9
    assert lora.gradients + lora.optimizer == pytest.approx((full.gradients + full.optimizer) / 100, rel=0.01)
    shape = shape_from_config(KNOWN_CONFIGS["facebook/opt-1.3b"])
    with_gc = activation_bytes(shape, 8, 512, "bf16", True, lm_head=False)
    without = activation_bytes(shape, 8, 512, "bf16", False, lm_head=False)
    assert with_gc < without / 5


def example(name: str, **spec_changes) -> object:
    doc = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    for path, value in spec_changes.items():
        node = doc["spec"]
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_pipeline(doc).spec


@pytest.mark.parametrize(
    ("name", "gpus", "gib"),
    [("opt-1.3b-single-gpu", 1, 48), ("opt-13b-single-node", 8, 40), ("opt-66b-multi-node", 64, 80)],
)
def test_each_example_fits_the_hardware_its_comment_claims(name, gpus, gib):
    """DeepSpeed-Chat's published settings: 1.3B on 1x A6000-48G, 13B on 8x A100-40G, 66B on 8 x 8 A100-80G."""
    spec = example(name)
    assert parse_quantity(spec.gpu_memory) == gib * GiB
    shapes = offline_shapes(spec)
    plan = estimate_pipeline(spec, shapes)
    for est in plan.stages:
        assert est.fits, (est.stage, est.per_gpu_bytes / GiB)
    assert plan.stage("ppo").world == gpus
    assert not memory_problems(spec, None)


def test_66b_at_zero0_on_one_node_is_refused_naming_stage_estimate_and_fix():
    spec = example(
        "opt-66b-multi-node",
        **{
            "stages.sft.nodes": 1,
            "stages.sft.zeroStage": 0,
            "stages.ppo.nodes": 1,
            "stages.ppo.actorZeroStage": 0,
            "stages.ppo.criticZeroStage": 0,
        },
    )
    problems = plan_problems(spec, offline_shapes(spec))
    by_field = {p.field: p for p in problems}
    assert {"spec.stages.sft", "spec.stages.ppo"} <= set(by_field)
    sft = by_field["spec.stages.sft"]
    assert "does not fit" in sft.message and "GiB per GPU" in sft.message and "80.0 GiB" in sft.message
    # 66 B parameters at 20 bytes each on every GPU: about 1.2 TiB
    assert "1224" in sft.message or "122" in sft.message
    assert "zeroStage: 3" in sft.fix and ("nodes" in sft.fix or "offload: true" in sft.fix)


def test_offload_beyond_the_pods_memory_limit_is_refused_naming_the_limit_and_the_fix():
    """CPU offload puts optimizer states (and at ZeRO-3 parameters, and offloaded frozen models) in host memory:
    a pod memory limit below that is refused naming spec.stages.<stage>.resources.limits.memory, with the limit
    that fits; turning offload off is offered only when the GPUs hold the stage without it. No limit: nothing
    to check."""
    from kuberlhf.planner.check import host_problem

    tight = {"stages.ppo.resources": {"limits": {"memory": "32Gi"}}}
    spec = example("opt-13b-single-node", **tight)
    shapes = offline_shapes(spec)
    est = estimate_pipeline(spec, shapes).stage("ppo")
    assert est.cpu_offload_bytes_per_node > 40 * GiB  # the offloaded reference and EMA copies of OPT-13B
    problems = plan_problems(spec, shapes)
    assert [p.field for p in problems] == ["spec.stages.ppo.resources.limits.memory"], problems
    need = -(-est.host_bytes_per_pod // GiB)
    assert "32Gi is less than" in problems[0].message and f"{est.host_bytes_per_pod / GiB:.1f} GiB per pod" in (
        problems[0].message)
    assert problems[0].fix == f"set spec.stages.ppo.resources.limits.memory: {need}Gi or more"  # the reference
    # offload is needed on 40 GiB GPUs, so turning it off is not offered
    fixed = example("opt-13b-single-node", **{"stages.ppo.resources": {"limits": {"memory": f"{need}Gi"}}})
    assert not plan_problems(fixed, shapes)
    assert not plan_problems(example("opt-13b-single-node", **{"stages.ppo.resources": {}}), shapes)

    sft = example("opt-13b-single-node", **{"stages.sft.offload": True,
                                            "stages.sft.resources": {"limits": {"memory": "64Gi"}}})
    problem = host_problem(sft, shapes, estimate_pipeline(sft, shapes).stage("sft"))
    assert problem.field == "spec.stages.sft.resources.limits.memory"
    assert "or turn CPU offload off (the GPUs hold it:" in problem.fix


def test_gpu_memory_default_and_quantities():
    spec = example("opt-13b-single-node", gpuMemory=None)
    from kuberlhf.planner.estimate import gpu_memory_bytes

    assert gpu_memory_bytes(spec) == 80 * GiB  # the cuda default
    assert gpu_memory_bytes(example("tiny-cpu")) is None  # the CPU accelerator is not checked
    assert parse_quantity("40G") == 40 * 10**9 and parse_quantity("49140Mi") == 49140 * 2**20


def test_kuberlhf_plan_prints_the_table_and_exits_nonzero_when_a_stage_does_not_fit(tmp_path):
    from typer.testing import CliRunner

    from kuberlhf.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["plan", str(REPO / "examples" / "opt-13b-single-node.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "TOTAL per GPU" in ok.output and "yes on 1 x 8 x 40.0 GiB" in ok.output
    assert "known OPT config" in ok.output
    doc = yaml.safe_load((REPO / "examples" / "opt-66b-multi-node.yaml").read_text())
    doc["spec"]["stages"]["sft"].update(nodes=1, zeroStage=0)
    bad = tmp_path / "66b-zero0.yaml"
    bad.write_text(yaml.safe_dump(doc))
    refused = runner.invoke(app, ["plan", str(bad)])
    assert refused.exit_code == 1, refused.output
    assert "NO on 1 x 8 x 80.0 GiB" in refused.output and "spec.stages.sft: does not fit" in refused.output


@pytest.mark.parametrize("name", ["opt-1.3b-single-gpu", "opt-13b-single-node", "opt-66b-multi-node"])
def test_docs_print_the_current_plan_of_each_example(name, monkeypatch):
    """docs/kubernetes.md shows `kuberlhf plan` of every GPU example; it must be what the planner prints now."""
    from typer.testing import CliRunner

    from kuberlhf.cli import app

    monkeypatch.chdir(REPO)  # the docs show the command as run from the repository root
    out = CliRunner().invoke(app, ["plan", f"examples/{name}.yaml"]).output
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    assert f"$ kuberlhf plan examples/{name}.yaml\n{out.rstrip()}\n```" in doc, "regenerate the plans in the docs"


def test_a_reward_model_started_from_sft_is_planned_with_the_actors_shape():
    """stages.reward.initFromSft: no spec.reward; the reward stage's row has the actor's shape and source
    sft/model."""
    spec = example("opt-1.3b-single-gpu", reward=None, **{"stages.reward.initFromSft": True})
    shapes = offline_shapes(spec)
    assert shapes["reward"] == shapes["actor"] == shape_from_config(KNOWN_CONFIGS["facebook/opt-1.3b"], "known OPT config")
    plan = estimate_pipeline(spec, shapes)
    (row,) = plan.stage("reward").models
    assert row.source == "sft/model"
    base = estimate_pipeline(example("opt-1.3b-single-gpu"), offline_shapes(example("opt-1.3b-single-gpu")))
    assert row.params > base.stage("reward").models[0].params  # opt-1.3b's backbone, not opt-350m's
    # and checked as such: a 1.3B reward model (and ppo's critic from it) does not fit the preset's 48G GPU where
    # opt-350m's did
    assert not plan_problems(example("opt-1.3b-single-gpu"), offline_shapes(example("opt-1.3b-single-gpu")))
    assert [p.field for p in plan_problems(spec, shapes, plan)] == ["spec.stages.reward", "spec.stages.ppo"]


def _grpo(**changes):
    """The 1.3B single-GPU example as a grpo pipeline (reward model kept unless rewardFunction is set)."""
    doc = yaml.safe_load((REPO / "examples" / "opt-1.3b-single-gpu.yaml").read_text())
    doc["spec"]["algorithm"] = "grpo"
    doc["spec"]["stages"].pop("ppo", None)
    for path, value in changes.items():
        node = doc["spec"]
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return parse_pipeline(doc).spec


def test_grpo_plan_counts_its_groups_and_has_no_critic():
    shape = shape_from_config(KNOWN_CONFIGS["facebook/opt-1.3b"])
    base = {"stages.grpo.generationBatchSize": 2, "stages.grpo.maxPromptLen": 256, "stages.grpo.maxAnswerLen": 256,
            "stages.grpo.dtype": "bf16"}
    g1 = _grpo(**base, **{"stages.grpo.groupSize": 2})
    g8 = _grpo(**base, **{"stages.grpo.groupSize": 8})
    e1, e8 = (estimate_pipeline(s, offline_shapes(s)).stage("grpo") for s in (g1, g8))
    assert [m.role for m in e1.models] == ["actor", "reference", "ema", "reward"]  # no critic
    # generation holds the KV cache and the answer logits of groupSize answers per prompt: 4 x the groups, 4 x it
    from kuberlhf.planner.estimate import kv_cache_bytes

    per_answer = kv_cache_bytes(shape, 1, 512, "bf16") + 4 * 256 * shape.vocab_size
    assert e8.working["generation"] - e1.working["generation"] == 6 * 2 * per_answer
    # a reward function instead of the reward model: no reward model row, nothing of it downloaded
    fn = _grpo(**base, reward=None, **{"stages.reward": None, "stages.grpo.rewardFunction": "rewards:score"})
    ef = estimate_pipeline(fn, offline_shapes(fn)).stage("grpo")
    assert [m.role for m in ef.models] == ["actor", "reference", "ema"]
    assert ef.download_bytes < e1.download_bytes and ef.states_bytes < e1.states_bytes


def test_grpo_that_does_not_fit_is_refused_naming_its_stage_and_fields():
    spec = _grpo(reward=None, gpuMemory="16Gi", **{"stages.reward": None, "stages.grpo.rewardFunction": "rewards:score",
                                                    "stages.grpo.groupSize": 8, "stages.grpo.actorZeroStage": 0})
    problems = {p.field: p for p in plan_problems(spec, offline_shapes(spec))}
    grpo = problems["spec.stages.grpo"]
    assert "does not fit" in grpo.message and "16.0 GiB" in grpo.message
    # 16 prompts x 8 answers decoded together: only fewer prompts per batch make it fit (grpo has no critic, and no
    # reward model with a rewardFunction: the fix names neither)
    assert "spec.stages.grpo.actorZeroStage: 3" in grpo.fix and "spec.stages.grpo.generationBatchSize: 1" in grpo.fix
    assert "criticZeroStage" not in grpo.fix and "rewardZeroStage" not in grpo.fix


def test_rollout_batch_size_default_is_the_largest_that_fits_up_to_four_updates():
    """rolloutBatchSize unset: the planner picks the largest multiple of generationBatchSize whose step-3
    estimate (KV cache and logits of that many sequences) fits spec.gpuMemory, at most 4 updates per rollout;
    the CPU accelerator keeps the coupled loop; a value in the spec wins."""
    from kuberlhf.planner.rollout import MAX_UPDATES_PER_ROLLOUT, planned_rollout_batch_size

    def ppo_fits(spec, rollout):
        trial = spec.model_copy(deep=True)
        trial.stages.ppo.rollout_batch_size = rollout
        return estimate_pipeline(trial, offline_shapes(trial)).stage("ppo").fits

    spec = example("opt-1.3b-single-gpu")  # 48 GiB: three generation batches fit, four do not
    gen_bs = spec.stages.ppo.generation_batch_size
    shapes = offline_shapes(spec)
    planned = planned_rollout_batch_size(spec, shapes)
    assert planned == 3 * gen_bs and ppo_fits(spec, planned) and not ppo_fits(spec, planned + gen_bs)
    roomy = example("opt-1.3b-single-gpu", gpuMemory="80Gi")
    assert planned_rollout_batch_size(roomy, shapes) == MAX_UPDATES_PER_ROLLOUT * gen_bs  # the cap
    assert ppo_fits(roomy, (MAX_UPDATES_PER_ROLLOUT + 1) * gen_bs)
    assert planned_rollout_batch_size(example("tiny-cpu"), offline_shapes(example("tiny-cpu"))) == 8
    assert planned_rollout_batch_size(spec, None) == gen_bs  # a model the planner cannot size
    explicit = example("opt-1.3b-single-gpu", **{"stages.ppo.rolloutBatchSize": gen_bs})
    assert planned_rollout_batch_size(explicit, shapes) == gen_bs


def test_parameter_counts_read_as_people_write_them():
    """The plan table's params column: a tiny model is thousands of parameters, not "0.00B"."""
    from kuberlhf.planner.table import params_text

    assert [params_text(n) for n in (1_315_758_080, 331_196_416, 125_239_296, 41_024, 512)] == [
        "1.32B", "331.2M", "125.2M", "41.0K", "512"]
