"""Step 3, PPO with EMA and mixed training (ptx), on the step-1 and step-2 models from the object store.
Every iteration: each rank rolls out ``generationBatchSize`` prompts, then ``ppoEpochs`` passes of actor and
critic steps over micro-batches of ``perDeviceBatchSize`` (each followed by a ptx step when ``ptxCoef > 0`` and
``data.unsupervised`` is set). Writes ``ppo/model/`` (final actor) and ``ppo/ema/`` (when EMA is on)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kuberlhf.stages.common import cache_key, tokenized_cache_dir
from kuberlhf.stages.runtime import StageRun
from kuberlhf.stages.supervised import maybe_crash, progress
from kuberlhf.training import distributed as D
from kuberlhf.training.checkpoint import (
    load_engines,
    load_module_state,
    seed_all,
    snapshot_engines,
    snapshot_module_state,
)
from kuberlhf.training.export import export_causal_lm
from kuberlhf.training.loop import batches_per_epoch, epoch_position, make_loader, rank_indices

EMA_STATE_FILE = "ema_state.pt"


def split_micro(exp: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = next(iter(exp.values())).shape[0]
    return [{k: v[i:i + size] for k, v in exp.items()} for i in range(0, n, size)]


def ptx_dataset(run: StageRun, tokenizer: Any):
    """The tokenised pre-training corpus of mixed training, or ``None`` when it is off."""
    from kuberlhf.data import UnsupervisedDataset, unsupervised_texts

    st, spec = run.stage_spec, run.spec
    if st.ptx_coef == 0 or spec.data.unsupervised is None:
        return None
    texts = unsupervised_texts(spec.data, storage=spec.storage)
    return UnsupervisedDataset(texts, tokenizer, spec.data.max_seq_len, cache_dir=tokenized_cache_dir(run),
                               cache_key=cache_key(run, "ptx"))


def ptx_stream(ds: Any, batch_size: int, rank: int, world: int, seed: int, consumed: int = 0):
    """Endless ptx batches of this rank, starting after ``consumed`` batches, so a resumed run continues the
    pre-training data where the interrupted one stopped."""
    per_epoch = batches_per_epoch(len(ds), batch_size, rank, world)
    if per_epoch == 0:
        raise ValueError(f"data.unsupervised: {len(ds)} texts give no batch of perDeviceBatchSize {batch_size} "
                         f"on {world} ranks; add texts or lower spec.stages.ppo.perDeviceBatchSize")
    start_epoch, skip = epoch_position(consumed, per_epoch)
    for epoch in itertools.count(start_epoch):
        yield from make_loader(ds, batch_size, rank, world, seed, epoch, skip if epoch == start_epoch else 0)


def rollout_texts(tokenizer: Any, exp: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """(prompts, answers) of an experience batch as text: the prompt as the model saw it, the answer up to its
    EOS and cut at a 'Human:' turn the model started itself."""
    from kuberlhf.data.format import cut_at_next_turn

    p_len = exp["prompts"].shape[1]
    prompts = tokenizer.batch_decode(exp["prompts"], skip_special_tokens=True)
    answer_mask = exp["attention_mask"][:, p_len:].bool()
    answers = [cut_at_next_turn(tokenizer.decode(row[m], skip_special_tokens=True))
               for row, m in zip(exp["seq"][:, p_len:], answer_mask, strict=True)]
    return prompts, answers


def resume_policy(run: StageRun, engine: Any) -> dict[str, Any] | None:
    """Restore the trained engines and the EMA from the newest committed checkpoint (the state saved with it), or
    seed this rank's RNGs for a fresh start (a resumed run continues the RNG stream of its checkpoint instead)."""
    resume_step = run.latest_checkpoint()
    if resume_step is None:
        seed_all(run.stage_spec.seed + run.dist.rank)
        return None
    local = run.download_checkpoint(resume_step)
    state = load_engines(engine.trained_engines(), local, resume_step, run.dist.rank)
    if engine.ema is not None:
        load_module_state(engine.ema, local / EMA_STATE_FILE)
    return state


def save_policy_checkpoint(run: StageRun, engine: Any, step: int, total: int, state: dict[str, Any]) -> None:
    """After optimizer step ``step``: commit ``ckpt/step-N/`` (trained engines + EMA) when due, and stop after
    it when SIGTERM asked to."""
    save, stop = run.checkpoint_due(step, total, run.stage_spec.checkpoint_every_steps)
    if not save:
        return

    def snapshot(local: Path) -> list[Any]:
        files = snapshot_engines(engine.trained_engines(), local, step, run.dist.rank, state)
        if engine.ema is not None:
            files += snapshot_module_state(engine.ema, local / EMA_STATE_FILE, run.dist.rank)
        return files

    run.save_checkpoint(step, snapshot)
    if stop:
        raise run.interrupted(step)
    maybe_crash(step, run)


def export_policy(run: StageRun, engine: Any, tokenizer: Any, summary: dict[str, Any]) -> None:
    """Export the actor (``model/``) and its EMA (``ema/``) and commit the stage."""
    outputs = {"model": run.output_dir("model")}
    export_causal_lm(engine.actor, tokenizer, outputs["model"])
    if engine.ema is not None:
        outputs["ema"] = run.output_dir("ema")
        export_causal_lm(engine.ema, tokenizer, outputs["ema"])
    for path in outputs.values():
        if run.dist.is_main:  # serving pads on the left for batched generation, like training's prompts
            tokenizer.save_pretrained(path)
    run.finish(outputs, summary)


@dataclass
class PolicyStage:
    """What ppo and grpo set up alike from the SFT model and step 3's prompts: see :func:`policy_stage`."""

    engine: Any
    tokenizer: Any
    prompts: Any  # PromptDataset: this stage's prompts
    true_reward: Any  # data.trueReward's function (reporting only) or None
    samples: int  # answers per rank and iteration: generationBatchSize prompts times samples per prompt
    micro: int  # answers per optimizer micro-batch
    iters_per_epoch: int
    total_iters: int
    micro_per_iter: int  # micro-batch steps per iteration (not counting the ptx steps)
    ptx_ds: Any  # the tokenised ptx corpus, or None when mixed training is off

    def ptx(self, run: StageRun, step: int):
        """The endless ptx batches (one per micro-batch step) from iteration ``step`` on, or None."""
        if self.ptx_ds is None:
            return None
        return ptx_stream(self.ptx_ds, self.micro, run.dist.rank, run.dist.world_size, run.stage_spec.seed,
                          consumed=step * self.micro_per_iter)


def policy_stage(run: StageRun, *, samples_per_prompt: int = 1, passes: int = 1, critic: bool = True,
                 reward_model: bool = True) -> PolicyStage:
    """The step-3 set-up of ppo and grpo: fetch the SFT model (and the step-2 model when ``reward_model``), the
    tokenizer, the prompts, the iteration count (refused naming generationBatchSize when a rank gets no batch),
    the ptx corpus and the engine sized for the schedule. ``samples_per_prompt``: grpo's groupSize; ``passes``:
    ppo's ppoEpochs over each experience batch; ``critic``: train the step-2 model as PPO's critic (else it is
    only the frozen reward model)."""
    from kuberlhf.data import PromptDataset, stage_rows
    from kuberlhf.data.true_reward import load_true_reward
    from kuberlhf.models import load_tokenizer
    from kuberlhf.rlhf.engine import EngineOptions, RLHFEngine

    spec, st, dist, stage = run.spec, run.stage_spec, run.dist, run.ctx.stage.value
    options = EngineOptions.from_spec(spec, dist.world_size, stage=stage)
    true_reward = load_true_reward(spec.data.true_reward)  # reporting only; fails before any model is loaded
    actor_dir = run.fetch(run.layout.model_uri("sft"), "sft-model", "the step-1 (SFT) model")
    rm_dir = run.fetch(run.layout.model_uri("reward"), "reward-model", "the step-2 (reward) model") \
        if reward_model else None
    tokenizer = load_tokenizer(str(actor_dir), "spec.actor.model", padding_side="left")
    rows, _ = stage_rows(spec.data, run.ctx.stage, storage=spec.storage)
    prompts = PromptDataset(rows, tokenizer, st.max_prompt_len, cache_dir=tokenized_cache_dir(run),
                            cache_key=cache_key(run, "train"))
    gen_bs = st.generation_batch_size  # prompts per rank; filled by the deploymentType preset
    samples = gen_bs * samples_per_prompt
    micro = min(st.per_device_batch_size, samples)
    iters_per_epoch = len(rank_indices(len(prompts), dist.rank, dist.world_size, st.seed, 0)) // gen_bs
    if iters_per_epoch == 0:
        raise ValueError(f"spec.stages.{stage}.generationBatchSize={gen_bs}: only {len(prompts)} step-3 prompts "
                         f"for {dist.world_size} ranks; lower it or give step 3 more data (data.split, "
                         "data.maxSamples)")
    total_iters = iters_per_epoch * st.epochs
    if st.max_steps:
        total_iters = min(total_iters, st.max_steps)
    ptx_ds = ptx_dataset(run, tokenizer)
    micro_per_iter = passes * ((samples + micro - 1) // micro)
    per_iter = micro_per_iter * (2 if ptx_ds is not None else 1)
    engine = RLHFEngine(str(actor_dir), str(rm_dir) if rm_dir else None, tokenizer, options, train_critic=critic,
                        num_total_iters=max(1, total_iters * per_iter // options.actor_settings.grad_accum))
    return PolicyStage(engine, tokenizer, prompts, true_reward, samples, micro, iters_per_epoch, total_iters,
                       micro_per_iter, ptx_ds)


def run_ppo(run: StageRun) -> None:
    from kuberlhf.data.true_reward import true_rewards
    from kuberlhf.planner.rollout import model_shapes, planned_rollout_batch_size
    from kuberlhf.rlhf.rollout import rollouts
    from kuberlhf.rlhf.trainer import PPOSettings, PPOTrainer

    st, dist = run.stage_spec, run.dist
    ps = policy_stage(run, passes=st.ppo_epochs)
    engine, tokenizer, true_reward, total_iters = ps.engine, ps.tokenizer, ps.true_reward, ps.total_iters
    gen_bs, micro = st.generation_batch_size, ps.micro
    trainer = PPOTrainer(engine, PPOSettings.from_spec(st), world_size=dist.world_size)

    step = 0
    state = resume_policy(run, engine)
    if state is not None:
        trainer.kl_ctl.value = float(state["kl_coef"])
        step = int(state["step"])
    ptx = ps.ptx(run, step)  # one ptx batch follows every PPO micro-batch step

    rollout_bs = planned_rollout_batch_size(run.spec, model_shapes(engine.actor.module, engine.reward.module))
    if dist.is_main and rollout_bs != (st.rollout_batch_size or gen_bs):
        print(f"rolloutBatchSize {rollout_bs}: the memory planner's default for spec.gpuMemory", flush=True)
    bar = progress(total_iters, step, dist.is_main, "ppo")
    while step < total_iters:
        epoch, skip = divmod(step, ps.iters_per_epoch)
        loader = make_loader(ps.prompts, gen_bs, dist.rank, dist.world_size, st.seed, epoch, skip)
        # rolloutBatchSize prompts decoded together, then one PPO update per generationBatchSize of them
        per_rollout = rollout_bs // gen_bs
        for exp, gen_time in rollouts(trainer.generate_experience, loader, per_rollout, trainer.pad_id):
            t0 = time.time() - gen_time
            exp.update(trainer.advantages(exp))
            a_losses, c_losses, ptx_losses = [], [], []
            for _ in range(st.ppo_epochs):
                for mb in split_micro(exp, micro):
                    a, c = trainer.train_rlhf(mb)
                    engine.maybe_update_ema()
                    a_losses.append(float(a))
                    c_losses.append(float(c))
                    if ptx is not None:
                        ptx_losses.append(float(trainer.train_unsupervised(next(ptx), st.ptx_coef)))
                        engine.maybe_update_ema()
            kl_coef = trainer.kl_ctl.value
            kl = trainer.update_kl(exp, gen_bs * dist.world_size)
            amask = exp["action_mask"].float()
            values = {
                "reward": float(exp["scores"].mean()), "kl": kl,
                "actor_loss": sum(a_losses) / len(a_losses), "critic_loss": sum(c_losses) / len(c_losses),
                "ptx_loss": sum(ptx_losses) / len(ptx_losses) if ptx_losses else None,
                "return": float((exp["returns"] * amask).sum() / amask.sum().clamp(min=1)),
                "answer_len": float(amask.sum(1).mean()),
                "true_reward": None,
            }
            if true_reward is not None:
                scored = true_rewards(true_reward, *rollout_texts(tokenizer, exp))
                values["true_reward"] = sum(scored) / len(scored)
            elapsed = time.time() - t0
            logged = {k: D.all_reduce_mean(v) for k, v in values.items() if v is not None}
            logged.update(kl_coef=kl_coef, samples_per_s=gen_bs * dist.world_size / elapsed,
                          gen_time_share=D.all_reduce_mean(gen_time / elapsed))
            step += 1
            run.metrics.write(step, "train", **logged)
            bar.update(1)
            bar.set_postfix(reward=f"{logged['reward']:.3f}", kl=f"{logged['kl']:.3f}")
            save_policy_checkpoint(run, engine, step, total_iters, {"kl_coef": trainer.kl_ctl.value})
            if step >= total_iters:
                break
    bar.close()
    export_policy(run, engine, tokenizer, {"steps": step})
