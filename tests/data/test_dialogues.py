"""The multi-turn dialogues of the built-in data and the "stays on subject" check `kuberlhf run` reports."""

from __future__ import annotations

import json
import random

from kuberlhf.data.dialogues import SECOND, human_turns, is_follow_up, make_dialogue, on_subject, on_subject_share
from kuberlhf.data.format import format_prompt
from kuberlhf.data.sources import BUILTINS


def _rows() -> list[dict]:
    return [json.loads(line) for line in BUILTINS["kuberlhf/synthetic-dialogues"].read_text().splitlines()]


def test_the_dialogues_are_in_deepspeed_chat_format() -> None:
    dialogues = _rows()
    assert len(dialogues) == 4000 and all(is_follow_up(r["prompt"]) for r in dialogues)
    turns = {len(human_turns(r["prompt"])) for r in dialogues}
    assert turns == {2, 3, 4}  # all fit the tiny example's maxPromptLen (tests/data/test_synthetic.py)
    for r in dialogues:
        assert r["prompt"].startswith("Human: ") and r["prompt"].endswith(" Assistant:")
        assert format_prompt(r["prompt"]) == " " + r["prompt"]  # trained as written
    assert any(human_turns(r["prompt"])[-1] in SECOND for r in dialogues)


def test_chosen_answers_stay_on_the_subject_and_rejected_ones_do_not() -> None:
    dialogues = [r for r in _rows() if is_follow_up(r["prompt"])]
    assert on_subject_share([r["prompt"] for r in dialogues], [r["chosen"] for r in dialogues]) == 1.0
    assert on_subject_share([r["prompt"] for r in dialogues], [r["rejected"] for r in dialogues]) < 0.01


def test_longer_dialogues_keep_the_subject_through_every_follow_up() -> None:
    rng = random.Random(1)
    for turns in (3, 4):
        d = make_dialogue(rng, turns)
        assert len(human_turns(d.prompt)) == turns and is_follow_up(d.prompt)
        assert on_subject(d.prompt, d.chosen) == 1.0 and on_subject(d.prompt, d.off_subject) == 0.0


def test_the_right_answer_depends_on_the_earlier_turn() -> None:
    rng = random.Random(0)
    d = [make_dialogue(rng, 2) for _ in range(200)]
    # an answer that would be right in another conversation (a model that forgot the first turn) is off subject
    swapped = [(a.prompt, b.chosen) for a, b in zip(d, d[1:], strict=False) if a.chosen != b.chosen]
    assert sum(on_subject(p, ans) for p, ans in swapped) / len(swapped) < 0.2
    france = "Human: What is the capital of France? Assistant: The capital of France is Paris. Human: Can you explain it to a child? Assistant:"
    assert on_subject(france, "Good question! France is a country and Paris is its big city.") == 1.0
    # a polite closing names no subject: "Happy to help." is not about happy (the opposite of sad)
    sad = "Human: What is the opposite of sad? Assistant: The opposite of sad is happy. Human: And what else?"
    sad += " Assistant:"
    assert on_subject(sad, "The opposite of happy is sad. Happy to help.") == 1.0
    hot = sad.replace("sad", "hot").replace("happy", "cold")
    assert on_subject(hot, "The opposite of cold is hot. Happy to help.") == 1.0
    assert on_subject(hot, "The opposite of happy is sad. Happy to help.") == 0.0
    assert on_subject(france, "Japan is a country and Tokyo is its big city.") == 0.0
    two = "Human: What are the capitals of Peru and Kenya? Assistant: Lima and Nairobi. Human: And the second one? Assistant:"
    assert on_subject(two, "The second one is Nairobi, the capital of Kenya.") == 1.0
    assert on_subject(two, "The second one is Lima, the capital of Peru.") == 0.0
    assert on_subject("Human: What is the capital of France? Assistant:", "Paris.") == 0.0  # no follow-up


def test_the_run_finds_64_held_out_dialogues(repo_root) -> None:
    from kuberlhf.contract.spec import load_pipeline_file
    from kuberlhf.data.blend import stage_rows
    from kuberlhf.runner.samples import heldout_dialogues

    pipeline = load_pipeline_file(str(repo_root / "examples" / "tiny-cpu.yaml"))
    held = heldout_dialogues(pipeline)
    assert len(held) == 64 and all(is_follow_up(p) for p in held)
    from kuberlhf.contract.stage import Stage

    trained = set()
    for stage in (Stage.sft, Stage.reward, Stage.ppo):
        train, _ = stage_rows(pipeline.spec.data, stage)
        trained |= set(train["prompt"])
    # held out from every stage's training rows (the template space is small: some texts recur, most do not)
    assert sum(p in trained for p in held) < len(held)
