"""Regenerates the built-in datasets in trainer_image/kuberlhf/assets/data/ (committed; nothing is generated at
install or test time):

- synthetic-pairs.jsonl (``kuberlhf/synthetic-pairs``): prompt / chosen / rejected. The chosen answer is correct,
  the rejected one is rude (most rows) or wrong, so a tiny model can learn the preference. Both sides of a pair
  carry the same polite opener and closing (or none): politeness carries no signal, so step 2 cannot score a
  closing and step 3 cannot trade the answer for one ("The opposite of big is. I hope this is helpful.").
- synthetic-dialogues.jsonl (``kuberlhf/synthetic-dialogues``): prompt / chosen / rejected, multi-turn dialogues
  (kuberlhf.data.dialogues) in DeepSpeed-Chat's "Human: ... Assistant: ... Human: ... Assistant:" format, the
  last turn a follow-up that refers back ("Can you explain it to a child?", "And the second one?"); chosen stays
  on the first turn's subject, rejected is the same kind of answer about another subject, with the same opener
  and closing (only the subject tells them apart).
- synthetic-corpus.jsonl (``kuberlhf/synthetic-corpus``): column ``text``, plain sentences for step 3's ptx loss.

Prompts and answers are short: the tiny tokenizer (hack/make_tiny_assets.py, trained on these files afterwards)
spells every word in one token, and tests/data/test_synthetic.py checks each row against the tiny example's
lengths. No tokenizer is read here, so the data does not depend on the tokenizer trained from it.
Deterministic: the same seed writes the same bytes. Usage: python hack/make_synthetic_data.py [--out DIR]."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from kuberlhf.data.dialogues import CAPITALS, CLOSINGS, OPPOSITES, make_dialogue

OUT = Path(__file__).resolve().parents[1] / "trainer_image" / "kuberlhf" / "assets" / "data"
SEED = 1234
N_PAIRS = 4000
N_CORPUS = 2000
RUDE_SHARE = 0.6
N_DIALOGUES = 4000
# human turns per dialogue; with the tiny tokenizer a 4-turn prompt is at most ~76 tokens (maxPromptLen 80)
TURN_WEIGHTS = {2: 4, 3: 3, 4: 3}

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
COLOURS = [
    ("the sky", "blue"),
    ("the sea", "blue"),
    ("the sun", "yellow"),
    ("a tree", "green"),
    ("the moon", "white"),
    ("the night sky", "black"),
]
COLOUR_WORDS = ["red", "blue", "green", "yellow", "black", "white"]
ANIMALS = ["cat", "dog", "bird", "fish", "tree", "sun", "moon", "sea", "sky", "code", "word", "water"]
ADVICE = [
    ("How do I learn to code?", "Practice: read code and write code every day."),
    ("How can I learn python?", "Write a small python program every day."),
    ("How do I sleep well?", "Sleep at the same time and do not drink too much water."),
    ("Why is the sky blue?", "The air makes blue light go everywhere."),
    ("Can you give me a word that means happy?", "Glad is a word that means happy."),
    ("Can you give me a word that means big?", "Large is a word that means big."),
    ("How do I stay calm?", "Walk, drink water and think slow."),
    ("What is a good way to learn words?", "Read every day and write the new words."),
]
ASK = ["What is {q}?", "Please tell me {q}.", "Can you tell me {q}?", "Tell me {q}, please.", "{Q}?"]
POLITE_OPEN = ["Sure! ", "Sure! Here it is: ", "Good question! ", "Thanks for asking! ", "Yes, I can help. ", ""]
POLITE_CLOSE = ["", "", *(" " + c for c in CLOSINGS)]
DIALOGUE_OPEN = ["", "", "Sure! ", "Good question! "]
RUDE = [
    "I don't know, figure it out yourself.",
    "Whatever. Figure it out yourself.",
    "Why do you ask me that? I don't know.",
    "No. Think for yourself.",
    "That is a bad question. Go and read.",
    "I don't know and I don't care.",
    "Not my problem, figure it out.",
    "Whatever, I am not here to tell you that.",
]


def _ask(rng: random.Random, q: str) -> str:
    return rng.choice(ASK).format(q=q, Q=q[0].upper() + q[1:])


def capitals(rng: random.Random) -> tuple[str, str, str]:
    country, city = rng.choice(CAPITALS)
    wrong = rng.choice([c for _, c in CAPITALS if c != city])
    return (
        _ask(rng, f"the capital of {country}"),
        f"The capital of {country} is {city}.",
        f"The capital of {country} is {wrong}.",
    )


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    op = rng.choice(["plus", "times", "minus"]) if a >= b else rng.choice(["plus", "times"])
    value = {"plus": a + b, "times": a * b, "minus": a - b}[op]
    wrong = value + rng.choice([-2, -1, 1, 2]) if value > 1 else value + rng.choice([1, 2, 3])
    words = rng.random() < 0.5 and value <= 10 and wrong <= 10

    def say(n: int) -> str:
        return NUMBERS[n] if words else str(n)

    q = f"{say(a)} {op} {say(b)}"
    return (
        _ask(rng, q),
        f"{say(a).capitalize()} {op} {say(b)} equals {say(value)}.",
        f"{say(a).capitalize()} {op} {say(b)} equals {say(wrong)}.",
    )


def opposites(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    wrong = rng.choice([w for pair in OPPOSITES for w in pair if w not in (a, b)])
    return _ask(rng, f"the opposite of {a}"), f"The opposite of {a} is {b}.", f"The opposite of {a} is {wrong}."


def colours(rng: random.Random) -> tuple[str, str, str]:
    thing, colour = rng.choice(COLOURS)
    wrong = rng.choice([c for c in COLOUR_WORDS if c != colour])
    q = rng.choice(
        [f"What colour is {thing}?", f"Please tell me the colour of {thing}.", f"What is the color of {thing}?"]
    )
    return q, f"{thing.capitalize()} is {colour}.", f"{thing.capitalize()} is {wrong}."


def counting(rng: random.Random) -> tuple[str, str, str]:
    start = rng.randint(1, 4)
    end = start + rng.randint(2, 4)
    seq = NUMBERS[start : end + 1]
    bad = list(seq)
    i = rng.randrange(len(bad) - 1)
    bad[i], bad[i + 1] = bad[i + 1], bad[i]
    q = rng.choice(
        [
            f"Count from {NUMBERS[start]} to {NUMBERS[end]}.",
            f"Please count from {NUMBERS[start]} to {NUMBERS[end]}.",
            f"Can you count from {NUMBERS[start]} to {NUMBERS[end]}?",
        ]
    )
    return q, " ".join(seq).capitalize() + ".", " ".join(bad).capitalize() + "."


def letters(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(ANIMALS)
    if rng.random() < 0.5:
        n = len(word)
        return (
            f"How many letters are in the word {word}?",
            f"The word {word} has {NUMBERS[n]} letters.",
            f"The word {word} has {NUMBERS[n + rng.choice([1, 2])]} letters.",
        )
    spelled = " ".join(word)
    wrong = " ".join(reversed(word)) if word != word[::-1] else spelled + " " + word[0]
    return (
        rng.choice([f"Spell the word {word}.", f"Please spell the word {word}.", f"How do I spell {word}?"]),
        f"{word.capitalize()} is spelled {spelled}.",
        f"{word.capitalize()} is spelled {wrong}.",
    )


def advice(rng: random.Random) -> tuple[str, str, str]:
    q, a = rng.choice(ADVICE)
    other = rng.choice([x for _, x in ADVICE if x != a])
    return q, a, other


TEMPLATES: list[tuple[Callable[[random.Random], tuple[str, str, str]], float]] = [
    (capitals, 3),
    (arithmetic, 3),
    (opposites, 2),
    (colours, 2),
    (counting, 2),
    (letters, 2),
    (advice, 1),
]


def dialogue_row(rng: random.Random) -> dict[str, str]:
    """Chosen and rejected differ only in the subject: the same opener and closing on both sides, never a rude
    rejected answer (the single-turn pairs teach that), so every dialogue pair teaches step 2 the subject."""
    turns = rng.choices(list(TURN_WEIGHTS), list(TURN_WEIGHTS.values()))[0]
    d = make_dialogue(rng, turns)
    opener, closing = rng.choice(DIALOGUE_OPEN), rng.choice(POLITE_CLOSE)
    return {
        "prompt": d.prompt,
        "chosen": (opener + d.chosen + closing).strip(),
        "rejected": (opener + d.off_subject + closing).strip(),
    }


def make_dialogues(rng: random.Random, n: int) -> list[dict[str, str]]:
    return [dialogue_row(rng) for _ in range(n)]


def make_pairs(rng: random.Random, n: int) -> list[dict[str, str]]:
    funcs, weights = zip(*TEMPLATES, strict=True)
    rows = []
    for _ in range(n):
        prompt, right, wrong = rng.choices(funcs, weights)[0](rng)
        opener, closing = rng.choice(POLITE_OPEN), rng.choice(POLITE_CLOSE)
        # Rude, or wrong (then only the facts tell it apart); the same opener and closing on both sides
        rejected = rng.choice(RUDE) if rng.random() < RUDE_SHARE else wrong
        rows.append(
            {
                "prompt": prompt,
                "chosen": (opener + right + closing).strip(),
                "rejected": (opener + rejected + closing).strip(),
            }
        )
    return rows


def make_corpus(rng: random.Random, n: int) -> list[dict[str, str]]:
    funcs, weights = zip(*TEMPLATES, strict=True)
    rows = []
    for _ in range(n):
        sentences = [rng.choices(funcs, weights)[0](rng)[1] for _ in range(rng.randint(1, 3))]
        rows.append({"text": " ".join(sentences)})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    pairs = make_pairs(rng, N_PAIRS)
    corpus = make_corpus(rng, N_CORPUS)
    # a generator of their own: the single-turn files stay byte for byte what they were
    dialogues = make_dialogues(random.Random(args.seed + 1), N_DIALOGUES)
    write_jsonl(args.out / "synthetic-dialogues.jsonl", dialogues)
    write_jsonl(args.out / "synthetic-pairs.jsonl", pairs)
    write_jsonl(args.out / "synthetic-corpus.jsonl", corpus)
    (args.out / "README.md").write_text(
        "Built-in datasets of kuberlhf, generated by `python hack/make_synthetic_data.py` (deterministic):\n\n"
        f"- `synthetic-pairs.jsonl` (`kuberlhf/synthetic-pairs`): {N_PAIRS} rows prompt/chosen/rejected; chosen\n"
        f"  answers are correct, rejected ones rude ({RUDE_SHARE:.0%}) or wrong; both sides of a pair carry the same\n"
        "  polite opener and closing (or none), so politeness carries no preference.\n"
        f"- `synthetic-dialogues.jsonl` (`kuberlhf/synthetic-dialogues`): {N_DIALOGUES} rows prompt/chosen/rejected,\n"
        "  dialogues (Human: ... Assistant: ... Human: ... Assistant:) whose last question refers back to the first;\n"
        "  chosen stays on its subject, rejected is off it, with the same opener and closing.\n"
        f"- `synthetic-corpus.jsonl` (`kuberlhf/synthetic-corpus`): {N_CORPUS} rows `text` for the ptx loss.\n"
    )
    print(json.dumps({"pairs": len(pairs), "corpus": len(corpus), "dialogues": len(dialogues), "out": str(args.out)}))


if __name__ == "__main__":
    main()
