"""RLHF quality suite: does the tiny recipe move the TRUE preference on tasks it was not tuned for?

For every task of ``bench/quality_tasks.py`` it writes the task's data (ambiguous SFT answers + preference pairs,
never the true reward), a manifest that is ``examples/tiny-cpu.yaml`` with only its datasets replaced (the task's
SFT file and pairs; no ptx corpus) and its reward model started from the SFT model (``stages.reward.initFromSft``;
see ``manifest_for``); every other stage setting is the example's: one recipe for all tasks, one seed. It runs
``kuberlhf run`` on it (the real stage contract: stage processes, embedded SeaweedFS, checkpoints), then measures
on fresh prompts:

- RM accuracy: the step-2 reward model on fresh held-out pairs (and the stage's own eval-split accuracy);
- true reward of the SFT policy, the final PPO actor (``ppo/model``) and the EMA actor (``ppo/ema``), answers
  sampled at the temperature ``kuberlhf chat`` uses (0.7, the example's ``ppo.temperature``);
- KL to the reference (SFT) per answer: the exact per-token KL of the tempered policies summed over each sampled
  answer, averaged over answers;
- wall time of the run.

    .venv/bin/python bench/rlhf_quality.py [--tasks style length copy topic] [--out bench/out/quality]
                                           [--algorithms ppo dpo grpo grpo-code] [--quick] [--jobs N]
                                           [--set PATH=VALUE ...] [--json FILE]

What the suite does not need, it skips: each stage runs on ONE rank with the example's global batch (per-rank
batch x ranks: the same updates, one process start less per stage and no all-reduce; ``--example-ranks`` keeps
the example's two), ``--jobs N`` tasks run side by side instead (default: one per core, the longest first), and
``kuberlhf run`` runs with ``--samples 0`` (its own end-of-run samples and scores: the suite evaluates every
policy itself; ``--runner-samples N`` keeps them).

``--algorithms`` runs each task's pipeline as each step-3 algorithm (``bench/quality_algorithms.py``: dpo, grpo
with the reward model, grpo with the task's reward as code), one after the other in the task's output directory,
so they share its SFT model (and reward model); each is measured like ppo (its final model and EMA).

``--set stages.ppo.actorLearningRate=3e-4 ...`` changes the recipe for every task at once (to try a recipe
before it goes into the example; never per task). A changed step-3 setting re-runs only step 3 in an existing
``--out``: the SFT and reward models are found by their fingerprints.

``--quick`` (the lean test's size) shortens every stage; goals are then checked for direction only."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"
sys.path.insert(0, str(BENCH))

import quality_algorithms as qa  # noqa: E402
import quality_tasks as qt  # noqa: E402

GOALS = {"rm_acc": 0.9, "gain": 0.2, "high_sft": 0.75, "high_abs": 0.95, "ema_gap": 0.05, "kl": 10.0}
# --quick (the lean test): fewer steps everywhere and no intermediate checkpoints (each stage on one rank, as in the
# full suite); the recipe's other settings stay the example's. The reward model, started from SFT, ranks
# style's training pairs all right from its 5th step (loss 0 from the 11th): 15 steps, not 2 epochs (90).
QUICK = {"sft": {"epochs": 4}, "reward": {"epochs": 1, "maxSteps": 15}, "ppo": {"maxSteps": 60}}
QUICK_NO_CHECKPOINTS = 10_000
# DPO takes step 2's length (bench/quality_algorithms.py), but the quick reward model's 15 steps are an RM that
# already ranks every pair right, not a DPO run: the quick DPO gets 2 epochs (90 steps), what its style figure
# in bench/RESULTS.md was measured with.
QUICK_DPO = {"epochs": 2}


@dataclass
class TaskResult:
    """``ppo`` / ``ema`` / ``kl_*`` / ``rm_score_ppo``: the final stage's model and EMA (ppo, dpo or grpo:
    ``algorithm``); the reward-model fields and ``ema`` are None where the pipeline has none (dpo, grpo-code)."""

    task: str
    rm_acc: float | None
    rm_acc_stage: float | None
    sft: float
    ppo: float
    ema: float | None
    kl_ppo: float
    kl_ema: float | None
    rm_score_sft: float | None
    rm_score_ppo: float | None
    wall_s: float
    stage_s: dict[str, float]
    eval_prompts: int
    algorithm: str = "ppo"

    def goals(self) -> dict[str, bool]:
        g = GOALS
        gain_ok = self.ppo >= g["high_abs"] if self.sft > g["high_sft"] else self.ppo >= self.sft + g["gain"]
        out = {"rm_acc>=0.9": self.rm_acc >= g["rm_acc"]} if self.rm_acc is not None else {}
        out["ppo_gain"] = gain_ok
        if self.ema is not None:
            out["ema>=ppo-0.05"] = self.ema >= self.ppo - g["ema_gap"]
        out["kl<10"] = max(self.kl_ppo, self.kl_ema or 0.0) < g["kl"]
        return out


def manifest_for(
    task: qt.Task,
    data: dict[str, Path],
    quick: bool,
    overrides: dict[str, Any] | None = None,
    one_rank: bool = True,
) -> dict[str, Any]:
    """The tiny example with this task's data (and without the built-in data's ptx corpus), its reward model
    started from step 1's model; no other stage setting changes (except stage lengths with ``quick``, and the
    ``--set`` overrides, the same for every task). ``one_rank``: every stage on one rank with the example's
    global batch (per-rank batch x its ranks): the same updates for one process start less per stage and no
    all-reduce, and the suite runs tasks side by side instead to fill the cores."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = f"quality-{task.name}"
    d = doc["spec"]["data"]
    d["datasets"] = [{"path": str(data["pairs"])}]
    d["sftOnly"] = [{"path": str(data["sft"])}]
    d["split"] = "0,1,1"  # step 1 reads only the ambiguous sftOnly file; pairs go to steps 2 and 3
    d["trueReward"] = task.true_reward_ref  # reporting only
    # The example's ptx corpus is the built-in data's pre-training text; a task's policy was pre-trained on the
    # task's SFT data alone, so that corpus is foreign to it (ptx loss 9-12 nats at step 0) and ptx would become a
    # second, unrelated language-model objective competing with PPO for the actor's updates (InstructGPT's ptx
    # mixes in the policy's OWN pre-training distribution). A task brings no such corpus: ptx is off.
    d.pop("unsupervised", None)
    # The reward model starts from the task's SFT model (stages.reward.initFromSft, InstructGPT's RM init), not
    # from a random tiny OPT: a random-init RM must first learn to read the task's words from 1,440 pairs and
    # ranked copy's numbers 0.79-0.99 depending on optimisation details, the SFT-initialised one 1.00
    # (bench/RESULTS.md). One setting for every task, like the rest of the recipe.
    doc["spec"].pop("reward", None)
    doc["spec"]["stages"]["reward"]["initFromSft"] = True
    for path, value in (overrides or {}).items():
        apply_override(doc["spec"], path, value)
    if one_rank:
        for st in doc["spec"]["stages"].values():
            ranks = st.get("gpusPerNode", 1) * st.get("nodes", 1)
            for key in ("perDeviceBatchSize", "generationBatchSize"):
                if key in st:
                    st[key] *= ranks
            st.update(nodes=1, gpusPerNode=1)
    if quick:
        for stage, values in QUICK.items():
            doc["spec"]["stages"][stage].update(values, checkpointEverySteps=QUICK_NO_CHECKPOINTS)
    return doc


def apply_override(spec: dict[str, Any], path: str, value: Any) -> None:
    """``--set stages.ppo.actorLearningRate=3e-4``: one value in the spec, for every task (a recipe change, never a
    per-task one)."""
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SystemExit(f"--set {path}: spec.{key} is not a mapping")
    node[leaf] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (VALUE read as YAML: 3e-4, true, {enabled: true})."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected spec.path=value, e.g. stages.ppo.actorLearningRate=3e-4")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        out[key] = parsed
    return out


def algorithm_manifest(
    task: qt.Task,
    data: dict[str, Path],
    quick: bool,
    algorithm: str,
    overrides: dict[str, Any] | None = None,
    one_rank: bool = True,
) -> dict[str, Any]:
    """``manifest_for`` as ``algorithm``'s pipeline (``bench/quality_algorithms.py``)."""
    base = manifest_for(task, data, quick, overrides, one_rank)
    doc = qa.manifest_for_algorithm(base, algorithm, task.true_reward_ref)
    dpo = doc["spec"]["stages"].get("dpo")
    if quick and dpo is not None:
        dpo.pop("maxSteps", None)
        dpo.update(QUICK_DPO)
    return doc


def metrics_copy(work: Path, algorithm: str) -> Path:
    """Where an algorithm's step metrics are kept: the next algorithm's run in the same output directory
    rewrites ``run/metrics.jsonl``."""
    return work / f"metrics-{algorithm}.jsonl"


def run_task(
    task: qt.Task,
    root: Path,
    quick: bool,
    log,
    reuse: bool = False,
    resume: bool = False,
    algorithm: str = "ppo",
    fresh: bool = True,
    overrides: dict[str, Any] | None = None,
    one_rank: bool = True,
    runner_samples: int = 0,
) -> tuple[Path, dict[str, Any], float]:
    """``fresh``: start from an empty output directory (the task's first algorithm); the later ones reuse its
    SFT (and reward) model."""
    work = root / task.name
    out = work / "run"
    suffix = "" if algorithm == "ppo" else f"-{algorithm}"
    manifest = work / f"pipeline{suffix}.yaml"
    if reuse and (out / "run.json").exists() and manifest.exists():
        doc = yaml.safe_load(manifest.read_text())
        state = json.loads((out / "run.json").read_text())
        log(f"[{task.name}] --reuse: evaluating the finished {algorithm} run in {out}")
        return out, doc, float(sum(state["stageSeconds"].get(s, 0.0) for s in qa.graph(doc)))
    data = qt.write_task_data(task, work / "data")
    doc = algorithm_manifest(task, data, quick, algorithm, overrides, one_rank)
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)}
    cli = Path(sys.executable).with_name("kuberlhf")
    # runner_samples 0 (the default): no end-of-run evaluation of the runner's own (samples, held-out scores and
    # true reward: minutes per run at load), which the suite does itself below on more prompts
    cmd = [str(cli) if cli.exists() else "kuberlhf", "run", str(manifest), "--output-dir", str(out)]
    cmd += ["--samples", str(runner_samples)]
    cmd += ["--fresh"] if fresh and not resume else []
    t0 = time.monotonic()
    run_log = work / f"run{suffix}.log"
    with run_log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{task.name}: kuberlhf run ({algorithm}) failed ({proc.returncode}); see {run_log}")
    log(f"[{task.name}] kuberlhf run ({algorithm}) finished in {wall:.0f} s ({run_log})")
    shutil.copyfile(out / "metrics.jsonl", metrics_copy(work, algorithm))
    if not fresh or resume:  # stages found committed were not run again: count them as their first run did
        state = json.loads((out / "run.json").read_text())
        wall = float(sum(state["stageSeconds"].get(s, 0.0) for s in qa.graph(doc)))
    return out, doc, wall


def policy_eval(
    policy_dir: Path,
    ref_dir: Path,
    prompts: list[str],
    task: qt.Task,
    *,
    temperature: float,
    max_new_tokens: int,
    max_prompt_len: int,
    seed: int,
    batch: int = 64,
) -> dict[str, Any]:
    """Sample answers at ``temperature``; their mean true reward and the mean summed per-token KL(policy_T ||
    ref_T) over each answer's tokens (through its EOS)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from kuberlhf.data.format import cut_at_next_turn, format_prompt
    from kuberlhf.models.loading import load_tokenizer
    from kuberlhf.rlhf.trainer import answer_mask, position_ids

    tok = load_tokenizer(str(policy_dir), padding_side="left")
    pol = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    eos, pad = int(tok.eos_token_id), int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    rewards, kls, answers = [], [], []
    for start in range(0, len(prompts), batch):
        texts = [format_prompt(p) for p in prompts[start : start + batch]]
        enc = tok(texts, return_tensors="pt", padding=True)
        ids, amask = enc.input_ids[:, -max_prompt_len:], enc.attention_mask[:, -max_prompt_len:]
        torch.manual_seed(seed + start)
        with torch.no_grad():
            seq = pol.generate(
                input_ids=ids,
                attention_mask=amask,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            p_len = ids.shape[1]
            ans = answer_mask(seq[:, p_len:], eos, pad)
            mask = torch.cat([amask, ans], dim=1)
            seq = torch.where(mask.bool(), seq, torch.full_like(seq, pad))
            pos = position_ids(mask)
            lp = F.log_softmax(
                pol(input_ids=seq, attention_mask=mask, position_ids=pos).logits[:, p_len - 1 : -1] / temperature, -1
            )
            lr = F.log_softmax(
                ref(input_ids=seq, attention_mask=mask, position_ids=pos).logits[:, p_len - 1 : -1] / temperature, -1
            )
            kl_tok = (lp.exp() * (lp - lr)).sum(-1) * ans
            kls.extend(kl_tok.sum(1).tolist())
        for text, row, m in zip(texts, seq[:, p_len:], ans, strict=True):
            answer = cut_at_next_turn(tok.decode(row[m.bool()], skip_special_tokens=True))
            answers.append(answer)
            rewards.append(task.reward(text, answer))
    return {"true_reward": sum(rewards) / len(rewards), "kl": sum(kls) / len(kls), "answers": answers}


def rm_accuracy(reward_dir: Path, triples: list[tuple[str, str, str]]) -> float:
    from kuberlhf.runner.samples import reward_scores

    prompts = [p for p, _, _ in triples]
    good = reward_scores(reward_dir, prompts, [g for _, g, _ in triples])
    bad = reward_scores(reward_dir, prompts, [b for _, _, b in triples])
    return sum(g > b for g, b in zip(good, bad, strict=True)) / len(triples)


def evaluate(task: qt.Task, out: Path, doc: dict[str, Any], wall: float, n_eval: int) -> tuple[TaskResult, dict]:
    from kuberlhf.runner.metrics import parse_jsonl, series
    from kuberlhf.runner.samples import reward_scores

    final = qa.final_stage(doc)
    has_rm = "reward" in qa.graph(doc)
    # the generation settings of step 3 (dpo has none: ppo's, i.e. the example's, as for every other algorithm)
    stages = doc["spec"]["stages"]
    gen = stages[final] if final != "dpo" else yaml.safe_load(EXAMPLE.read_text())["spec"]["stages"]["ppo"]
    kw = {
        "temperature": gen.get("temperature", 1.0),
        "max_new_tokens": gen["maxAnswerLen"],
        "max_prompt_len": gen["maxPromptLen"],
        "seed": 4321,
    }
    triples = qt.eval_examples(task, n_eval)
    prompts = [p for p, _, _ in triples]
    policies = [("sft", out / "sft"), ("ppo", out / final / "model")]
    if (out / final / "ema").exists():
        policies.append(("ema", out / final / "ema"))
    ev = {name: policy_eval(path, out / "sft", prompts, task, **kw) for name, path in policies}
    records = parse_jsonl((out / "metrics.jsonl").read_text())
    _, acc = series(records, "reward", "accuracy", "eval")
    state = json.loads((out / "run.json").read_text())
    rm = {
        name: sum(s := reward_scores(out / "reward", prompts, ev[name]["answers"])) / len(s) if has_rm else None
        for name in ("sft", "ppo")
    }
    res = TaskResult(
        task=task.name,
        rm_acc=rm_accuracy(out / "reward", triples) if has_rm else None,
        rm_acc_stage=acc[-1] if acc and has_rm else None,
        sft=ev["sft"]["true_reward"],
        ppo=ev["ppo"]["true_reward"],
        ema=ev["ema"]["true_reward"] if "ema" in ev else None,
        kl_ppo=ev["ppo"]["kl"],
        kl_ema=ev["ema"]["kl"] if "ema" in ev else None,
        rm_score_sft=rm["sft"],
        rm_score_ppo=rm["ppo"],
        wall_s=wall,
        stage_s={s: v for s, v in state.get("stageSeconds", {}).items() if s in qa.graph(doc)},
        eval_prompts=len(prompts),
        algorithm="grpo-code" if final == "grpo" and not has_rm else final,
    )
    samples = {name: list(zip(prompts[:4], e["answers"][:4], strict=True)) for name, e in ev.items()}
    return res, samples


def plot_curves(root: Path, tasks: list[str], algorithms: list[str], path: Path) -> Path:
    """One figure of every task's and algorithm's step-3 curves (from the metrics each run left: true reward,
    KL and score of the rollouts per ppo/grpo step; DPO's implicit reward margin per step) next to each other:
    where a goal is missed, this is where it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kuberlhf.runner.metrics import parse_jsonl, series
    from kuberlhf.runner.plots import moving_average

    panels = {
        "true_reward": "true reward of rollouts (8-step mean)",
        "kl": "KL to SFT, nats/answer (8-step mean)",
        "reward": "score of rollouts: reward model or code (8-step mean)",
        "margin": "DPO: implicit reward margin chosen - rejected (8-step mean)",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8))
    for name in tasks:
        for algorithm in algorithms:
            metrics = metrics_copy(root / name, algorithm)
            if not metrics.exists():  # a run from before the per-algorithm copies: its own metrics (ppo's only)
                metrics = root / name / "run" / "metrics.jsonl"
                if algorithm != "ppo" or not metrics.exists():
                    continue
            records = parse_jsonl(metrics.read_text())
            stage = "dpo" if algorithm == "dpo" else "ppo" if algorithm == "ppo" else "grpo"
            for ax, key in zip(axes, panels, strict=True):
                steps, values = series(records, stage, key)
                if values:
                    ax.plot(steps, moving_average(values, 8), label=f"{name} {algorithm}")
    for ax, title in zip(axes, panels.values(), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class LoadSampler:
    """The 1-minute load average every ``period`` seconds while open (a timing on a shared machine means little
    without it)."""

    def __init__(self, period: float = 30.0) -> None:
        self.period, self.samples = period, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> str:
        return f"{min(self.samples):.1f}-{max(self.samples):.1f}, mean {sum(self.samples) / len(self.samples):.1f}"


def table(results: list[TaskResult]) -> str:
    """One row per task and algorithm; "PPO actor" is the final stage's model (ppo, dpo or grpo)."""
    head = (
        "| task | algorithm | RM acc (fresh / stage eval) | true reward SFT | final actor | EMA "
        "| KL/answer actor / EMA (nats) | wall | goals |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        g = r.goals()
        missed = [k for k, ok in g.items() if not ok]
        rows.append(
            f"| {r.task} | {r.algorithm} | {_f(r.rm_acc)} / {_f(r.rm_acc_stage)} | {r.sft:.3f} | {r.ppo:.3f} | "
            f"{_f(r.ema)} | {r.kl_ppo:.2f} / {_f(r.kl_ema, 2)} | {r.wall_s / 60:.1f} min | "
            f"{'all met' if not missed else 'missed: ' + ', '.join(missed)} |"
        )
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(qt.TASKS), choices=list(qt.TASKS))
    ap.add_argument("--out", type=Path, default=BENCH / "out" / "quality")
    ap.add_argument(
        "--algorithms",
        nargs="+",
        default=["ppo"],
        choices=list(qa.ALGORITHMS),
        help="step-3 algorithms to run on each task, in this order, sharing its SFT model",
    )
    ap.add_argument("--quick", action="store_true", help="shorter stages (the lean test)")
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--reuse", action="store_true", help="evaluate finished runs in OUT again instead of re-running")
    ap.add_argument("--resume", action="store_true", help="continue interrupted runs in OUT (no --fresh)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (default OUT/results.json)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="tasks run at once, longest first (default: one per core; each stage runs on one rank)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="PATH=VALUE",
        help="change the recipe for EVERY task, e.g. stages.ppo.actorLearningRate=3e-4 (spec paths, YAML values)",
    )
    ap.add_argument(
        "--example-ranks", action="store_true", help="run each stage on the example's ranks (default: one rank)"
    )
    ap.add_argument(
        "--runner-samples",
        type=int,
        default=0,
        help="kuberlhf run's own end-of-run samples and scores (its --samples; default 0: the suite evaluates)",
    )
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    results, details = [], {}
    eval_lock = threading.Lock()

    def log(line: str) -> None:
        print(line, flush=True)

    def run_and_evaluate(name: str) -> list[tuple[str, TaskResult, dict]]:
        task, rows = qt.TASKS[name], []
        print(f"[{name}] {task.what}", flush=True)
        for i, algorithm in enumerate(args.algorithms):  # in turn: they share the task's SFT (and reward) model
            out, doc, wall = run_task(
                task,
                args.out,
                args.quick,
                log,
                args.reuse,
                args.resume,
                algorithm=algorithm,
                fresh=i == 0,
                overrides=overrides,
                one_rank=not args.example_ranks,
                runner_samples=args.runner_samples,
            )
            # now: the next algorithm's run rewrites the directory's run.json and metrics. One evaluation at a
            # time: two from_pretrained calls in two threads at once gave models with garbage weights (true
            # reward 0.5, KL 1e28 between two loads of one SFT model with --jobs 3)
            with eval_lock:
                res, samples = evaluate(task, out, doc, wall, args.eval_prompts)
            key = name if algorithm == "ppo" else f"{name}/{algorithm}"
            print(
                f"[{key}] RM acc {_f(res.rm_acc)}; true reward SFT {res.sft:.3f} -> {res.algorithm} {res.ppo:.3f}, "
                f"EMA {_f(res.ema)}; KL {res.kl_ppo:.2f}/{_f(res.kl_ema, 2)}; goals {res.goals()}",
                flush=True,
            )
            rows.append((key, res, samples))
        return rows

    # --jobs N: N tasks at once (their `kuberlhf run`s are process trees of their own), for a machine whose cores
    # one run cannot fill
    # longest task first (copy's SFT file is 3x the others'), so the last one to start is not the longest
    order = sorted(args.tasks, key=lambda t: -qt.TASKS[t].sft_rows)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool, LoadSampler() as load:
        futures = {name: pool.submit(run_and_evaluate, name) for name in order}
        for name in args.tasks:
            for key, res, samples in futures[name].result():
                results.append(res)
                details[key] = {"result": asdict(res), "goals": res.goals(), "samples": samples}
    total = time.monotonic() - t_all
    print(f"curves: {plot_curves(args.out, args.tasks, args.algorithms, args.out / 'curves.png')}")
    print("\n" + table(results))
    print(
        f"\nsuite wall time {total / 60:.1f} min ({'--quick' if args.quick else 'full'}, --jobs {args.jobs}"
        f"{', --set ' + ' '.join(args.overrides) if args.overrides else ''}; "
        f"{os.cpu_count()} cores, 1-minute load average during the run {load.summary()})"
    )
    (args.json or args.out / "results.json").write_text(
        json.dumps(
            {
                "quick": args.quick,
                "jobs": args.jobs,
                "overrides": overrides,
                "wall_s": total,
                "load_avg": load.samples,
                "tasks": details,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
