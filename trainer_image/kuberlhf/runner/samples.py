"""The end of a run: how the final policy answers, next to the SFT policy, scored by the trained reward model.

``evaluate_policies`` is also how the tests check that PPO raised the reward: the mean reward-model score of
answers the SFT policy and the final policy generate for the same held-out prompts (the PPO stage's eval slice,
prompts no stage trained on)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
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
        text = text[len(HUMAN) :].lstrip()
    return text


def _eval_slices(pipeline: RLHFPipeline, stages: Sequence[Stage]) -> dict[Stage, list[str]]:
    """The held-out prompts of each stage's eval slice, the rows blended once per stage."""
    from kuberlhf.data.blend import stage_rows

    return {stage: list(stage_rows(pipeline.spec.data, stage)[1]["prompt"]) for stage in stages}


def heldout_prompts(
    pipeline: RLHFPipeline, limit: int | None = None, slices: Mapping[Stage, Sequence[str]] | None = None
) -> list[str]:
    """Prompts of the PPO stage's held-out slice (never trained on), deduplicated, in a fixed order."""
    ev = (slices or _eval_slices(pipeline, (Stage.ppo,)))[Stage.ppo]
    prompts = list(dict.fromkeys(p for p in ev if p.strip()))
    return prompts[:limit] if limit else prompts


DIALOGUE_SLICES = (Stage.ppo, Stage.reward, Stage.sft)


def heldout_dialogues(
    pipeline: RLHFPipeline, limit: int = 64, slices: Mapping[Stage, Sequence[str]] | None = None
) -> list[str]:
    """Multi-turn prompts whose last question refers back (:func:`kuberlhf.data.dialogues.is_follow_up`) from the
    eval slices of all three stages: the splits are disjoint, so no stage trained on them. Deduplicated, in a
    fixed order."""
    from kuberlhf.data.dialogues import is_follow_up

    slices = slices or _eval_slices(pipeline, DIALOGUE_SLICES)
    prompts = [p for stage in DIALOGUE_SLICES for p in slices[stage] if is_follow_up(p)]
    return list(dict.fromkeys(prompts))[:limit]


def load_policy(model_dir: Path) -> tuple[Any, Any]:
    """(tokenizer, model) of a causal LM directory, ready for batched generation (left padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation continues right after each prompt
    return tok, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def generate_answers(
    model: Path | tuple[Any, Any],
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 1234,
    batch_size: int = 64,
) -> list[str]:
    """Answers of a causal LM (HF directory, or ``load_policy``'s pair) to Human/Assistant prompts, cut at the
    next 'Human:' turn. ``temperature`` 0: greedy (the policy's most likely answer, no sampling noise)."""
    import torch

    tok, lm = load_policy(model) if isinstance(model, Path | str) else model
    answers: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    for start in range(0, len(prompts), batch_size):
        batch = [format_prompt(p) for p in prompts[start : start + batch_size]]
        enc = tok(batch, return_tensors="pt", padding=True)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        with torch.no_grad():
            out = lm.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
        for row in out[:, enc["input_ids"].shape[1] :]:
            answers.append(cut_at_next_turn(tok.decode(row, skip_special_tokens=True)))
    return answers


def load_reward_model(reward_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from kuberlhf.models.reward import RewardModel

    return AutoTokenizer.from_pretrained(reward_dir), RewardModel.from_pretrained(reward_dir).eval()


def reward_scores(
    reward: Path | tuple[Any, Any], prompts: Sequence[str], answers: Sequence[str], batch_size: int = 64
) -> list[float]:
    """The reward model's score (a directory, or ``load_reward_model``'s pair) of each (prompt, answer), encoded
    exactly as step 2 trained it (prompt and answer tokenised apart, EOS appended: ``data.encode.encode_pairs``),
    so the score is read at the EOS as in training and in step 3's rollouts."""
    import torch

    from kuberlhf.data.encode import encode_pairs, pad_id
    from kuberlhf.data.tokenized import pad_right

    tok, rm = load_reward_model(reward) if isinstance(reward, Path | str) else reward
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        ps = [format_prompt(p) for p in prompts[start : start + batch_size]]
        ans = [format_response(a) for a in answers[start : start + batch_size]]
        ids = [torch.tensor(x) for x in encode_pairs(ps, ans, ans, tok, 1 << 30)["chosen_input_ids"]]
        input_ids = pad_right(ids, pad_id(tok))
        mask = pad_right([torch.ones(len(x), dtype=torch.long) for x in ids], 0)
        with torch.no_grad():
            scores.extend(float(s) for s in rm.end_scores(input_ids, mask))
    return scores


def evaluate_policies(
    policies: Mapping[str, Path],
    reward_dir: Path,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 1234,
    dialogues: Sequence[str] = (),
) -> dict[str, Any]:
    """For each named policy (each model and the reward model loaded once): its answers to ``prompts`` and their
    RM scores, the mean score, and, given follow-up ``dialogues``, its answers to them and the share that stays on
    the conversation's subject (:func:`kuberlhf.data.dialogues.on_subject_share`). One batched generation per
    policy over both prompt sets."""
    from kuberlhf.data.dialogues import on_subject_share

    rm = load_reward_model(reward_dir)
    result: dict[str, Any] = {"prompts": list(prompts), "dialogues": list(dialogues), "policies": {}}
    for name, path in policies.items():
        both = generate_answers(
            load_policy(path),
            [*prompts, *dialogues],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        answers, dialogue_answers = both[: len(prompts)], both[len(prompts) :]
        scores = reward_scores(rm, prompts, answers)
        result["policies"][name] = {
            "answers": answers,
            "scores": scores,
            "mean_score": sum(scores) / max(1, len(scores)),
        }
        if dialogues:
            result["policies"][name].update(
                dialogue_answers=dialogue_answers, on_subject=on_subject_share(dialogues, dialogue_answers)
            )
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


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread meanwhile: the stages run one thread per rank (``stage_env``) for the same
    reason; for models this small a second thread only adds synchronisation (measured: the end-of-run evaluation
    takes 16 CPU-s on one thread, 25 on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def show_samples(out: Path, pipeline: RLHFPipeline, n: int, console: Console) -> dict[str, Any] | None:
    """Print n exchanges (SFT vs final policy) and, on the held-out prompts, the mean RM score of both and the
    share of follow-up answers that stay on the dialogue's subject. Greedy answers: each policy's most likely
    answer, so one pass over 64 prompts and 64 dialogues measures the policy itself, not a sampling draw."""
    import json

    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading three small models: their bars are noise here
    last = pipeline.spec.final_stage.value
    ppo = generation_settings(pipeline)
    label = f"SFT + {last.upper()}"
    ema = out / last / "ema"
    final = ema if pipeline.spec.final_ema_enabled and ema.exists() else out / last / "model"
    if not (final.exists() and (out / "sft").exists() and (out / "reward").exists()):
        return None
    slices = _eval_slices(pipeline, DIALOGUE_SLICES)
    prompts = heldout_prompts(pipeline, limit=64, slices=slices)
    if not prompts:
        return None
    dialogues = heldout_dialogues(pipeline, 64, slices=slices)
    with one_thread():
        ev = evaluate_policies(
            {"sft": out / "sft", "final": final},
            out / "reward",
            prompts,
            max_new_tokens=ppo.max_answer_len,
            temperature=0.0,
            dialogues=dialogues,
        )
    sft, fin = ev["policies"]["sft"], ev["policies"]["final"]
    console.header(
        f"sample exchanges: the held-out prompts where {last.upper()} changed the reward-model score most "
        f"(score in brackets; greedy answers; final = {final})"
    )
    for i in most_changed(sft["scores"], fin["scores"], n):
        console.line(f"Human: {display_prompt(prompts[i])}")
        console.line(f"  SFT       [{sft['scores'][i]:+.2f}] Assistant: {sft['answers'][i]}")
        console.line(f"  {label:<9} [{fin['scores'][i]:+.2f}] Assistant: {fin['answers'][i]}")
        console.line()
    console.info(
        f"mean reward-model score on {len(prompts)} held-out prompts: SFT {sft['mean_score']:+.3f} -> "
        f"{label} {fin['mean_score']:+.3f}"
    )
    if dialogues:
        console.info(
            f"answers that stay on the conversation's subject, {len(dialogues)} held-out dialogues' "
            f"follow-ups: SFT {sft['on_subject']:.2f} -> {label} {fin['on_subject']:.2f}"
        )
    truth = score_true_reward(pipeline, prompts, ev)
    if truth:
        console.info(
            f"mean true reward ({pipeline.spec.data.true_reward}, never trained on) on the same answers: "
            f"SFT {truth['sft']:.3f} -> {label} {truth['final']:.3f}"
        )
    with open(out / "samples.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(
                json.dumps(
                    {
                        "prompt": p,
                        "sft": sft["answers"][i],
                        "sft_score": sft["scores"][i],
                        "final": fin["answers"][i],
                        "final_score": fin["scores"][i],
                    }
                )
                + "\n"
            )
        for i, p in enumerate(dialogues):
            f.write(
                json.dumps({"prompt": p, "sft": sft["dialogue_answers"][i], "final": fin["dialogue_answers"][i]}) + "\n"
            )
    result = {
        "heldoutPrompts": len(prompts),
        "sftMeanScore": sft["mean_score"],
        "finalMeanScore": fin["mean_score"],
        "finalModel": str(final),
    }
    if truth:
        result.update(sftTrueReward=truth["sft"], finalTrueReward=truth["final"])
    if dialogues:
        result.update(heldoutDialogues=len(dialogues), sftOnSubject=sft["on_subject"], finalOnSubject=fin["on_subject"])
    return result


def score_true_reward(pipeline: RLHFPipeline, prompts: Sequence[str], ev: Mapping[str, Any]) -> dict[str, float]:
    """Mean ``spec.data.trueReward`` of each evaluated policy's answers ({} when the data has none); the
    function gets the prompt as the model saw it, like in step 3's rollouts."""
    from kuberlhf.data.true_reward import load_true_reward, true_rewards

    fn = load_true_reward(pipeline.spec.data.true_reward)
    if fn is None:
        return {}
    formatted = [format_prompt(p) for p in prompts]
    return {
        name: sum(v := true_rewards(fn, formatted, pol["answers"])) / max(1, len(v))
        for name, pol in ev["policies"].items()
    }
