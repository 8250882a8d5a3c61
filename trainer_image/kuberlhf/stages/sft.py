"""Step 1, supervised fine-tuning: next-token loss on prompt + chosen answer (padding masked, the prompt too
when ``maskPrompt``), perplexity on the held-out rows. Writes ``sft/model/`` (HF format)."""

from __future__ import annotations

import torch

from kuberlhf.rlhf.ppo_math import causal_lm_loss
from kuberlhf.stages.common import mean_over_ranks, settings
from kuberlhf.stages.runtime import StageRun
from kuberlhf.stages.supervised import supervised_loop, tokenized_splits, training_engine
from kuberlhf.training.ds_config import train_ds_config
from kuberlhf.training.export import export_causal_lm
from kuberlhf.training.loop import make_loader, plan_for, safe_exp, to_device


@torch.no_grad()
def evaluate_lm(engine, dataset, micro_batch: int, rank: int, world: int) -> dict[str, float]:
    """Mean next-token loss over the eval rows of this rank (then averaged over ranks) and its perplexity."""
    engine.eval()
    total, n = 0.0, 0
    if len(dataset) > 0:
        for batch in make_loader(dataset, micro_batch, rank, world, 0, 0, shuffle=False, drop_last=False):
            batch = to_device(batch, engine.device)
            out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            total += float(causal_lm_loss(out.logits, batch["labels"]))
            n += 1
    loss = mean_over_ranks({"loss": total / max(n, 1)})["loss"]
    return {"loss": loss, "perplexity": safe_exp(loss)}


def run_sft(run: StageRun) -> None:
    from kuberlhf.data import SFTDataset
    from kuberlhf.models import load_causal_lm, load_tokenizer
    from kuberlhf.models.lora import apply_lora

    spec, st = run.spec, run.stage_spec
    s = settings(run)
    ds_config = train_ds_config(s)
    source = run.model_source(spec.actor.model, "spec.actor.model", "actor")
    # the revision is the model's: it applies to the tokenizer only when that comes from the same repository
    tokenizer = load_tokenizer(spec.actor.tokenizer or source, "spec.actor.model",
                               revision=None if spec.actor.tokenizer else spec.actor.revision)
    train_ds, eval_ds = tokenized_splits(run, SFTDataset, tokenizer, spec.data.max_seq_len, st.mask_prompt)
    plan = plan_for(len(train_ds), s.micro_batch, s.world_size, s.grad_accum, st.epochs, st.max_steps,
                    "spec.stages.sft")
    model = load_causal_lm(source, "spec.actor.model", seed=st.seed, dropout=spec.actor.dropout,
                           gradient_checkpointing=st.gradient_checkpointing, revision=spec.actor.revision,
                           ds_config=ds_config, tokenizer=tokenizer)
    apply_lora(model, st.lora, "spec.stages.sft.lora")
    engine = training_engine(run, model, ds_config, plan.total_steps)

    def train_step(batch):
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return causal_lm_loss(out.logits, batch["labels"]), {"tokens": float(batch["attention_mask"].sum())}

    def evaluate():
        return evaluate_lm(engine, eval_ds, s.micro_batch, run.dist.rank, run.dist.world_size)

    steps = supervised_loop(run, engine, train_ds, plan, s.micro_batch, train_step, evaluate)
    out = run.output_dir("model")
    export_causal_lm(engine, tokenizer, out)
    run.finish({"model": out}, {"steps": steps})
