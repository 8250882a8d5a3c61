"""Helpers every benchmark shares: the CPU DeepSpeed environment, the tiny models on disk, a spec from the
tiny-cpu example, timing of interleaved runs and the ratio lines the benchmarks print.

Benchmarks compare against a baseline measured in the same process and the same run, interleaving the two
(A B A B ...) so that load from other processes on a shared machine hits both alike; only ratios are meant to
be read across machines."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY_EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"


def cpu_env(threads: int | None = None) -> None:
    """DeepSpeed on CPU (gloo, no JIT-built ops) and a fixed thread count for every side of a comparison."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "kuberlhf" / "torch_extensions"))
    threads = threads or int(os.environ.get("BENCH_THREADS", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def tiny_spec(overrides: dict[str, Any] | None = None):
    """The tiny-cpu example's spec on one rank (``overrides``: stage name -> fields, wire names)."""
    import yaml

    from kuberlhf.contract.spec import parse_pipeline

    doc = yaml.safe_load(TINY_EXAMPLE.read_text())
    for stage in ("sft", "reward", "ppo"):
        doc["spec"]["stages"][stage]["gpusPerNode"] = 1
    for stage, fields in (overrides or {}).items():
        doc["spec"]["stages"][stage].update(fields)
    return parse_pipeline(doc).spec


MODEL_SIZES = ("tiny", "opt-125m")


def sized_causal_lm(size: str, seed: int):
    """A random-weight causal LM of ``size``: the tiny OPT, or ``opt-125m``: facebook/opt-125m's published shape
    (kuberlhf.planner.shapes.KNOWN_CONFIGS, no hub; its 50272-word embeddings and LM head kept so the arithmetic
    is the real model's) with the tiny tokenizer's special ids, whose 768 ids all fit."""
    import torch

    from kuberlhf.models.tiny import tiny_causal_lm, tiny_config

    if size == "tiny":
        return tiny_causal_lm(seed)
    from transformers import OPTConfig, OPTForCausalLM

    from kuberlhf.planner.shapes import KNOWN_CONFIGS

    if size != "opt-125m":
        raise ValueError(f"model size {size!r}: one of {MODEL_SIZES}")
    tiny = tiny_config()
    values = {k: v for k, v in KNOWN_CONFIGS["facebook/opt-125m"].items() if k != "model_type"}
    values.update(pad_token_id=tiny.pad_token_id, bos_token_id=tiny.bos_token_id, eos_token_id=tiny.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OPTForCausalLM(OPTConfig(**values))


def write_tiny_models(root: Path, seed: int = 1234, size: str = "tiny") -> tuple[Path, Path]:
    """Step-1-like actor and step-2-like reward model directories of ``size`` (:func:`sized_causal_lm`, random
    weights), both with the tiny tokenizer; the reward model's backbone is another seed's actor."""
    from kuberlhf.models import RewardModel, load_tokenizer
    from kuberlhf.models.tiny import TINY_MODEL_NAME

    actor_dir, critic_dir = root / f"actor-{size}", root / f"critic-{size}"
    tok = load_tokenizer(TINY_MODEL_NAME)
    sized_causal_lm(size, seed).save_pretrained(actor_dir)
    tok.save_pretrained(actor_dir)
    if size == "tiny":
        critic = RewardModel.from_causal_lm_source(TINY_MODEL_NAME, seed=seed + 1)
    else:
        backbone_dir = root / f"reward-backbone-{size}"
        sized_causal_lm(size, seed + 1).save_pretrained(backbone_dir)
        critic = RewardModel.from_causal_lm_source(str(backbone_dir), seed=seed + 1)
    critic.save_pretrained(critic_dir, tokenizer=tok)
    return actor_dir, critic_dir


@dataclass
class Timings:
    """Wall-clock samples per named side."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def total(self, name: str) -> float:
        return sum(self.samples[name])


def interleave(sides: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> Timings:
    """Run every side ``warmup`` times untimed, then ``rounds`` times each, alternating."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    t = Timings()
    for _ in range(rounds):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            t.add(name, time.perf_counter() - t0)
    return t


def goal_line(name: str, ratio: float, goal: float, higher_is_better: bool = True, unit: str = "x") -> str:
    ok = ratio >= goal if higher_is_better else ratio <= goal
    rel = ">=" if higher_is_better else "<="
    return f"{name}: {ratio:.2f}{unit} (goal {rel} {goal}{unit}: {'REACHED' if ok else 'NOT REACHED'})"


def emit(result: dict[str, Any]) -> None:
    """Print a machine-readable result line (bench/run.sh collects them) after the human-readable lines."""
    out = os.environ.get("BENCH_RESULTS")
    line = json.dumps(result, sort_keys=True)
    print("RESULT " + line)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    sys.stdout.flush()
