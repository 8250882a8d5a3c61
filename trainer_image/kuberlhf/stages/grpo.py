"""The grpo stage (``spec.algorithm: grpo``): GRPO on the step-3 prompts from the SFT model, rewards from the
step-2 reward model or from ``stages.grpo.rewardFunction`` (then the pipeline has no reward stage). Every
iteration: each rank samples ``groupSize`` answers for each of its ``generationBatchSize`` prompts, normalises the
rewards within each group, then steps the actor over micro-batches of ``perDeviceBatchSize`` answers (each followed
by a ptx step when ``ptxCoef > 0`` and ``data.unsupervised`` is set), with the EMA following every actor step.
Checkpoints ``grpo/ckpt/step-N/`` (actor + EMA), resumed; writes ``grpo/model/`` and ``grpo/ema/``. The math is
:mod:`kuberlhf.rlhf.grpo`; the generation, ptx and EMA code is PPO's."""

from __future__ import annotations

import time

from kuberlhf.stages.common import cache_key, tokenized_cache_dir
from kuberlhf.stages.ppo import (
    export_policy,
    ptx_dataset,
    ptx_stream,
    resume_policy,
    rollout_texts,
    save_policy_checkpoint,
    split_micro,
)
from kuberlhf.stages.runtime import StageRun
from kuberlhf.stages.supervised import progress
from kuberlhf.training import distributed as D
from kuberlhf.training.loop import make_loader, rank_indices


def run_grpo(run: StageRun) -> None:
    from kuberlhf.data import PromptDataset, stage_rows
    from kuberlhf.data.true_reward import load_true_reward, true_rewards
    from kuberlhf.models import load_tokenizer
    from kuberlhf.rlhf.code_reward import CodeReward
    from kuberlhf.rlhf.engine import EngineOptions, RLHFEngine
    from kuberlhf.rlhf.grpo import GRPOSettings, GRPOTrainer

    spec, st, dist = run.spec, run.stage_spec, run.dist
    options = EngineOptions.from_spec(spec, dist.world_size, stage="grpo")
    true_reward = load_true_reward(spec.data.true_reward)  # reporting only; fails before any model is loaded
    # a reward function that does not load fails here, before any model (a user error: never retried)
    reward_fn = (CodeReward.load(st.reward_function, spec.storage, st.reward_timeout_seconds)
                 if st.reward_function else None)
    actor_dir = run.fetch(run.layout.model_uri("sft"), "sft-model", "the step-1 (SFT) model")
    rm_dir = None if reward_fn else run.fetch(run.layout.model_uri("reward"), "reward-model",
                                              "the step-2 (reward) model")
    tokenizer = load_tokenizer(str(actor_dir), "spec.actor.model", padding_side="left")
    rows, _ = stage_rows(spec.data, run.ctx.stage, storage=spec.storage)
    prompts = PromptDataset(rows, tokenizer, st.max_prompt_len, cache_dir=tokenized_cache_dir(run),
                            cache_key=cache_key(run, "train"))
    gen_bs = st.generation_batch_size  # prompts per rank; filled by the deploymentType preset
    samples = gen_bs * st.group_size
    micro = min(st.per_device_batch_size, samples)
    iters_per_epoch = len(rank_indices(len(prompts), dist.rank, dist.world_size, st.seed, 0)) // gen_bs
    if iters_per_epoch == 0:
        raise ValueError(f"spec.stages.grpo.generationBatchSize={gen_bs}: only {len(prompts)} step-3 prompts for "
                         f"{dist.world_size} ranks; lower it or give step 3 more data (data.split, data.maxSamples)")
    total_iters = iters_per_epoch * st.epochs
    if st.max_steps:
        total_iters = min(total_iters, st.max_steps)
    ptx_ds = ptx_dataset(run, tokenizer)
    micro_per_iter = (samples + micro - 1) // micro
    per_iter = micro_per_iter * (2 if ptx_ds is not None else 1)
    engine = RLHFEngine(str(actor_dir), str(rm_dir) if rm_dir else None, tokenizer, options, train_critic=False,
                        num_total_iters=max(1, total_iters * per_iter // options.actor_settings.grad_accum))
    trainer = GRPOTrainer(engine, GRPOSettings.from_spec(st), world_size=dist.world_size, reward_fn=reward_fn)

    state = resume_policy(run, engine)
    step = int(state["step"]) if state is not None else 0
    ptx = None if ptx_ds is None else ptx_stream(ptx_ds, micro, dist.rank, dist.world_size, st.seed,
                                                  consumed=step * micro_per_iter)

    bar = progress(total_iters, step, dist.is_main, "grpo")
    while step < total_iters:
        epoch, skip = divmod(step, iters_per_epoch)
        for batch in make_loader(prompts, gen_bs, dist.rank, dist.world_size, st.seed, epoch, skip):
            t0 = time.time()
            exp = trainer.generate_experience(batch)
            gen_time = time.time() - t0
            losses, kls, ptx_losses = [], [], []
            for mb in split_micro(exp, micro):
                loss, kl = trainer.train_rlhf(mb)
                engine.maybe_update_ema()
                losses.append(float(loss))
                kls.append(float(kl))
                if ptx is not None:
                    ptx_losses.append(float(trainer.train_unsupervised(next(ptx), st.ptx_coef)))
                    engine.maybe_update_ema()
            groups = exp["scores"].view(-1, st.group_size)
            values = {
                "reward": float(exp["scores"].mean()), "kl": sum(kls) / len(kls),
                "policy_loss": sum(losses) / len(losses),
                "ptx_loss": sum(ptx_losses) / len(ptx_losses) if ptx_losses else None,
                "reward_std": float(groups.std(dim=1, unbiased=False).mean()),
                # groups whose answers all scored the same teach nothing (advantage 0): a sign of too small groups
                "tied_groups": float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean()),
                "answer_len": float(exp["action_mask"].float().sum(1).mean()),
                "true_reward": None,
            }
            if true_reward is not None:
                scored = true_rewards(true_reward, *rollout_texts(tokenizer, exp))
                values["true_reward"] = sum(scored) / len(scored)
            elapsed = time.time() - t0
            logged = {k: D.all_reduce_mean(v) for k, v in values.items() if v is not None}
            logged.update(samples_per_s=samples * dist.world_size / elapsed,
                          gen_time_share=D.all_reduce_mean(gen_time / elapsed))
            step += 1
            run.metrics.write(step, "train", **logged)
            bar.update(1)
            bar.set_postfix(reward=f"{logged['reward']:.3f}", kl=f"{logged['kl']:.4f}")
            save_policy_checkpoint(run, engine, step, total_iters, {})
            if step >= total_iters:
                break
    bar.close()
    export_policy(run, engine, tokenizer, {"steps": step})
