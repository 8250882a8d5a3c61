"""The datasets shipped in the package (``kuberlhf/synthetic-*``), so the tiny pipeline runs with no hub.
Light on purpose: the operator's spec checks import it (no ``datasets``, no torch)."""

from __future__ import annotations

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "assets" / "data"
# regenerate: hack/make_synthetic_data.py
BUILTINS: dict[str, Path] = {
    "kuberlhf/synthetic-pairs": BUILTIN_DIR / "synthetic-pairs.jsonl",
    "kuberlhf/synthetic-corpus": BUILTIN_DIR / "synthetic-corpus.jsonl",
    "kuberlhf/synthetic-dialogues": BUILTIN_DIR / "synthetic-dialogues.jsonl",
}
BUILTIN_PREFIX = "kuberlhf/"
