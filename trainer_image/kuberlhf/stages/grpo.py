"""The grpo stage (``spec.algorithm: grpo``): GRPO on the step-3 prompts from the SFT model, rewards from the
step-2 reward model or from ``stages.grpo.rewardFunction`` (then the pipeline has no reward stage). Every
iteration: each rank samples ``groupSize`` answers for each of its ``generationBatchSize`` prompts, normalises the
rewards within each group, then steps the actor over micro-batches of ``perDeviceBatchSize`` answers (each followed
by a ptx step when ``ptxCoef > 0`` and ``data.unsupervised`` is set), with the EMA following every actor step.
Checkpoints ``grpo/ckpt/step-N/`` (actor + EMA), resumed; writes ``grpo/model/`` and ``grpo/ema/``. The math is
:mod:`kuberlhf.rlhf.grpo`; the generation, ptx and EMA code is PPO's."""

from __future__ import annotations

import time

from kuberlhf.stages.ppo import (
    export_policy,
    policy_stage,
    resume_policy,
    rollout_texts,
    save_policy_checkpoint,
    split_micro,
)
from kuberlhf.stages.runtime import StageRun
from kuberlhf.stages.supervised import progress
from kuberlhf.training import distributed as D
from kuberlhf.training.loop import make_loader


def run_grpo(run: StageRun) -> None:
    from kuberlhf.data.true_reward import true_rewards
    from kuberlhf.rlhf.code_reward import CodeReward
    from kuberlhf.rlhf.grpo import GRPOSettings, GRPOTrainer

    spec, st, dist = run.spec, run.stage_spec, run.dist
    # a reward function that does not load fails here, before any model (a user error: never retried)
    reward_fn = (CodeReward.load(st.reward_function, spec.storage, st.reward_timeout_seconds)
                 if st.reward_function else None)
    ps = policy_stage(run, samples_per_prompt=st.group_size, critic=False, reward_model=reward_fn is None)
    engine, tokenizer, true_reward, total_iters = ps.engine, ps.tokenizer, ps.true_reward, ps.total_iters
    gen_bs, samples = st.generation_batch_size, ps.samples
    trainer = GRPOTrainer(engine, GRPOSettings.from_spec(st), world_size=dist.world_size, reward_fn=reward_fn)

    state = resume_policy(run, engine)
    step = int(state["step"]) if state is not None else 0
    ptx = ps.ptx(run, step)

    bar = progress(total_iters, step, dist.is_main, "grpo")
    while step < total_iters:
        epoch, skip = divmod(step, ps.iters_per_epoch)
        for batch in make_loader(ps.prompts, gen_bs, dist.rank, dist.world_size, st.seed, epoch, skip):
            t0 = time.time()
            exp = trainer.generate_experience(batch)
            gen_time = time.time() - t0
            losses, kls, ptx_losses = [], [], []
            for mb in split_micro(exp, ps.micro):
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
