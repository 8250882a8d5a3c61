"""Measuring what a rank holds: peak resident memory (host, and CUDA when there is a GPU) per phase, and a probe
that loads a model the way the stages do at a given ZeRO stage, trains it a step and reports, per rank, what
was partitioned from the moment of loading and the peak memory of each phase.

    python -m torch.distributed.run --nproc_per_node 2 -m kuberlhf.training.memory \\
        --model DIR --kind causal|reward --zero 3 --steps 1 --out OUT_DIR

writes ``OUT_DIR/rank<R>.json``. The partition tests, ``bench/zero_memory.py`` and the GPU check run it.
Peak host memory is the kernel's high-water mark (``VmHWM``), reset at the start of each phase through
``/proc/self/clear_refs``, so a phase's peak is its own and not the process's since start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def probe_launch(
    out: Path,
    probe_args: list[str],
    *,
    world: int,
    port: int,
    base_env: Mapping[str, str] = os.environ,
    module: str = "kuberlhf.training.memory",
) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run this probe (or ``module``, e.g. the step-3 probe
    ``kuberlhf.training.ppo_memory``) on ``world`` CPU ranks (torchrun, gloo): the one launch the partition tests
    and ``bench/zero_memory.py`` share."""
    env = {
        **base_env,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONWARNINGS": "ignore",
        # fixed mmap threshold: freed per-module construction buffers go back to the OS instead of staying in
        # glibc's heap, so resident memory shows what the rank holds (also set by the stages' pods)
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={port}",
           "-m", module, "--out", str(out), *probe_args]
    return cmd, env


def run_probe(out: Path, probe_args: list[str], *, world: int, module: str = "kuberlhf.training.memory") -> list[dict]:
    """Run the probe (:func:`probe_launch` on a free port) and return every rank's report; a failed run raises
    with its stderr's tail."""
    import subprocess

    from kuberlhf.training.distributed import free_port

    cmd, env = probe_launch(out, probe_args, world=world, port=free_port(), module=module)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def write_report(result: dict[str, Any], out_dir: str) -> None:
    """A probe's last act on every rank: its report as ``OUT/rank<R>.json``, then leave the process group."""
    import torch.distributed

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result, indent=2) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak() -> None:
    """Start a new host high-water mark (Linux >= 4.0) and a new CUDA peak."""
    Path("/proc/self/clear_refs").write_text("5")
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> dict[str, int]:
    import torch

    out = {"host_peak": _status_kib("VmHWM") * 1024, "host_now": rss_bytes()}
    if torch.cuda.is_available():
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
        out["cuda_now"] = int(torch.cuda.memory_allocated())
    return out


class Phases:
    """Peak memory and wall time of consecutive phases (``with phases("load"): ...``)."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def phase():
            import gc

            gc.collect()
            before = rss_bytes()
            reset_peak()
            t0 = time.perf_counter()
            yield
            self.results[name] = {**peak_bytes(), "host_before": before, "seconds": time.perf_counter() - t0}

        return phase()


def _warm_imports(model: str) -> None:
    """Import the model's classes before measuring, so a phase's peak is the model's, not the libraries'."""
    import deepspeed.runtime.zero.partition_parameters  # noqa: F401
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from kuberlhf.models.loading import resolve_local
    from kuberlhf.models.tiny import TINY_ASSETS, TINY_MODEL_NAME

    config = AutoConfig.from_pretrained(TINY_ASSETS if model == TINY_MODEL_NAME else resolve_local(model, "--model"))
    for auto in (AutoModel, AutoModelForCausalLM):
        auto._model_mapping[type(config)]  # noqa: B018 - the lookup imports the modeling module


def _probe(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from kuberlhf.models.loading import load_causal_lm, load_tokenizer
    from kuberlhf.models.partition import partition_report
    from kuberlhf.models.reward import RewardModel
    from kuberlhf.training.distributed import init_distributed
    from kuberlhf.training.ds_config import TrainSettings, train_ds_config
    from kuberlhf.training.loop import ds_initialize, make_optimizer

    accelerator = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dist = init_distributed(accelerator)
    settings = TrainSettings(
        field="probe",
        accelerator=accelerator,
        world_size=dist.world_size,
        micro_batch=args.batch,
        grad_accum=1,
        zero_stage=args.zero,
        dtype=args.dtype,
        offload=args.offload,
    )
    ds_config = train_ds_config(settings)
    if args.zero_config:
        ds_config["zero_optimization"].update(json.loads(args.zero_config))
    _warm_imports(args.model)
    phases = Phases()
    tokenizer = load_tokenizer(args.model)
    with phases("load"):
        if args.kind == "reward":
            model = RewardModel.from_causal_lm_source(args.model, ds_config=ds_config)
        else:
            model = load_causal_lm(
                args.model, ds_config=ds_config, tokenizer=tokenizer, gradient_checkpointing=args.gradient_checkpointing
            )
        if args.kind == "reward" and args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
    loaded = partition_report(model)
    if args.lora_dim:
        from kuberlhf.contract.spec import LoraSpec
        from kuberlhf.models.lora import apply_lora

        # seeded: the adapters' random init decides whether a few large-rate steps descend (a test asserts it)
        torch.manual_seed(args.seed)
        apply_lora(model, LoraSpec(dim=args.lora_dim, only_optimize_lora=True))
    with phases("init"):
        optimizer = make_optimizer(model, args.lr, 0.0, args.offload)
        engine = ds_initialize(model, ds_config, optimizer, share_fp32_master=not args.fp32_master_copy)
    vocab = int(getattr(engine.module.config, "vocab_size", 512))
    gen = torch.Generator().manual_seed(dist.rank)
    ids = torch.randint(4, vocab, (args.batch, args.seq_len), generator=gen).to(engine.device)
    mask = torch.ones_like(ids)
    losses = []
    # one phase per part of a step (the last step's kept), so a peak shows where it comes from (the bench)
    for _ in range(args.steps):
        with phases("train_forward"):
            if args.kind == "reward":
                _, scores = engine(ids, mask)
                loss = scores.float().pow(2).mean()
            else:
                loss = engine(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        with phases("train_backward"):
            engine.backward(loss)
        with phases("train_step"):
            engine.step()
        losses.append(float(loss))
    if args.export:
        _export_and_probe(engine, tokenizer, args, dist.rank)
    return {
        "rank": dist.rank,
        "world_size": dist.world_size,
        "zero": args.zero,
        "kind": args.kind,
        "loaded": loaded,
        "phases": phases.results,
        "losses": losses,
        "fp32_master_shared": fp32_master_shared(engine),
        "torch_threads": torch.get_num_threads(),
    }


def fp32_master_shared(engine: Any) -> bool | None:
    """ZeRO-3: whether every optimizer sub-group steps its partition in place (no second fp32 master copy; see
    ``kuberlhf.training.loop.zero3_fp32_master_shared``); None at other stages."""
    opt = getattr(engine, "optimizer", None)
    if not hasattr(opt, "fp32_partitioned_groups_flat"):
        return None
    pairs = zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat, strict=True)
    return all(a is b for a, b in pairs)


def _export_and_probe(engine: Any, tokenizer: Any, args: argparse.Namespace, rank: int) -> None:
    """Export the engine's model (``kuberlhf.training.export``) and keep the engine's own outputs on a fixed batch
    (``engine_outputs.pt`` next to the export) for comparing with the reloaded export."""
    import torch

    from kuberlhf.training.export import export_causal_lm, export_reward_model

    out = Path(args.export)
    (export_reward_model if args.kind == "reward" else export_causal_lm)(engine, tokenizer, out)
    vocab = min(int(getattr(engine.module.config, "vocab_size", 512)), len(tokenizer))
    ids = torch.randint(4, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(engine.device)
    mask = torch.ones_like(ids)
    engine.eval()
    with torch.no_grad():
        if args.kind == "reward":
            result = engine(ids, mask)[0]
        else:
            result = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if rank == 0:
        torch.save({"input_ids": ids.cpu(), "outputs": result.float().cpu()}, out / "engine_outputs.pt")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="hub-layout model directory (or kuberlhf/tiny-opt)")
    p.add_argument("--kind", choices=["causal", "reward"], default="causal")
    p.add_argument("--zero", type=int, default=3)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lora-dim", type=int, default=0, help="LoRA on the decoder blocks, only LoRA trained")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA adapters' init")
    p.add_argument("--export", help="export the trained model here and keep the engine's outputs on a fixed batch")
    p.add_argument("--cpu", action="store_true", help="use the CPU accelerator even when CUDA is present")
    p.add_argument("--fp32-master-copy", action="store_true",
                   help="ZeRO-3 fp32: keep DeepSpeed's second fp32 copy of each partition (no workaround)")
    p.add_argument("--zero-config", help="JSON merged into the zero_optimization section (the bench compares)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    write_report(_probe(args), args.out)


if __name__ == "__main__":
    main()
