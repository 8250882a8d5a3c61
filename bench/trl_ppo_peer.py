"""The TRL peer of ``bench/ppo_bench.py``: TRL 1.12's ``PPOTrainer`` (``trl.experimental.ppo``, the last release
with PPO) on the bench's own tiny models and prompt batches, run by the bench in TRL's own venv (this file imports
nothing from kuberlhf). It is driven over stdin/stdout so its PPO updates interleave with the other sides':

    python trl_ppo_peer.py CONFIG.json [--no-gc]

prints ``TRL-READY``, then for every ``go`` line on stdin runs one PPO update and prints ``TRL-STEP <seconds>
<generated tokens>`` (the time from ``go`` to the end of that update: rollout, scoring, training, TRL's logging and,
as shipped, its two ``gc.collect()`` calls per update; ``--no-gc`` replaces them with no-ops).

The bench's reward model (an OPT backbone + ``value_head.safetensors``) becomes the ``OPTForSequenceClassification``
TRL needs (its ``score`` layer = the value head), for the value model and the reward model alike."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def seq_cls_model(critic_dir: str):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(critic_dir, num_labels=1)
    head = load_file(str(Path(critic_dir) / "value_head.safetensors"))["v_head.weight"]
    with torch.no_grad():
        model.score.weight.copy_(head)
    return model


def main() -> int:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    cfg = json.loads(Path(sys.argv[1]).read_text())
    no_gc = "--no-gc" in sys.argv[2:]
    torch.set_num_threads(1)
    if no_gc:  # the module's own name for gc: only TRL's two per-update calls become no-ops

        class NoGC:
            @staticmethod
            def collect(*_a, **_kw) -> int:
                return 0

        trl_ppo.gc = NoGC
    tok = AutoTokenizer.from_pretrained(cfg["actor_dir"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(cfg["actor_dir"])
    ref = AutoModelForCausalLM.from_pretrained(cfg["actor_dir"])
    value, reward = seq_cls_model(cfg["critic_dir"]), seq_cls_model(cfg["critic_dir"])
    batch = cfg["batch"]
    prompts = cfg["prompts"]  # the bench's batches, concatenated, in the bench's order
    updates = cfg["updates"]
    ds = Dataset.from_dict({"input_ids": prompts})
    args = PPOConfig(
        output_dir=cfg["output_dir"],
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        local_rollout_forward_batch_size=batch,
        num_ppo_epochs=cfg["ppo_epochs"],
        response_length=cfg["answer_len"],
        temperature=cfg["temperature"],
        kl_coef=cfg["kl_coef"],
        cliprange=cfg["clip_range"],
        cliprange_value=cfg["clip_range_value"],
        gamma=cfg["gamma"],
        lam=cfg["lam"],
        learning_rate=cfg["actor_lr"],
        total_episodes=batch * updates,
        stop_token="eos",
        missing_eos_penalty=None,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=cfg["seed"],
        dataloader_num_workers=0,
        max_grad_norm=1.0,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=ds,
        eval_dataset=ds.select(range(batch)),
    )
    # the bench's prompt order instead of TRL's shuffled loader (one process: no accelerate sharding to keep)
    trainer.dataloader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=False, collate_fn=trainer.data_collator, drop_last=True
    )
    clock = {"t0": 0.0}

    def wait_for_go() -> None:
        line = sys.stdin.readline()
        if line.strip() != "go":
            raise SystemExit(0)
        clock["t0"] = time.perf_counter()

    class Interleave(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            print(f"TRL-STEP {time.perf_counter() - clock['t0']:.6f}", flush=True)
            wait_for_go()

    trainer.add_callback(Interleave())
    print("TRL-READY", flush=True)
    wait_for_go()
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
