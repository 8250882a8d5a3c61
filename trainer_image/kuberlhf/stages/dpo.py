"""The dpo stage (``spec.algorithm: dpo``, after step 1): the SFT model trained with DPO on step 2's (chosen,
rejected) pairs (same datasets, same ``data.split`` share, as DeepSpeed-Chat's step2_dpo_finetuning) against a
frozen reference copy of itself (``offloadReferenceModel`` keeps its ZeRO-3 partitions in CPU memory). The loop,
checkpoints (``dpo/ckpt/step-N/``, resumed), metrics and eval are steps 1-2's (``supervised_loop``); the formulas are
:mod:`kuberlhf.rlhf.dpo`. Writes ``dpo/model/`` (HF format), which serving serves."""

from __future__ import annotations

import torch

from kuberlhf.stages.common import mean_over_ranks, settings
from kuberlhf.stages.runtime import StageRun
from kuberlhf.stages.supervised import supervised_loop, tokenized_splits, training_engine
from kuberlhf.training.ds_config import eval_ds_config, train_ds_config
from kuberlhf.training.export import export_causal_lm
from kuberlhf.training.loop import ds_initialize, make_loader, plan_for, to_device


@torch.no_grad()
def evaluate_dpo(trainer, dataset, micro_batch: int, rank: int, world: int) -> dict[str, float]:
    """Mean DPO loss, implicit rewards, margin and reward accuracy over the held-out pairs (averaged over ranks)."""
    trainer.policy.eval()
    sums: dict[str, float] = {"loss": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "reward_accuracy": 0.0,
                              "margin": 0.0}
    n = 0
    if len(dataset) > 0:
        for batch in make_loader(dataset, micro_batch, rank, world, 0, 0, shuffle=False, drop_last=False):
            loss, stats = trainer.loss(to_device(batch, trainer.policy.device))
            sums["loss"] += float(loss)
            for k, v in stats.items():  # chosen_nll only with rpoAlpha
                sums[k] = sums.get(k, 0.0) + v
            n += 1
    return mean_over_ranks({k: v / max(n, 1) for k, v in sums.items()})


def run_dpo(run: StageRun) -> None:
    from kuberlhf.data import PairDataset
    from kuberlhf.models import load_causal_lm, load_tokenizer
    from kuberlhf.models.lora import apply_lora
    from kuberlhf.rlhf.dpo import DPOSettings, DPOTrainer

    spec, st = run.spec, run.stage_spec
    s = settings(run)
    ds_config = train_ds_config(s)
    sft_dir = str(run.fetch(run.layout.model_uri("sft"), "sft-model", "the step-1 (SFT) model"))
    tokenizer = load_tokenizer(sft_dir, "spec.actor.model")
    train_ds, eval_ds = tokenized_splits(run, PairDataset, tokenizer, spec.data.max_seq_len)
    plan = plan_for(len(train_ds), s.micro_batch, s.world_size, s.grad_accum, st.epochs, st.max_steps,
                    "spec.stages.dpo")
    model = load_causal_lm(sft_dir, "spec.actor.model", seed=st.seed, dropout=spec.actor.dropout,
                           gradient_checkpointing=st.gradient_checkpointing, ds_config=ds_config, tokenizer=tokenizer)
    apply_lora(model, st.lora, "spec.stages.dpo.lora")
    engine = training_engine(run, model, ds_config, plan.total_steps)
    # the reference: frozen, sharded like the policy at ZeRO-3 (its partitions in CPU memory when offloaded)
    ref_config = eval_ds_config(s, offload=st.offload_reference_model or st.offload)
    ref_model = load_causal_lm(sft_dir, "spec.actor.model", seed=st.seed, dropout=spec.actor.dropout,
                               ds_config=ref_config, tokenizer=tokenizer)
    ref_model.requires_grad_(False)
    reference = ds_initialize(ref_model, ref_config)
    reference.eval()
    trainer = DPOTrainer(engine, reference, DPOSettings.from_spec(st))

    def evaluate():
        return evaluate_dpo(trainer, eval_ds, s.micro_batch, run.dist.rank, run.dist.world_size)

    steps = supervised_loop(run, engine, train_ds, plan, s.micro_batch, trainer.loss, evaluate)
    out = run.output_dir("model")
    export_causal_lm(engine, tokenizer, out)
    run.finish({"model": out}, {"steps": steps})
