"""Pure parts of `kuberlhf run`: which stages run, which outputs are stale, the run id."""

from __future__ import annotations

from pathlib import Path

import yaml

from kuberlhf.contract.spec import Stage, parse_pipeline
from kuberlhf.runner.local import required_before, run_id_for, stage_fingerprints, stages_to_run
from kuberlhf.runner.samples import display_prompt

REPO = Path(__file__).resolve().parents[2]


def tiny(mutate=None):
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    if mutate:
        mutate(doc)
    return parse_pipeline(doc)


def changed(mutate) -> set[str]:
    before, after = stage_fingerprints(tiny()), stage_fingerprints(tiny(mutate))
    return {k for k in before if before[k] != after[k]}


def bump(section: dict, key: str) -> None:
    """Change a value whatever the example sets it to (the example gets tuned)."""
    section[key] = section.get(key, 1) * 2


def test_fingerprints_rerun_only_affected_stages() -> None:
    assert changed(lambda d: bump(d["spec"]["stages"]["ppo"], "klCoef")) == {"ppo"}
    # the example's reward model starts from SFT's model (initFromSft): a changed SFT setting re-runs it too
    assert changed(lambda d: bump(d["spec"]["stages"]["sft"], "epochs")) == {"sft", "reward", "ppo"}
    assert changed(lambda d: bump(d["spec"]["stages"]["reward"], "learningRate")) == {"reward", "ppo"}
    assert changed(lambda d: d["spec"]["data"].update(seed=1)) == {"sft", "reward", "ppo"}
    # where and how a stage runs does not change its result
    assert changed(lambda d: d["spec"]["stages"]["sft"].update(resources={"limits": {"cpu": "4"}})) == set()
    assert changed(lambda d: d["spec"]["storage"].update(endpoint="http://elsewhere:9000")) == set()


def test_a_reward_model_started_from_sft_reruns_with_sft() -> None:
    def from_sft(d):
        d["spec"].pop("reward", None)
        d["spec"]["stages"]["reward"]["initFromSft"] = True

    def both(d):
        from_sft(d)
        bump(d["spec"]["stages"]["sft"], "epochs")

    before, after = stage_fingerprints(tiny(from_sft)), stage_fingerprints(tiny(both))
    assert {k for k in before if before[k] != after[k]} == {"sft", "reward", "ppo"}


def test_a_reward_model_of_its_own_does_not_rerun_with_sft() -> None:
    def own(d):
        d["spec"]["reward"] = {"model": "kuberlhf/tiny-opt"}
        d["spec"]["stages"]["reward"]["initFromSft"] = False

    def both(d):
        own(d)
        bump(d["spec"]["stages"]["sft"], "epochs")

    before, after = stage_fingerprints(tiny(own)), stage_fingerprints(tiny(both))
    assert {k for k in before if before[k] != after[k]} == {"sft", "ppo"}


def test_stage_selection() -> None:
    assert stages_to_run(None) == [Stage.sft, Stage.reward, Stage.ppo]
    assert stages_to_run([Stage.ppo, Stage.sft]) == [Stage.sft, Stage.ppo]
    assert required_before([Stage.ppo]) == [Stage.sft, Stage.reward]
    assert required_before([Stage.reward, Stage.ppo]) == [Stage.sft]
    assert required_before([Stage.sft]) == []


def test_run_id_is_per_output_dir_unless_given(tmp_path: Path) -> None:
    p = tiny()
    assert run_id_for(p, tmp_path / "a") == run_id_for(p, tmp_path / "a")
    assert run_id_for(p, tmp_path / "a") != run_id_for(p, tmp_path / "b")
    assert run_id_for(tiny(lambda d: d["metadata"].update(uid="abc")), tmp_path) == "abc"


def test_display_prompt() -> None:
    assert display_prompt(" Human: What is 2+2? Assistant:") == "What is 2+2?"
    assert display_prompt("plain") == "plain"


def test_samples_show_the_largest_score_changes() -> None:
    from kuberlhf.runner.samples import most_changed

    assert most_changed([1.0, 2.0, 3.0, 0.0], [1.0, 5.0, 2.0, 0.5], 2) == [1, 2]
    assert most_changed([0.0, 0.0], [1.0, -1.0], 5) == [0, 1]  # equal changes keep their order; n may exceed


def test_each_algorithm_runs_its_own_graph() -> None:
    def algorithm(name: str, **grpo):
        def mutate(d):
            d["spec"]["algorithm"] = name
            if name == "dpo" or grpo:
                d["spec"].pop("reward", None)
            else:  # the example's reward model starts from SFT's (stages.reward, dropped here): one of its own
                d["spec"]["reward"] = {"model": "kuberlhf/tiny-opt"}
            d["spec"]["stages"] = {k: v for k, v in d["spec"]["stages"].items() if k == "sft"}
            if grpo:
                d["spec"]["stages"]["grpo"] = grpo
        return mutate

    dpo = tiny(algorithm("dpo"))
    assert list(stage_fingerprints(dpo)) == ["sft", "dpo"] and dpo.spec.final_stage is Stage.dpo
    assert stages_to_run(None, dpo.spec.stage_graph) == [Stage.sft, Stage.dpo]
    assert required_before([Stage.dpo], dpo.spec.stage_graph) == [Stage.sft]
    grpo = tiny(algorithm("grpo", rewardFunction="kuberlhf.data.true_reward:load_true_reward"))
    assert grpo.spec.stage_graph == (Stage.sft, Stage.grpo)
    assert tiny(algorithm("grpo")).spec.stage_graph == (Stage.sft, Stage.reward, Stage.grpo)
