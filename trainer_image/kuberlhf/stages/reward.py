"""Step 2, reward model: backbone + scalar head trained with the pairwise loss ``-log sigmoid(r_c - r_r)``
on (chosen, rejected) pairs, scores read at the last non-pad token. Eval reports accuracy (share of held-out
pairs ranked right) and the mean chosen / rejected scores. Writes ``reward/model/`` (format in
``kuberlhf.models.reward``)."""

from __future__ import annotations

import torch

from kuberlhf.contract.spec import ModelRef
from kuberlhf.rlhf.ppo_math import pairwise_loss
from kuberlhf.stages.common import mean_over_ranks, settings
from kuberlhf.stages.runtime import StageRun
from kuberlhf.stages.supervised import supervised_loop, tokenized_splits, training_engine
from kuberlhf.training.ds_config import train_ds_config
from kuberlhf.training.export import export_reward_model
from kuberlhf.training.loop import make_loader, plan_for, to_device


def pair_scores(engine, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) end scores of a pair batch laid out chosen rows first, then rejected rows."""
    _, scores = engine(batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half].float(), scores[half:].float()


@torch.no_grad()
def evaluate_rm(engine, dataset, micro_batch: int, rank: int, world: int) -> dict[str, float]:
    engine.eval()
    correct = total = 0.0
    chosen_sum = rejected_sum = 0.0
    if len(dataset) > 0:
        for batch in make_loader(dataset, micro_batch, rank, world, 0, 0, shuffle=False, drop_last=False):
            c, r = pair_scores(engine, to_device(batch, engine.device))
            correct += float((c > r).sum())
            total += c.numel()
            chosen_sum += float(c.sum())
            rejected_sum += float(r.sum())
    sums = mean_over_ranks({"correct": correct, "total": total, "chosen": chosen_sum, "rejected": rejected_sum})
    n = max(sums["total"], 1e-9)
    return {"accuracy": sums["correct"] / n, "chosen_score": sums["chosen"] / n, "rejected_score": sums["rejected"] / n}


def reward_base(run: StageRun) -> tuple[ModelRef, str]:
    """The model the reward model starts from, as a local reference, and the manifest field it comes from:
    step 1's committed model with ``stages.reward.initFromSft`` (InstructGPT's RM initialisation; the actor's
    dropout override applies), else ``spec.reward`` (DeepSpeed-Chat's)."""
    spec = run.spec
    if spec.reward_from_sft:
        sft = run.fetch(run.layout.model_uri("sft"), "sft-model", "the step-1 (SFT) model")
        return ModelRef(model=str(sft), dropout=spec.actor.dropout), "spec.stages.reward.initFromSft"
    local = run.model_source(spec.reward.model, "spec.reward.model", "reward-base")
    return spec.reward.model_copy(update={"model": local}), "spec.reward.model"


def run_reward(run: StageRun) -> None:
    from kuberlhf.data import PairDataset
    from kuberlhf.models import RewardModel, load_tokenizer
    from kuberlhf.models.lora import apply_lora

    spec, st = run.spec, run.stage_spec
    s = settings(run)
    ds_config = train_ds_config(s)
    base, field = reward_base(run)
    source = base.model
    tokenizer = load_tokenizer(base.tokenizer or source, field, revision=None if base.tokenizer else base.revision)
    train_ds, eval_ds = tokenized_splits(run, PairDataset, tokenizer, spec.data.max_seq_len)
    plan = plan_for(len(train_ds), s.micro_batch, s.world_size, s.grad_accum, st.epochs, st.max_steps,
                    "spec.stages.reward")
    model = RewardModel.from_causal_lm_source(source, field, seed=st.seed, dropout=base.dropout,
                                              revision=base.revision, ds_config=ds_config)
    if st.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    apply_lora(model, st.lora, "spec.stages.reward.lora")
    engine = training_engine(run, model, ds_config, plan.total_steps)

    def train_step(batch):
        c, r = pair_scores(engine, batch)
        return pairwise_loss(c, r), {"accuracy": float((c > r).float().mean())}

    def evaluate():
        return evaluate_rm(engine, eval_ds, s.micro_batch, run.dist.rank, run.dist.world_size)

    steps = supervised_loop(run, engine, train_ds, plan, s.micro_batch, train_step, evaluate)
    out = run.output_dir("model")
    export_reward_model(engine, tokenizer, out)
    run.finish({"model": out}, {"steps": steps})
