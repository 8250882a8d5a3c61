"""The end of a run: how the final policy answers, next to the SFT policy, scored by the trained reward model.

``evaluate_policies`` is also how the tests check that PPO raised the reward: the mean reward-model score of
answers the SFT policy and the final policy generate for the same held-out prompts (the PPO stage's eval slice,
prompts no stage trained on)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kuberlhf.contract.spec import RLHFPipeline, Stage
from kuberlhf.data.format import ASSISTANT, HUMAN, cut_at_next_turn, format_prompt, format_response
from kuberlhf.runner.console import Console


def display_prompt(prompt: str) -> str:
    """The user's words of a formatted prompt: ' Human: What is 2+2? Assistant:' -> 'What is 2+2?'."""
    text = prompt.strip()
    if text.endswith(ASSISTANT):
        text = text[: -len(ASSISTANT)].rstrip()
    if text.startswith(HUMAN):
        text = text[len(HUMAN):].lstrip()
    return text


def heldout_prompts(pipeline: RLHFPipeline, limit: int | None = None) -> list[str]:
    """Prompts of the PPO stage's held-out slice (never trained on), deduplicated, in a fixed order."""
    from kuberlhf.data.blend import stage_rows

    _, ev = stage_rows(pipeline.spec.data, Stage.ppo)
    prompts = list(dict.fromkeys(p for p in ev["prompt"] if p.strip()))
    return prompts[:limit] if limit else prompts


def heldout_dialogues(pipeline: RLHFPipeline, limit: int = 64) -> list[str]:
    """Multi-turn prompts whose last question refers back (:func:`kuberlhf.data.dialogues.is_follow_up`) from the
    eval slices of all three stages: the splits are disjoint, so no stage trained on them. Deduplicated, in a
    fixed order."""
    from kuberlhf.data.blend import stage_rows
    from kuberlhf.data.dialogues import is_follow_up

    prompts: list[str] = []
    for stage in (Stage.ppo, Stage.reward, Stage.sft):
        _, ev = stage_rows(pipeline.spec.data, stage)
        prompts += [p for p in ev["prompt"] if is_follow_up(p)]
    return list(dict.fromkeys(prompts))[:limit]


def generate_answers(model_dir: Path, prompts: Sequence[str], *, max_new_tokens: int, temperature: float,
                     top_p: float, seed: int, batch_size: int = 32) -> list[str]:
    """Answers of a causal LM (HF directory) to Human/Assistant prompts, cut at the next 'Human:' turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation continues right after each prompt
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        batch = [format_prompt(p) for p in prompts[start:start + batch_size]]
        enc = tok(batch, return_tensors="pt", padding=True)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_p=top_p, pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:]:
            answers.append(cut_at_next_turn(tok.decode(row, skip_special_tokens=True)))
    return answers


def reward_scores(reward_dir: Path, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32) -> list[float]:
    """The reward model's score of each (prompt, answer), encoded exactly as step 2 trained it (prompt and answer
    tokenised apart, EOS appended: ``data.encode.encode_pairs``), so the score is read at the EOS as in training
    and in step 3's rollouts."""
    import torch
    from transformers import AutoTokenizer

    from kuberlhf.data.encode import encode_pairs, pad_id
    from kuberlhf.data.tokenized import pad_right
    from kuberlhf.models.reward import RewardModel

    tok = AutoTokenizer.from_pretrained(reward_dir)
    rm = RewardModel.from_pretrained(reward_dir).eval()
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        ps = [format_prompt(p) for p in prompts[start:start + batch_size]]
        ans = [format_response(a) for a in answers[start:start + batch_size]]
        ids = [torch.tensor(x) for x in encode_pairs(ps, ans, ans, tok, 1 << 30)["chosen_input_ids"]]
        input_ids = pad_right(ids, pad_id(tok))
        mask = pad_right([torch.ones(len(x), dtype=torch.long) for x in ids], 0)
        with torch.no_grad():
            scores.extend(float(s) for s in rm.end_scores(input_ids, mask))
    return scores


def evaluate_policies(policies: Mapping[str, Path], reward_dir: Path, prompts: Sequence[str], *,
                      max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 1234
                      ) -> dict[str, Any]:
    """For each named policy: its answers and their RM scores, plus the mean score."""
    result: dict[str, Any] = {"prompts": list(prompts), "policies": {}}
    for name, path in policies.items():
        answers = generate_answers(path, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed)
        scores = reward_scores(reward_dir, prompts, answers)
        result["policies"][name] = {"answers": answers, "scores": scores,
                                    "mean_score": sum(scores) / max(1, len(scores))}
    return result


def most_changed(before: Sequence[float], after: Sequence[float], n: int) -> list[int]:
    """Indices of the n largest score changes (by size, ties by position): where PPO's effect shows."""
    order = sorted(range(len(before)), key=lambda i: (-abs(after[i] - before[i]), i))
    return order[:n]


def generation_settings(pipeline: RLHFPipeline) -> Any:
    """The sampling settings (maxAnswerLen, temperature, topP, seed) the samples use: grpo's in a grpo pipeline,
    else step 3 PPO's (dpo samples nothing itself: its answers are sampled like PPO's by default)."""
    st = pipeline.spec.stages
    return st.grpo if pipeline.spec.final_stage.value == "grpo" else st.ppo


def show_samples(out: Path, pipeline: RLHFPipeline, n: int, console: Console) -> dict[str, Any] | None:
    """Print n exchanges (SFT vs final policy) and the mean RM score of both on the held-out prompts."""
    import json

    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading four small models: their bars are noise here
    last = pipeline.spec.final_stage.value
    ppo = generation_settings(pipeline)
    label = f"SFT + {last.upper()}"
    ema = out / last / "ema"
    final = ema if pipeline.spec.final_ema_enabled and ema.exists() else out / last / "model"
    if not (final.exists() and (out / "sft").exists() and (out / "reward").exists()):
        return None
    prompts = heldout_prompts(pipeline, limit=64)
    if not prompts:
        return None
    policies = {"sft": out / "sft", "final": final}
    ev = evaluate_policies(policies, out / "reward", prompts, max_new_tokens=ppo.max_answer_len,
                           temperature=ppo.temperature, top_p=ppo.top_p, seed=ppo.seed)
    sft, fin = ev["policies"]["sft"], ev["policies"]["final"]
    console.header(f"sample exchanges: the held-out prompts where {last.upper()} changed the reward-model score most "
                   f"(score in brackets; final = {final})")
    for i in most_changed(sft["scores"], fin["scores"], n):
        console.line(f"Human: {display_prompt(prompts[i])}")
        console.line(f"  SFT       [{sft['scores'][i]:+.2f}] Assistant: {sft['answers'][i]}")
        console.line(f"  {label:<9} [{fin['scores'][i]:+.2f}] Assistant: {fin['answers'][i]}")
        console.line()
    console.info(f"mean reward-model score on {len(prompts)} held-out prompts: SFT {sft['mean_score']:+.3f} -> "
                 f"{label} {fin['mean_score']:+.3f}")
    subject = score_on_subject(pipeline, policies)
    if subject:
        console.info(f"answers that stay on the conversation's subject, {subject['dialogues']} held-out dialogues' "
                     f"follow-ups: SFT {subject['sft']:.2f} -> {label} {subject['final']:.2f}")
    truth = score_true_reward(pipeline, prompts, ev)
    if truth:
        console.info(f"mean true reward ({pipeline.spec.data.true_reward}, never trained on) on the same answers: "
                     f"SFT {truth['sft']:.3f} -> {label} {truth['final']:.3f}")
    with open(out / "samples.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"prompt": p, "sft": sft["answers"][i], "sft_score": sft["scores"][i],
                                "final": fin["answers"][i], "final_score": fin["scores"][i]}) + "\n")
    result = {"heldoutPrompts": len(prompts), "sftMeanScore": sft["mean_score"], "finalMeanScore": fin["mean_score"],
              "finalModel": str(final)}
    if truth:
        result.update(sftTrueReward=truth["sft"], finalTrueReward=truth["final"])
    if subject:
        result.update(heldoutDialogues=subject["dialogues"], sftOnSubject=subject["sft"],
                      finalOnSubject=subject["final"])
    return result


def score_on_subject(pipeline: RLHFPipeline, policies: Mapping[str, Path], limit: int = 64) -> dict[str, Any]:
    """Share of each policy's answers to held-out follow-up questions that stay on the dialogue's subject
    (:func:`kuberlhf.data.dialogues.on_subject`); {} when the data has no dialogues."""
    from kuberlhf.data.dialogues import on_subject_share

    dialogues = heldout_dialogues(pipeline, limit)
    if not dialogues:
        return {}
    ppo = generation_settings(pipeline)
    out: dict[str, Any] = {"dialogues": len(dialogues)}
    for name, path in policies.items():
        answers = generate_answers(path, dialogues, max_new_tokens=ppo.max_answer_len, temperature=ppo.temperature,
                                   top_p=ppo.top_p, seed=ppo.seed)
        out[name] = on_subject_share(dialogues, answers)
    return out


def score_true_reward(pipeline: RLHFPipeline, prompts: Sequence[str], ev: Mapping[str, Any]) -> dict[str, float]:
    """Mean ``spec.data.trueReward`` of each evaluated policy's answers ({} when the data has none); the
    function gets the prompt as the model saw it, like in step 3's rollouts."""
    from kuberlhf.data.true_reward import load_true_reward, true_rewards

    fn = load_true_reward(pipeline.spec.data.true_reward)
    if fn is None:
        return {}
    formatted = [format_prompt(p) for p in prompts]
    return {name: sum(v := true_rewards(fn, formatted, pol["answers"])) / max(1, len(v))
            for name, pol in ev["policies"].items()}
