"""The synthetic preference tasks of ``bench/rlhf_quality.py``: each has a programmatic TRUE reward in [0, 1]
that the pipeline never sees. The pipeline gets only what a user's data would give it:

- ``sft.jsonl`` (``data.sftOnly``): prompts with a good OR a bad answer, half each, so step 1 alone learns both
  behaviours and only steps 2 and 3 can move the policy toward the preferred one;
- ``pairs.jsonl`` (``data.datasets``): prompt / chosen (good) / rejected (bad) for the reward model, and the
  prompts of step 3.

``<task>_reward(prompt, answer)`` is what ``spec.data.trueReward`` names (``quality_tasks:<task>_reward``):
reporting only. The prompt comes as the model saw it (' Human: ... Assistant:') or bare; both parse.

Prompts and answers use words the tiny tokenizer knows and stay within the tiny example's lengths (prompt <= 32
tokens, answer <= 40). Pure functions; deterministic per seed."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kuberlhf.data.dialogues import CAPITALS, OPPOSITES  # the facts the built-in dialogues use too

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ITEMS = {
    "colors": ["red", "blue", "green", "yellow", "black", "white", "pink", "gray"],
    "animals": ["cat", "dog", "bird", "fish", "horse", "frog", "bear", "duck"],
    "numbers": ["one", "two", "three", "four", "five", "six", "seven", "eight"],
}
SUBJECTS = {  # subject word in prompts -> facts that all mention it (matched by the stem below)
    "cats": ["Cats like to sleep.", "A cat can see at night.", "Cats drink milk and water."],
    "dogs": ["Dogs can run fast.", "A dog likes to play.", "Dogs need a walk every day."],
    "fish": ["Fish can swim fast.", "A fish has no legs.", "Fish live in water."],
    "birds": ["Birds can fly.", "A bird has two legs.", "Birds sing in the morning."],
    "the sun": ["The sun is hot.", "The sun gives us light.", "The sun is yellow."],
    "the moon": ["The moon is white.", "The moon comes out at night.", "The moon goes around the earth."],
    "the sea": ["The sea is big and blue.", "The sea has big waves.", "The sea is full of salt water."],
    "trees": ["Trees are green.", "A tree can live a long time.", "Trees need water and light."],
}
STEMS = {
    "cats": r"cats?",
    "dogs": r"dogs?",
    "fish": r"fish",
    "birds": r"birds?",
    "the sun": r"sun",
    "the moon": r"moon",
    "the sea": r"sea",
    "trees": r"trees?",
}
CHEERFUL = ["Sure!", "Of course!", "Great question!", "Happy to help!"]
GRUMPY = ["Ugh.", "Fine.", "Meh.", "If I must."]


def human_text(prompt: str) -> str:
    """The user's words of the (last) turn: ' Human: Tell me about cats. Assistant:' -> 'Tell me about cats.'."""
    turns = re.findall(r"Human:\s*(.*?)\s*(?:Assistant:|$)", prompt)
    return turns[-1].strip() if turns else prompt.strip()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# --- style: a cheerful opener is preferred to a grumpy one ---------------------------------------------------------
def _fact(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        country, capital = rng.choice(CAPITALS)
        return rng.choice(
            [f"What is the capital of {country}?", f"Tell me the capital of {country}."]
        ), f"The capital of {country} is {capital}."
    a, b = rng.choice(OPPOSITES)
    return rng.choice(
        [f"What is the opposite of {a}?", f"Tell me the opposite of {a}."]
    ), f"The opposite of {a} is {b}."


def style_example(rng: random.Random) -> tuple[str, str, str]:
    prompt, content = _fact(rng)
    return prompt, f"{rng.choice(CHEERFUL)} {content}", f"{rng.choice(GRUMPY)} {content}"


def style_reward(prompt: str, answer: str) -> float:
    """1 for an answer opening cheerfully, 0 for a grumpy opening, 0.5 for neither."""
    text = answer.strip()
    if any(text.startswith(o) for o in CHEERFUL):
        return 1.0
    if any(text.startswith(o) for o in GRUMPY):
        return 0.0
    return 0.5


# --- length: lists of exactly three items are preferred ---------------------------------------------------------
def length_example(rng: random.Random) -> tuple[str, str, str]:
    """The rejected list has 1, 5 or 6 items, or three entries with one item twice ("Red, blue, red."): a list
    of three that repeats an item is two items to the true reward, and without such pairs the reward model
    scores it like three (it counts entries) and PPO's rollouts keep the tiny policy's repeats (bench/RESULTS.md)."""
    kind = rng.choice(sorted(ITEMS))
    prompt = rng.choice([f"Name some {kind}.", f"List a few {kind}.", f"Give me some {kind}."])
    good = rng.sample(ITEMS[kind], 3)
    n_bad = rng.choice([1, 5, 6, 0])
    if n_bad:
        bad = rng.sample(ITEMS[kind], n_bad)
    else:
        a, b = rng.sample(ITEMS[kind], 2)
        bad = rng.choice([[a, b, a], [a, a, b], [a, b, b]])
    return prompt, ", ".join(good).capitalize() + ".", ", ".join(bad).capitalize() + "."


def length_reward(prompt: str, answer: str) -> float:
    """max(0, 1 - |n - 3| / 3), n = distinct known items in the answer."""
    known = {w for ws in ITEMS.values() for w in ws}
    n = len({w for w in _words(answer) if w in known})
    return 0.0 if n == 0 else max(0.0, 1.0 - abs(n - 3) / 3)


# --- copy: the number named in the prompt is repeated, not another one -----------------------------------------
def copy_example(rng: random.Random) -> tuple[str, str, str]:
    n = rng.choice(NUMBERS)
    wrong = rng.choice([m for m in NUMBERS if m != n])
    prompt = rng.choice(
        [f"The number is {n}. Say it.", f"My number is {n}. What is it?", f"Remember {n}. What was it?"]
    )
    template = rng.choice(["It is {}.", "The number is {}.", "{}."])
    return prompt, template.format(n).capitalize(), template.format(wrong).capitalize()


def copy_reward(prompt: str, answer: str) -> float:
    """1 when the answer names the prompt's number and no other number, else 0."""
    asked = [w for w in _words(human_text(prompt)) if w in NUMBERS]
    said = {w for w in _words(answer) if w in NUMBERS}
    return 1.0 if asked and said == {asked[-1]} else 0.0


# --- topic: the answer stays on the prompt's subject ----------------------------------------------------------
def topic_example(rng: random.Random) -> tuple[str, str, str]:
    subject = rng.choice(sorted(SUBJECTS))
    other = rng.choice([s for s in sorted(SUBJECTS) if s != subject])
    prompt = rng.choice(
        [f"Tell me about {subject}.", f"Say something about {subject}.", f"What do you know about {subject}?"]
    )
    return prompt, rng.choice(SUBJECTS[subject]), rng.choice(SUBJECTS[other])


def _subjects_in(text: str) -> set[str]:
    low = text.lower()
    return {s for s, stem in STEMS.items() if re.search(rf"\b{stem}\b", low)}


def topic_reward(prompt: str, answer: str) -> float:
    """1 when the answer mentions the prompt's subject and no other subject, else 0."""
    asked = _subjects_in(human_text(prompt))
    return 1.0 if asked and _subjects_in(answer) == asked else 0.0


@dataclass(frozen=True)
class Task:
    name: str
    example: Callable[[random.Random], tuple[str, str, str]]
    reward: Callable[[str, str], float]
    what: str
    # rows of the ambiguous SFT file: copy's 800 (22 SFT steps per epoch, 264 in the example's 12 epochs) end
    # step 1 still at chance (the copy forms after ~400 steps, bench/RESULTS.md), so only its file is longer
    sft_rows: int = 800

    @property
    def true_reward_ref(self) -> str:
        return f"{__name__}:{self.reward.__name__}"


TASKS = {
    t.name: t
    for t in (
        Task("style", style_example, style_reward, "a cheerful opener preferred to a grumpy one (same content)"),
        Task(
            "length",
            length_example,
            length_reward,
            "lists of exactly three items preferred (1, 5 or 6 items, or three with a repeat, rejected)",
        ),
        Task("copy", copy_example, copy_reward, "the number named in the prompt repeated, not another one", 2400),
        Task("topic", topic_example, topic_reward, "a fact about the prompt's subject, not another subject"),
    )
}


def write_task_data(task: Task, out: Path, n_pairs: int = 3200, seed: int = 1234) -> dict[str, Path]:
    """sft.jsonl (``task.sft_rows`` rows, good or bad answer, half each) and pairs.jsonl (chosen good, rejected
    bad) under ``out``."""
    n_sft = task.sft_rows
    rng = random.Random(f"{seed}:{task.name}")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sft": out / "sft.jsonl", "pairs": out / "pairs.jsonl"}
    with paths["sft"].open("w") as f:
        for i in range(n_sft):
            prompt, good, bad = task.example(rng)
            f.write(json.dumps({"prompt": prompt, "chosen": good if i % 2 == 0 else bad}) + "\n")
    with paths["pairs"].open("w") as f:
        for _ in range(n_pairs):
            prompt, good, bad = task.example(rng)
            f.write(json.dumps({"prompt": prompt, "chosen": good, "rejected": bad}) + "\n")
    return paths


def eval_examples(task: Task, n: int, seed: int = 99) -> list[tuple[str, str, str]]:
    """Fresh (prompt, good, bad) triples from a seed the data files do not use."""
    rng = random.Random(f"eval:{seed}:{task.name}")
    return [task.example(rng) for _ in range(n)]
