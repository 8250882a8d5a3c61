"""The quality suite's manifest for each step-3 algorithm (``bench/rlhf_quality.py --algorithms``), made from the
ppo manifest of the same task so every algorithm gets the same SFT model, data and split:

- ``ppo``: the manifest as it is (``examples/tiny-cpu.yaml``'s recipe);
- ``dpo``: ``sft -> dpo`` on step 2's pairs (the same datasets and ``data.split`` share the reward model trains
  on: DeepSpeed-Chat's step2_dpo), with step 2's batch, epochs and ranks, DeepSpeed-Chat's ``beta`` 0.1, and
  RPO's NLL term on the chosen answers (``rpoAlpha`` 1, Pang et al. 2024's value): plain DPO lowered copy's chosen
  answers with the rejected ones and drifted 53 nats per answer from SFT (bench/RESULTS.md section 7);
- ``grpo``: ``sft -> reward -> grpo``, scored by the same reward model as ppo, with ppo's rollout budget (the
  same number of answers sampled per step: ``generationBatchSize / groupSize`` prompts x ``groupSize``), steps,
  actor rate, EMA, temperature and lengths, DeepSeekMath's ``klCoef`` 0.04, and advantages scaled by the batch's
  reward spread (``scaleRewards: batch``), not each group's: on copy a quarter of the groups are four wrong answers
  tied at the reward clip but one, which per-group scaling lifted to a right answer's advantage;
- ``grpo-code``: the same GRPO stage scored by code instead of a reward model (``rewardFunction``): the task's
  programmatic reward, as a verifiable task (an exact answer, a format) would score its answers; no reward stage.

The metadata name, data and sft settings stay the ppo manifest's, so ``kuberlhf run`` in the same output
directory finds the committed SFT model (and reward model) by their fingerprints and does not train them again.
Pure."""

from __future__ import annotations

import copy
from typing import Any

ALGORITHMS = ("ppo", "dpo", "grpo", "grpo-code")
GROUP_SIZE = 4
DPO = {"beta": 0.1, "learningRate": 1.0e-4, "rpoAlpha": 1.0}  # DeepSpeed-Chat's beta; ppo's actor rate; RPO
GRPO_KL = 0.04  # DeepSeekMath's beta, on the k3 estimate (docs/algorithms.md)
GRPO_SCALE = "batch"
_SHARED = ("nodes", "gpusPerNode", "dtype", "checkpointEverySteps", "resources")


def final_stage(doc: dict[str, Any]) -> str:
    """The stage whose model the pipeline serves: ppo, dpo or grpo."""
    return doc["spec"].get("algorithm", "ppo")


def graph(doc: dict[str, Any]) -> list[str]:
    """The stages the manifest runs, in order (as ``PipelineSpec.stage_graph``)."""
    final = final_stage(doc)
    has_rm = final == "ppo" or (final == "grpo" and "rewardFunction" not in doc["spec"]["stages"]["grpo"])
    return ["sft", *(["reward"] if has_rm else []), final]


def manifest_for_algorithm(ppo_doc: dict[str, Any], algorithm: str, reward_function: str) -> dict[str, Any]:
    """``ppo_doc`` (a task's ppo manifest) turned into ``algorithm``'s; ``reward_function``: the task's
    ``module:function`` that scores (prompt, answer), for ``grpo-code``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
    doc = copy.deepcopy(ppo_doc)
    if algorithm == "ppo":
        return doc
    spec = doc["spec"]
    stages = spec["stages"]
    ppo = stages.pop("ppo")
    if algorithm == "dpo":
        reward = stages.pop("reward")
        spec.pop("reward", None)
        keep = (*_SHARED, "zeroStage", "lora", "perDeviceBatchSize", "epochs", "maxSteps")
        stages["dpo"] = {**{k: reward[k] for k in keep if k in reward}, **DPO}
    else:
        per_rank = ppo["generationBatchSize"]
        grpo = {
            k: ppo[k]
            for k in (
                *_SHARED,
                "actorZeroStage",
                "actorLora",
                "maxSteps",
                "actorLearningRate",
                "ema",
                "temperature",
                "maxPromptLen",
                "maxAnswerLen",
            )
            if k in ppo
        }
        grpo.update(
            groupSize=GROUP_SIZE,
            generationBatchSize=max(1, per_rank // GROUP_SIZE),
            perDeviceBatchSize=ppo["perDeviceBatchSize"],
            klCoef=GRPO_KL,
            scaleRewards=GRPO_SCALE,
            ptxCoef=ppo.get("ptxCoef", 0),
        )
        if algorithm == "grpo-code":
            grpo["rewardFunction"] = reward_function
            stages.pop("reward")
            spec.pop("reward", None)
        stages["grpo"] = grpo
    spec["algorithm"] = "dpo" if algorithm == "dpo" else "grpo"
    return doc
