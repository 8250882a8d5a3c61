"""Adapters from known datasets' own columns to the one shape every stage reads: prompt / chosen / rejected
(DeepSpeed-Chat's ``raw_datasets.py`` idea). An adapter is a pure function of one raw row; it returns None to drop a
row that carries no usable example (an empty answer, a tie)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kuberlhf.data.errors import DataError
from kuberlhf.data.format import ASSISTANT, HUMAN

Triple = tuple[str, str, str]  # raw prompt, chosen answer, rejected answer ("" when the dataset has none)


@dataclass(frozen=True)
class Adapter:
    name: str
    required: tuple[str, ...]
    convert: Callable[[Mapping[str, Any]], Triple | None]
    pairwise: bool = True  # False: the dataset has no rejected answers (SFT only)


def _s(value: Any) -> str:
    return "" if value is None else str(value)


def _generic(row: Mapping[str, Any]) -> Triple | None:
    return _s(row["prompt"]), _s(row["chosen"]), _s(row.get("rejected"))


def _prompt_chosen_rejected(row: Mapping[str, Any]) -> Triple | None:
    # Dahoas/rm-static, Dahoas/full-hh-rlhf: prompt is already "\n\nHuman: ... \n\nAssistant:".
    return _s(row["prompt"]), _s(row["chosen"]), _s(row["rejected"])


def _yitingxie(row: Mapping[str, Any]) -> Triple | None:
    # The prompt stops before the final "Assistant:" and the answers repeat it: "Assistant: <answer>".
    prompt = _s(row["prompt"])
    if not prompt.rstrip().endswith(ASSISTANT):
        prompt = prompt + ("" if prompt[-1:].isspace() else " ") + ASSISTANT
    return prompt, _after_last_assistant(_s(row["chosen"])), _after_last_assistant(_s(row["rejected"]))


def _after_last_assistant(text: str) -> str:
    idx = text.rfind(ASSISTANT)
    return text if idx < 0 else text[idx + len(ASSISTANT):]


_CITATION = re.compile(r"\s?\[\d+(?:\s*,\s*\d+)*\]")


def _webgpt(row: Mapping[str, Any]) -> Triple | None:
    # Two answers with scores; the higher one is chosen, ties carry no preference and are dropped. The inline
    # citation markers ("[1]", "[2, 3]") point at quotes the model never sees, so they are removed.
    question = row["question"]
    prompt = _s(question.get("full_text") if isinstance(question, Mapping) else question)
    s0, s1 = float(row["score_0"]), float(row["score_1"])
    if s0 == s1:
        return None
    a0, a1 = (_CITATION.sub("", _s(row[k])) for k in ("answer_0", "answer_1"))
    return (prompt, a0, a1) if s0 > s1 else (prompt, a1, a0)


def _shp(row: Mapping[str, Any]) -> Triple | None:
    # labels == 1: human_ref_A is preferred.
    a, b = _s(row["human_ref_A"]), _s(row["human_ref_B"])
    return (_s(row["history"]), a, b) if int(row["labels"]) == 1 else (_s(row["history"]), b, a)


def _hh_rlhf(row: Mapping[str, Any]) -> Triple | None:
    # Whole transcripts: the prompt is everything up to and including the last "Assistant:" of the chosen one.
    chosen, rejected = _s(row["chosen"]), _s(row["rejected"])
    idx = chosen.rfind(ASSISTANT)
    ridx = rejected.rfind(ASSISTANT)
    if idx < 0 or ridx < 0:
        return None
    return chosen[:idx + len(ASSISTANT)], chosen[idx + len(ASSISTANT):], rejected[ridx + len(ASSISTANT):]


def _sharegpt_vicuna(row: Mapping[str, Any]) -> Triple | None:
    prompt = _s(row["prompt"]).replace("USER:", HUMAN).replace("ASSISTANT:", ASSISTANT)
    return prompt, _s(row["label"]), ""


GENERIC = "prompt/chosen/rejected"

ADAPTERS: dict[str, Adapter] = {a.name.lower(): a for a in (
    Adapter(GENERIC, ("prompt", "chosen"), _generic),
    Adapter("Dahoas/rm-static", ("prompt", "chosen", "rejected"), _prompt_chosen_rejected),
    Adapter("Dahoas/full-hh-rlhf", ("prompt", "chosen", "rejected"), _prompt_chosen_rejected),
    Adapter("Dahoas/synthetic-instruct-gptj-pairwise", ("prompt", "chosen", "rejected"), _prompt_chosen_rejected),
    Adapter("yitingxie/rlhf-reward-datasets", ("prompt", "chosen", "rejected"), _yitingxie),
    Adapter("openai/webgpt_comparisons", ("question", "answer_0", "answer_1", "score_0", "score_1"), _webgpt),
    Adapter("stanfordnlp/SHP", ("history", "human_ref_A", "human_ref_B", "labels"), _shp),
    Adapter("Anthropic/hh-rlhf", ("chosen", "rejected"), _hh_rlhf),
    Adapter("pvduy/sharegpt_alpaca_oa_vicuna_format", ("prompt", "label"), _sharegpt_vicuna, pairwise=False),
)}


def known_names() -> list[str]:
    """Dataset names with an adapter (hub names) plus the generic column layout."""
    return [a.name for a in ADAPTERS.values()]


def get_adapter(name: str) -> Adapter:
    """The adapter registered for a dataset name (case-insensitive); DataError listing the known names if none."""
    adapter = ADAPTERS.get(name.strip().lower())
    if adapter is None:
        raise DataError(f"unknown dataset adapter {name!r}: known names are {', '.join(known_names())}")
    return adapter


def adapter_for_path(path: str) -> Adapter | None:
    """The adapter of a local copy of a hub dataset, from its path: '/x/Dahoas/rm-static', or the hub cache's
    'Dahoas___rm-static' / 'Dahoas--rm-static' spelling of the last component. None when nothing matches."""
    parts = [p for p in re.split(r"[\\/]+", path.rstrip("/\\")) if p]
    candidates = []
    if len(parts) >= 2:
        candidates.append(f"{parts[-2]}/{parts[-1]}")
    if parts:
        candidates.append(re.sub(r"___|--", "/", parts[-1], count=1))
    for cand in candidates:
        adapter = ADAPTERS.get(cand.lower())
        if adapter is not None:
            return adapter
    return None


def adapter_for_columns(columns: Iterable[str]) -> Adapter | None:
    """Guess from the columns alone: prompt+chosen is the generic layout, chosen+rejected whole transcripts are
    Anthropic/hh-rlhf's."""
    cols = set(columns)
    if {"prompt", "chosen"} <= cols:
        return ADAPTERS[GENERIC.lower()]
    if {"chosen", "rejected"} <= cols:
        return ADAPTERS["anthropic/hh-rlhf"]
    return None


def missing_columns(adapter: Adapter, columns: Iterable[str]) -> list[str]:
    cols = set(columns)
    return [c for c in adapter.required if c not in cols]
