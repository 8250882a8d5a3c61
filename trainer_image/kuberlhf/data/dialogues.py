"""Multi-turn dialogues of the built-in synthetic data, and the check that an answer stays on the conversation's
subject. Pure functions, no torch: hack/make_synthetic_data.py writes the dialogues with them, and `kuberlhf run`
measures the trained policies with :func:`on_subject`.

A dialogue opens with a question about one or two *subjects* (a country, a word and its opposite, a thing and
its colour, a word to spell), then asks follow-ups that only make sense with that subject in mind ("Can you
explain it to a child?", "What else about it?", "And the second one?"). The right answer to a follow-up names
the subject; a wrong one names another subject of the same kind (what a model that forgot the first turn says)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kuberlhf.data.format import ASSISTANT, HUMAN

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
]
# One table of opposites for the built-in data generator and the quality tasks; the dialogues leave out yes/no.
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("good", "bad"),
    ("black", "white"),
    ("first", "last"),
    ("yes", "no"),
    ("angry", "calm"),
]
DIALOGUE_OPPOSITES = [pair for pair in OPPOSITES if pair != ("yes", "no")]
COLOURS = [("the sky", "blue"), ("the sun", "yellow"), ("a tree", "green"), ("the moon", "white")]
WORDS = ["cat", "dog", "bird", "fish", "tree", "sun", "moon", "sea", "code", "water"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

CHILD = ["Can you explain it to a child?", "Can you say it for a child?"]
MORE = ["What else about it?", "Tell me more about it.", "And what else?"]
SECOND = ["And the second one?", "What about the second one?"]


@dataclass(frozen=True)
class Subject:
    kind: str  # capital | opposite | colour | word
    keys: tuple[str, ...]  # the words an on-subject answer names (any one of them)

    def question(self) -> str:
        if self.kind == "capital":
            return f"What is the capital of {self.keys[0]}?"
        if self.kind == "opposite":
            return f"What is the opposite of {self.keys[0]}?"
        if self.kind == "colour":
            return f"What colour is {self.keys[0]}?"
        return f"Spell the word {self.keys[0]}."

    def answer(self) -> str:
        a, b = (self.keys + ("",))[:2]
        return {
            "capital": f"The capital of {a} is {b}.",
            "opposite": f"The opposite of {a} is {b}.",
            "colour": f"{a.capitalize()} is {b}.",
            "word": f"{a.capitalize()} is spelled {' '.join(a)}.",
        }[self.kind]

    def child(self) -> str:
        a, b = (self.keys + ("",))[:2]
        return {
            "capital": f"{a} is a country and {b} is its big city.",
            "opposite": f"When it is not {a}, it is {b}.",
            "colour": f"Look at {a}: it is {b}.",
            "word": f"{a.capitalize()} has {NUMBERS[len(a)]} letters: {' '.join(a)}.",
        }[self.kind]

    def more(self) -> str:
        a, b = (self.keys + ("",))[:2]
        return {
            "capital": f"{b} is in {a}.",
            "opposite": f"The opposite of {b} is {a}.",
            "colour": f"{a.capitalize()} is {b} every day.",
            "word": f"The word {a} has {NUMBERS[len(a)]} letters.",
        }[self.kind]


def subjects_of_kind(kind: str) -> list[Subject]:
    if kind == "capital":
        return [Subject(kind, pair) for pair in CAPITALS]
    if kind == "opposite":
        return ([Subject(kind, pair) for pair in DIALOGUE_OPPOSITES]
                + [Subject(kind, pair[::-1]) for pair in DIALOGUE_OPPOSITES])
    if kind == "colour":
        return [Subject(kind, pair) for pair in COLOURS]
    return [Subject(kind, (w,)) for w in WORDS]


KINDS = ("capital", "opposite", "colour", "word")
# capital follow-ups name two words of an earlier turn (country and city) where the others copy one: twice the
# dialogues (the tiny SFT model was right on 4 of 18 held-out capital follow-ups at equal shares)
KIND_WEIGHTS = (2, 1, 1, 1)
ALL_SUBJECTS = [s for k in KINDS for s in subjects_of_kind(k)]


def _follow_up(rng: random.Random, subject: Subject) -> tuple[str, str]:
    if rng.random() < 0.5:
        return rng.choice(CHILD), subject.child()
    return rng.choice(MORE), subject.more()


@dataclass(frozen=True)
class Dialogue:
    prompt: str  # DeepSpeed-Chat format: "Human: ... Assistant: ... Human: ... Assistant:"
    chosen: str  # on the subject
    off_subject: str  # the same kind of answer about another subject


def make_dialogue(rng: random.Random, turns: int) -> Dialogue:
    """A dialogue of ``turns`` (2..4) human turns; the last is a follow-up whose answer depends on the first."""
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    pool = subjects_of_kind(kind)
    first = rng.choice(pool)
    history: list[tuple[str, str]]
    if kind == "capital" and rng.random() < 0.4:
        # two subjects in one question; "the second one" picks the second
        second = rng.choice([s for s in pool if s.keys[0] != first.keys[0]])
        q = f"What are the capitals of {first.keys[0]} and {second.keys[0]}?"
        a = f"{first.keys[1]} and {second.keys[1]}."
        history = [(q, a)]
        subject = second
        follow = [(rng.choice(SECOND), f"The second one is {second.keys[1]}, the capital of {second.keys[0]}.")]
    else:
        history = [(first.question(), first.answer())]
        subject = first
        follow = []
    while len(history) + len(follow) < turns:
        follow.append(_follow_up(rng, subject))
    history += follow[:-1]
    last_q, chosen = follow[-1]
    other = rng.choice([s for s in pool if not set(s.keys) & set(subject.keys)])
    off = _answer_like(last_q, chosen, subject, other)
    parts = [f"{HUMAN} {q} {ASSISTANT} {a}" for q, a in history]
    prompt = " ".join(parts) + f" {HUMAN} {last_q} {ASSISTANT}"
    return Dialogue(prompt=prompt, chosen=chosen, off_subject=off)


def _answer_like(question: str, chosen: str, subject: Subject, other: Subject) -> str:
    if question in SECOND:
        return f"The second one is {other.keys[1]}, the capital of {other.keys[0]}."
    if question in CHILD:
        return other.child()
    return other.more()


# --- the check ---------------------------------------------------------------------------------------------------
_TURN = re.compile(rf"{HUMAN}(.*?){ASSISTANT}", re.S)


def human_turns(prompt: str) -> list[str]:
    return [t.strip() for t in _TURN.findall(prompt)]


def is_follow_up(prompt: str) -> bool:
    """A multi-turn prompt whose last question refers back (the dialogues :func:`on_subject` can judge)."""
    turns = human_turns(prompt)
    return len(turns) >= 2 and turns[-1] in (*CHILD, *MORE, *SECOND)


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.I) is not None


def conversation_subject(prompt: str) -> Subject | None:
    """The subject the last follow-up refers to: the one the first question asked about (the second of two
    once a follow-up asked "And the second one?": the later follow-ups are about it)."""
    turns = human_turns(prompt)
    if not turns:
        return None
    first = turns[0]
    named = sorted(
        (m.start(), s) for s in ALL_SUBJECTS if (m := re.search(rf"\b{re.escape(s.keys[0])}\b", first, re.I))
    )
    # "the opposite of hot" names (hot, cold) and (cold, hot) only by its first key: keep the one asked about
    found = [s for _, s in named]
    if not found:
        return None
    return found[1] if any(t in SECOND for t in turns[1:]) and len(found) > 1 else found[0]


# polite openers and closings of the synthetic answers: "Good question!" is not about "good", nor "Happy to
# help." about "happy"
OPENERS = ("Sure! Here it is:", "Sure!", "Good question!", "Thanks for asking!", "Yes, I can help.")
CLOSINGS = ("I hope this is helpful.", "Thank you for the question!", "Happy to help.")


def strip_politeness(answer: str) -> str:
    """The answer without the synthetic data's polite openers and closings (any number of them)."""
    answer = answer.strip()
    while opener := next((o for o in OPENERS if answer.startswith(o)), None):
        answer = answer[len(opener) :].strip()
    while closing := next((c for c in CLOSINGS if answer.endswith(c)), None):
        answer = answer[: -len(closing)].strip()
    return answer


def on_subject(prompt: str, answer: str) -> float:
    """1.0 when the answer names the conversation's subject and no other subject of the same kind, else 0.0
    (0.0 too for prompts without a follow-up: there is nothing to stay on)."""
    if not is_follow_up(prompt):
        return 0.0
    answer = strip_politeness(answer)
    subject = conversation_subject(prompt)
    if subject is None:
        return 0.0
    if not any(_mentions(answer, k) for k in subject.keys):
        return 0.0
    others = {k for s in subjects_of_kind(subject.kind) for k in s.keys} - set(subject.keys)
    return 0.0 if any(_mentions(answer, k) for k in others) else 1.0


def on_subject_share(prompts: Sequence[str], answers: Sequence[str]) -> float:
    """The share of answers that stay on their conversation's subject (over follow-up prompts only)."""
    scored = [on_subject(p, a) for p, a in zip(prompts, answers, strict=True) if is_follow_up(p)]
    return sum(scored) / len(scored) if scored else 0.0
