"""The step-3 memory probe: all five models of PPO (actor, reference, EMA, critic, reward) built the way the ppo
stage builds them (``RLHFEngine`` from a step-3 spec), then one rollout and one PPO update on random prompts,
reporting per rank the peak resident memory of each phase and what each model holds after loading.

    python -m torch.distributed.run --nproc_per_node 2 -m kuberlhf.training.ppo_memory \\
        --actor DIR --reward DIR --zero 3 --out OUT_DIR

writes ``OUT_DIR/rank<R>.json``; ``bench/ppo_memory.py`` runs it (``training.memory.probe_launch`` with ``module``).
Peaks are the kernel's high-water mark per phase (``kuberlhf.training.memory.Phases``).
"""

from __future__ import annotations

import argparse
from typing import Any


def ppo_spec(actor: str, reward: str, zero: int, world: int, batch: int, prompt_len: int, answer_len: int) -> Any:
    """The step-3 spec of the probe: ``world`` CPU ranks on one node, fp32, actor and critic at ZeRO ``zero`` (the
    frozen models follow: ZeRO-3 inference configs when it is 3), EMA on, no offload, no LoRA, no ptx."""
    from kuberlhf.contract.spec import parse_pipeline

    stage = {
        "nodes": 1,
        "gpusPerNode": world,
        "actorZeroStage": zero,
        "criticZeroStage": zero,
        "dtype": "fp32",
        "perDeviceBatchSize": batch,
        "generationBatchSize": batch,
        "gradientAccumulationSteps": 1,
        "maxPromptLen": prompt_len,
        "maxAnswerLen": answer_len,
        "ema": {"enabled": True},
        "actorLora": {"dim": 0},
        "criticLora": {"dim": 0},
    }
    doc = {
        "metadata": {"name": "ppo-memory"},
        "spec": {
            "accelerator": "cpu",
            "deploymentType": "single_node",
            "actor": {"model": actor},
            "reward": {"model": reward},
            "data": {"datasets": ["kuberlhf/synthetic-pairs"], "maxSeqLen": prompt_len + answer_len},
            "storage": {"uri": "file:///tmp/ppo-memory"},
            "stages": {"ppo": stage},
        },
    }
    return parse_pipeline(doc).spec


def _probe(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from kuberlhf.models.loading import load_tokenizer
    from kuberlhf.models.partition import partition_report
    from kuberlhf.rlhf.engine import EngineOptions, RLHFEngine
    from kuberlhf.rlhf.trainer import PPOSettings, PPOTrainer
    from kuberlhf.training.distributed import init_distributed
    from kuberlhf.training.memory import Phases, _warm_imports

    dist = init_distributed("cpu")
    spec = ppo_spec(args.actor, args.reward, args.zero, dist.world_size, args.batch, args.prompt_len, args.answer_len)
    _warm_imports(args.actor)
    phases = Phases()
    tokenizer = load_tokenizer(args.actor, "spec.actor.model", padding_side="left")
    options = EngineOptions.from_spec(spec, dist.world_size)
    with phases("load"):
        engine = RLHFEngine(args.actor, args.reward, tokenizer, options, num_total_iters=10)
    models = {
        role: partition_report(getattr(getattr(engine, attr), "module", getattr(engine, attr)))
        for role, attr in (
            ("actor", "actor"),
            ("reference", "ref"),
            ("ema", "ema"),
            ("critic", "critic"),
            ("reward", "reward"),
        )
    }
    trainer = PPOTrainer(engine, PPOSettings.from_spec(spec.stages.ppo), world_size=dist.world_size)
    gen = torch.Generator().manual_seed(dist.rank)
    vocab = min(len(tokenizer), int(engine.actor.module.config.vocab_size))
    batch = {
        "prompt_input_ids": torch.randint(4, vocab, (args.batch, args.prompt_len), generator=gen),
        "prompt_attention_mask": torch.ones(args.batch, args.prompt_len, dtype=torch.long),
    }
    with phases("generate"):
        exp = trainer.generate_experience(batch)
    with phases("train"):
        actor_loss, critic_loss = trainer.train_rlhf(exp)
        engine.maybe_update_ema()
    return {
        "rank": dist.rank,
        "world_size": dist.world_size,
        "zero": args.zero,
        "models": models,
        "phases": phases.results,
        "losses": [float(actor_loss), float(critic_loss)],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--actor", required=True, help="hub-layout causal LM directory (the step-1 output)")
    p.add_argument("--reward", required=True, help="reward model directory in kuberlhf's format (step 2's output)")
    p.add_argument("--zero", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--answer-len", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from kuberlhf.training.memory import write_report

    write_report(_probe(args), args.out)


if __name__ == "__main__":
    main()
