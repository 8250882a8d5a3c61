"""bench/quality_algorithms.py: each algorithm's quality-suite manifest is a valid pipeline of that algorithm's
graph that passes the preflight, and all of them share the ppo manifest's SFT stage (the same fingerprint, so
`kuberlhf run` in the task's output directory reuses the SFT model instead of training it again); grpo samples
as many answers per step as ppo. Pure: no stage runs."""

from __future__ import annotations

import sys

import pytest

from kuberlhf.contract.preflight import preflight
from kuberlhf.contract.spec import parse_pipeline
from kuberlhf.runner.local import stage_fingerprints


@pytest.fixture(scope="module")
def bench(repo_root):
    sys.path.insert(0, str(repo_root / "bench"))
    try:
        import quality_algorithms
        import quality_tasks
        import rlhf_quality

        yield quality_algorithms, quality_tasks, rlhf_quality
    finally:
        sys.path.remove(str(repo_root / "bench"))


@pytest.mark.parametrize("quick", [False, True])
def test_every_algorithm_shares_the_sft_stage_and_runs_its_own_graph(bench, tmp_path, quick):
    qa, qt, rq = bench
    task = qt.TASKS["style"]
    data = qt.write_task_data(task, tmp_path)
    base = rq.manifest_for(task, data, quick)
    graphs = {
        "ppo": ["sft", "reward", "ppo"],
        "dpo": ["sft", "dpo"],
        "grpo": ["sft", "reward", "grpo"],
        "grpo-code": ["sft", "grpo"],
    }
    prints = {}
    for algorithm in qa.ALGORITHMS:
        doc = rq.algorithm_manifest(task, data, quick, algorithm)
        pipeline = parse_pipeline(doc)
        assert [s.value for s in pipeline.spec.stage_graph] == qa.graph(doc) == graphs[algorithm]
        assert not preflight(pipeline.spec), algorithm
        prints[algorithm] = stage_fingerprints(pipeline)
    assert len({p["sft"] for p in prints.values()}) == 1, prints
    assert prints["grpo"]["reward"] == prints["ppo"]["reward"]  # grpo is scored by ppo's reward model
    ppo = base["spec"]["stages"]["ppo"]
    for algorithm in ("grpo", "grpo-code"):
        grpo = qa.manifest_for_algorithm(base, algorithm, task.true_reward_ref)["spec"]["stages"]["grpo"]
        assert grpo["generationBatchSize"] * grpo["groupSize"] == ppo["generationBatchSize"]
        assert grpo["maxSteps"] == ppo["maxSteps"]
    code = qa.manifest_for_algorithm(base, "grpo-code", task.true_reward_ref)["spec"]
    assert code["stages"]["grpo"]["rewardFunction"] == "quality_tasks:style_reward" and "reward" not in code
    # DPO runs as long as step 2 would in the full suite; the quick suite's 15-step reward model does not cut
    # the quick DPO to 15 steps
    dpo = rq.algorithm_manifest(task, data, quick, "dpo")["spec"]["stages"]["dpo"]
    reward = base["spec"]["stages"]["reward"]
    if quick:
        assert dpo["epochs"] == rq.QUICK_DPO["epochs"] and "maxSteps" not in dpo, dpo
    else:
        assert (dpo["epochs"], dpo.get("maxSteps")) == (reward["epochs"], reward.get("maxSteps")), dpo


def test_one_rank_keeps_the_global_batch_and_set_changes_every_task_alike(bench, tmp_path):
    """The suite's stages run on one rank with the example's global batch (the same updates), and ``--set`` is
    one recipe change applied to every task's manifest, never a per-task one."""
    _, qt, rq = bench
    overrides = rq.parse_overrides(["stages.ppo.actorLearningRate=3e-4", "stages.ppo.ema={enabled: true}"])
    assert overrides == {"stages.ppo.actorLearningRate": 3e-4, "stages.ppo.ema": {"enabled": True}}
    example = rq.yaml.safe_load(rq.EXAMPLE.read_text())["spec"]["stages"]
    ppo_of = {}
    for name, task in qt.TASKS.items():
        data = qt.write_task_data(task, tmp_path / name, n_pairs=4)
        two = rq.manifest_for(task, data, False, overrides, one_rank=False)["spec"]["stages"]
        one = rq.manifest_for(task, data, False, overrides)["spec"]["stages"]
        for stage, st in one.items():
            ranks = example[stage]["nodes"] * example[stage]["gpusPerNode"]
            assert (st["nodes"], st["gpusPerNode"]) == (1, 1) and two[stage]["gpusPerNode"] == ranks
            for key in ("perDeviceBatchSize", "generationBatchSize"):
                if key in example[stage]:
                    assert st[key] == two[stage][key] * ranks == example[stage][key] * ranks, (stage, key)
        assert one["ppo"]["actorLearningRate"] == 3e-4 and one["ppo"]["ema"] == {"enabled": True}
        ppo_of[name] = one["ppo"]
    assert all(p == ppo_of["style"] for p in ppo_of.values())  # one step-3 recipe for every task
    with pytest.raises(SystemExit, match="spec.path=value"):
        rq.parse_overrides(["stages.ppo.actorLearningRate"])
