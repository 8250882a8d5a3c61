"""The stage cases of the GPU check (``bench/gpu_check.py``): one kuberlhf stage run through its real entrypoint
(``kuberlhf.stages.launch.launch``, what ``kuberlhf stage NAME`` runs in every pod) on random-weight OPT models
of real sizes, then its exported model reloaded with plain ``from_pretrained`` and compared.

Runs in the case's own process (the parent starts one per case). Nothing here changes what a stage does:
timings and peak GPU memory come from *probes*, thin wrappers around the functions the stage modules call
(``training_engine``, ``supervised_loop``, the exports, ``RLHFEngine``, ``PPOTrainer``'s phases), installed
for the case's process only. The export probe also runs a reference forward of the trained engine on fixed
inputs just before the export, which the reloaded model must reproduce.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# relative tolerance of max |reloaded - engine| / max |engine| per training dtype (LoRA merging and the
# fp32 round trip of the export change the last bits; a wrong weight changes the outputs by O(1))
EXPORT_RTOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
# mean |log p_generation - log p_forward| per answer token allowed (16-bit rounding is ~1e-2 nats; rollouts from
# other weights, e.g. LoRA adapters the hybrid engine's kernels leave out, differ by far more)
LOGPROB_GAP_TOL = 0.1


class CheckFailed(AssertionError):
    """A case ran but a check of its results failed (the message says which and by how much)."""


def model_config(name: str, tiny: bool) -> dict[str, Any]:
    """OPT config values of ``name`` (opt-125m, opt-350m, opt-1.3b); ``tiny``: the same family scaled down."""
    from kuberlhf.planner.shapes import KNOWN_CONFIGS

    cfg = {k: v for k, v in KNOWN_CONFIGS[f"facebook/{name}"].items() if k != "model_type"}
    if not tiny:
        return dict(cfg)
    proj = 64 if cfg["word_embed_proj_dim"] == cfg["hidden_size"] else 32  # keep opt-350m's projection
    return {
        **cfg,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "ffn_dim": 256,
        "num_attention_heads": 4,
        "word_embed_proj_dim": proj,
        "vocab_size": tiny_vocab_size(),  # the shipped tiny BPE's ids must fit the embeddings
        "max_position_embeddings": 512,
    }


def tiny_vocab_size() -> int:
    from kuberlhf.models.tiny import tiny_config

    return int(tiny_config().vocab_size)


# --- probes ----------------------------------------------------------------------------------------------
class DeviceMemory:
    """The CUDA allocator's counters in GiB (a separate object so the nesting logic of :class:`Probes` is
    testable with any counter)."""

    def peak(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30

    def reset_peak(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> float:
        import torch

        return torch.cuda.memory_allocated() / 2**30

    def sync(self) -> None:
        import torch

        torch.cuda.synchronize()


class Probes:
    """Time, call count and peak device memory per phase, plus facts recorded along the way; ``on_change``
    is called after every phase so a killed case still leaves what it measured. ``memory``: the device's
    counters (None on CPU: time only)."""

    def __init__(self, memory: DeviceMemory | None, on_change: Callable[[], None]):
        self.memory = memory
        self.on_change = on_change
        self.phases: dict[str, dict[str, Any]] = {}
        self.facts: dict[str, Any] = {}
        self.exports: list[dict[str, Any]] = []
        self._open: list[list[float]] = []  # running peaks of the phases open now, outermost first

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        """Time one call of phase ``name``; its peak is the device's own peak counter over the call. Phases
        nest (``stage_total`` holds the others): the counter is reset at every phase start, so what it held
        is first folded into every open phase's running peak."""
        mem = self.memory
        if mem is not None:
            mem.sync()
            self._fold_peak()
            mem.reset_peak()
        self._open.append([0.0])
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            yield extra
        finally:
            if mem is not None:
                mem.sync()
            dt = time.perf_counter() - t0
            if mem is not None:
                self._fold_peak()
            peak = self._open.pop()[0]
            p = self.phases.setdefault(name, {"calls": 0, "total_s": 0.0, "first_s": dt})
            p["calls"] += 1
            p["total_s"] += dt
            if mem is not None:
                p["peak_gib"] = max(p.get("peak_gib", 0.0), peak)
                p["allocated_after_gib"] = mem.allocated()
            for k, v in extra.items():
                p[k] = p.get(k, 0) + v
            self.on_change()

    def _fold_peak(self) -> None:
        peak = self.memory.peak()
        for running in self._open:
            running[0] = max(running[0], peak)

    def wrap(
        self,
        owner: Any,
        attr: str,
        name: str,
        before: Callable[..., None] | None = None,
        after: Callable[..., dict[str, Any] | None] | None = None,
    ) -> None:
        """Replace ``owner.attr`` by a timed call (``before(*args)`` runs first, outside the timing;
        ``after(result, *args)`` may return counters added to the phase)."""
        inner = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before(*args, **kwargs)
            with self.phase(name) as extra:
                out = inner(*args, **kwargs)
                if after is not None:
                    extra.update(after(out, *args, **kwargs) or {})
            return out

        setattr(owner, attr, timed)

    def summary(self) -> dict[str, Any]:
        out = {}
        for name, p in self.phases.items():
            p = dict(p)
            if p["calls"] > 1:  # the first call carries warm-up (kernel selection, allocator growth)
                p["mean_after_first_s"] = (p["total_s"] - p["first_s"]) / (p["calls"] - 1)
            out[name] = p
        return out


def engine_facts(engine: Any) -> dict[str, Any]:
    """What a trained DeepSpeed engine says about the CUDA path: class (hybrid engine or not), ZeRO stage,
    dtype of its weights, optimizer steps, fp16 loss scale and skipped (overflow) steps, the process group's
    backend."""
    import torch
    import torch.distributed as dist

    facts: dict[str, Any] = {"engine_class": type(engine).__name__}
    with contextlib.suppress(Exception):
        facts["zero_stage"] = int(engine.zero_optimization_stage())
    with contextlib.suppress(StopIteration):
        facts["param_dtype"] = str(next(engine.module.parameters()).dtype).removeprefix("torch.")
    for key, attr in (("global_steps", "global_steps"), ("skipped_steps", "skipped_steps")):
        if hasattr(engine, attr):
            facts[key] = int(getattr(engine, attr))
    opt = getattr(engine, "optimizer", None)
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None) if opt is not None else None
        if isinstance(value, (int, float, torch.Tensor)):
            facts["loss_scale"] = float(value)
            break
    if hasattr(engine, "_inference_containers"):  # DeepSpeedHybridEngine
        facts["hybrid_inference_containers"] = len(engine._inference_containers)
        facts["hybrid_generate_latency_s"] = float(getattr(engine, "_generate_latency", 0.0))
    if dist.is_available() and dist.is_initialized():
        facts["backend"] = str(dist.get_backend())
    return facts


def fixed_inputs(device: Any, vocab: int = 512, batch: int = 2, length: int = 24) -> dict[str, Any]:
    """The same token ids for the engine's reference forward and the reloaded model's (right padded row 2)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 5 :] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _masked(t: Any, mask: Any) -> Any:
    """Outputs at real (non-pad) positions only: padding positions are not part of the contract."""
    return t[mask.bool()]


@contextlib.contextmanager
def _inference(engine: Any) -> Iterator[None]:
    """no_grad and eval mode on the wrapped module only: the hybrid engine's own ``eval()`` would swap in its
    inference kernels, which is not the training forward the export must reproduce."""
    import torch

    module = engine.module
    was_training = module.training
    module.train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def lm_reference(engine: Any, inputs: dict[str, Any]) -> Any:
    with _inference(engine):
        logits = engine(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
    return _masked(logits.float(), inputs["attention_mask"]).cpu()


def reward_reference(engine: Any, inputs: dict[str, Any]) -> Any:
    with _inference(engine):
        values, _ = engine(inputs["input_ids"], inputs["attention_mask"])
    return _masked(values.float(), inputs["attention_mask"]).cpu()


def compare(ref: Any, got: Any, dtype: str) -> dict[str, Any]:
    import torch

    scale = float(ref.abs().max())
    diff = float((got - ref).abs().max())
    rel = diff / max(scale, 1e-6)
    return {
        "max_abs_diff": diff,
        "ref_max_abs": scale,
        "rel_diff": rel,
        "rtol": EXPORT_RTOL[dtype],
        "finite": bool(torch.isfinite(got).all() and torch.isfinite(ref).all()),
        "match": bool(rel <= EXPORT_RTOL[dtype] and torch.isfinite(got).all()),
    }


def reload_and_compare(export: dict[str, Any], device: Any, dtype: str) -> dict[str, Any]:
    """Load the exported directory with plain transformers (no kuberlhf code) in the training dtype on the
    device and compare its outputs on the fixed inputs with the engine's just before the export."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(export["dir"])
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    inputs = fixed_inputs(device, vocab=export["vocab"])
    weights = sorted(path.glob("*.safetensors"))
    with safe_open(str(weights[0]), "pt") as f:
        stored = str(f.get_tensor(next(iter(f.keys()))).dtype).removeprefix("torch.")
    out: dict[str, Any] = {
        "dir": path.name,
        "kind": export["kind"],
        "stored_dtype": stored,
        "size_mib": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20,
    }
    AutoTokenizer.from_pretrained(path)  # the full tokenizer travels with every model
    with torch.no_grad():
        if export["kind"] == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(path).to(device=device, dtype=torch_dtype).eval()
            got = model(**inputs, use_cache=False).logits
        else:  # the documented reward format: HF backbone + value_head.safetensors
            from safetensors.torch import load_file

            model = AutoModel.from_pretrained(path).to(device=device, dtype=torch_dtype).eval()
            head = load_file(str(path / "value_head.safetensors"))["v_head.weight"].to(device, torch_dtype)
            got = model(**inputs, use_cache=False)[0] @ head.T
            got = got.squeeze(-1)
    out.update(compare(export["ref"], _masked(got.float(), inputs["attention_mask"]).cpu(), dtype))
    del model
    return out


def corrupt(model_dir: Path) -> None:
    """Scale every weight of an exported model by 1.5 (the selftest that proves a bad export is caught)."""
    from safetensors.torch import load_file, save_file

    for f in model_dir.glob("*.safetensors"):
        save_file({k: v * 1.5 for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})


# --- fixtures -----------------------------------------------------------------------------------------------
def write_fixture(root: Path, kind: str, model: str, tiny: bool, cuda: bool) -> Path:
    """A random-weight model directory of ``model``'s size (made once per run, reused by every case): a causal
    LM (``kind="lm"``, the SFT input and the step-1 output PPO reads) or a reward model in kuberlhf's format
    (``kind="reward"``, what step 2 writes). The tokenizer is the shipped tiny BPE: its ids fit every OPT vocabulary
    (and the tiny configs take its size), and throughput depends on ids, not words."""
    import torch
    from transformers import AutoModel, OPTConfig, OPTForCausalLM

    from kuberlhf.models import RewardModel, load_tokenizer
    from kuberlhf.models.tiny import TINY_MODEL_NAME

    out = root / f"{kind}-{model}{'-tiny' if tiny else ''}"
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tok = load_tokenizer(TINY_MODEL_NAME)
    torch.manual_seed(1234)
    with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: seconds instead of a minute
        config = OPTConfig(**model_config(model, tiny))
        if kind == "lm":
            m = OPTForCausalLM(config)
            m.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        else:
            m = RewardModel(AutoModel.from_config(config))
            m.save_pretrained(tmp, tokenizer=tok)
    del m
    tmp.rename(out)
    return out


# --- the stage case ---------------------------------------------------------------------------------------
def manifest(
    name: str, stage: str, p: dict[str, Any], actor: str, reward: str, store: str, cuda: bool
) -> dict[str, Any]:
    """The RLHFPipeline of one case: every field the stage reads set explicitly (no preset decides)."""
    dtype = p["dtype"]
    steps = p.get("steps", (4 if stage == "ppo" else 6) if cuda else 2)  # the first step is warm-up
    batch = p.get("batch", 8 if cuda else 4)
    lora = {"dim": p.get("lora", 0), **({"learningRate": p["lora_lr"]} if p.get("lora_lr") else {})}
    common = {
        "nodes": 1,
        "gpusPerNode": 1,
        "dtype": dtype,
        "perDeviceBatchSize": batch,
        "gradientAccumulationSteps": p.get("grad_accum", 1),
        "maxSteps": steps,
        "epochs": 100,
        "gradientCheckpointing": p.get("gradient_checkpointing", False),
    }
    stages: dict[str, Any] = {
        "sft": {
            **common,
            "zeroStage": p["zero"],
            "learningRate": 1e-4,
            "lora": lora,
            "checkpointEverySteps": p.get("checkpoint_every", 0),
        },
        "reward": {**common, "zeroStage": p["zero"], "learningRate": 5e-5, "lora": lora},
        "ppo": {
            **common,
            "actorZeroStage": p["zero"],
            "criticZeroStage": p["zero"],
            "generationBatchSize": batch,
            "actorLearningRate": 1e-5,
            "criticLearningRate": 5e-6,
            "actorLora": lora,
            "criticLora": {"dim": 0},
            "hybridEngine": p.get("hybrid", False),
            "ema": {"enabled": True, "beta": 0.992},
            "ptxCoef": 1.0,
            "maxPromptLen": p.get("prompt_len", 64 if cuda else 16),
            "maxAnswerLen": p.get("answer_len", 64 if cuda else 8),
            "checkpointEverySteps": 0,
        },
    }
    return {
        "apiVersion": "kuberlhf.io/v1alpha1",
        "kind": "RLHFPipeline",
        "metadata": {"name": name},
        "spec": {
            "accelerator": "cuda" if cuda else "cpu",
            "deploymentType": "single_gpu",
            "actor": {"model": actor, "dropout": 0.0},
            "reward": {"model": reward, "dropout": 0.0},
            "data": {
                "datasets": ["kuberlhf/synthetic-pairs"],
                "unsupervised": "kuberlhf/synthetic-corpus",
                "maxSeqLen": p.get("seq_len", 256 if cuda else 48),
                "split": "2,4,4",
                "seed": 1234,
                "maxSamples": 2000 if cuda else 400,
            },
            "storage": {"uri": store},
            "stages": {stage: stages[stage]},
        },
    }


def metrics_summary(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Train-split metrics of a stage: per-key mean over steps after the first, and a check that every loss
    is finite (fp16 overflow shows up here first)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    out: dict[str, Any] = {"steps": len(train), "eval": next((r for r in reversed(rows) if r["split"] == "eval"), None)}
    losses = {
        k: [r.get(k) for r in train]
        for k in ("loss", "actor_loss", "critic_loss", "ptx_loss")
        if any(k in r for r in train)
    }
    bad = {k: v for k, v in losses.items() if any(x is None or not math.isfinite(x) for x in v)}
    out["losses"] = losses
    for k in keys:
        # the first step is warm-up, the last carries the check's own consistency forward
        steady = train[1:-1] if len(train) >= 3 else train[1:] or train
        vals = [r[k] for r in steady if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = sum(vals) / len(vals)
    if bad:
        raise CheckFailed(f"non-finite training losses: {bad}")
    return out


def run_stage_case(ctx: Any, stage: str, **p: Any) -> dict[str, Any]:
    """Run ``stage`` through the stage entrypoint with probes, then check its exports. ``p``: zero, dtype,
    lora, hybrid, actor/reward model sizes, steps, batch, lengths (see :func:`manifest`)."""
    import torch

    cuda = not ctx.cpu
    dtype = p["dtype"]
    if ctx.cpu and dtype == "fp16":
        dtype = p["dtype"] = "fp32"  # DeepSpeed has no fp16 on CPU; the CUDA run checks fp16
    result: dict[str, Any] = {"stage": stage, "params": dict(p)}
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        result["device"] = {
            "name": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
        }

    probes = Probes(DeviceMemory() if cuda else None, lambda: ctx.record(phases=probes.summary(), facts=probes.facts))
    fixtures = ctx.shared / "fixtures"
    fixtures.mkdir(parents=True, exist_ok=True)
    tiny = ctx.cpu
    actor_size, reward_size = p.get("actor", "opt-125m"), p.get("reward", "opt-350m")
    with probes.phase("fixtures"):
        actor = write_fixture(fixtures, "lm", actor_size, tiny, cuda)
        reward_lm = write_fixture(fixtures, "lm", reward_size, tiny, cuda) if stage == "reward" else None
        reward_rm = write_fixture(fixtures, "reward", reward_size, tiny, cuda) if stage == "ppo" else None
    store_dir = ctx.work / "store"
    doc = manifest(
        f"gpucheck-{stage}", stage, p, str(actor), str(reward_lm or reward_rm or actor), store_dir.as_uri(), cuda
    )
    result["manifest_stage"] = doc["spec"]["stages"][stage]
    from kuberlhf.contract.spec import parse_pipeline
    from kuberlhf.contract.stage import StageLayout
    from kuberlhf.storage import ObjectStore

    pipeline = parse_pipeline(doc)
    if stage == "ppo":  # step 3 reads steps 1 and 2 from the store, as in a pipeline
        layout = StageLayout.for_pipeline(pipeline, "default", "local")
        store = ObjectStore()
        store.upload_dir(str(actor), layout.model_uri("sft"), producer="kuberlhf-stage-sft")
        store.upload_dir(str(reward_rm), layout.model_uri("reward"), producer="kuberlhf-stage-reward")

    install_stage_probes(probes, stage, device, last_call=int(doc["spec"]["stages"][stage]["maxSteps"]))
    out_dir = ctx.work / "out"
    os.environ["KUBERLHF_LOCAL_OUTPUT"] = str(out_dir)
    from kuberlhf.stages.launch import launch

    with probes.phase("stage_total"):
        launch(stage, json.dumps(pipeline.to_wire()), resume=False)
    result["phases"] = probes.summary()
    result["facts"] = probes.facts
    keys = ("tokens_per_s", "samples_per_s", "gen_time_share", "reward", "kl", "answer_len", "accuracy")
    result["metrics"] = metrics_summary(out_dir / "metrics.jsonl", keys)
    result.update(throughput(stage, result["manifest_stage"], probes, result["metrics"], cuda))
    result["planner"] = planner_vs_measured(pipeline, stage, result.get("peak_gib"))
    ctx.record(**result)

    # what the next stage and serving read: the committed copy in the object store (sizes + sha256 verified)
    layout = StageLayout.for_pipeline(pipeline, "default", "local")
    every = int(result["manifest_stage"].get("checkpointEverySteps") or 0)
    if every:  # saved in the background: the state copied off the device on the training thread, then written
        result["checkpoints_committed"] = [s for s, _ in ObjectStore().list_checkpoints(layout.ckpt_root(stage))]
        wanted = list(range(every, int(result["manifest_stage"]["maxSteps"]), every))
        if result["checkpoints_committed"] != wanted:
            raise CheckFailed(f"committed checkpoints {result['checkpoints_committed']}, expected steps {wanted}")
    for e in probes.exports:
        name = Path(e["dir"]).name
        uri = layout.ema_uri() if name == "ema" else layout.model_uri(stage)
        e["dir"] = str(ctx.work / "exported" / name)
        ObjectStore().download_dir(uri, e["dir"])
        if p.get("corrupt_export"):
            corrupt(Path(e["dir"]))
    result["exports"] = [reload_and_compare(e, device, dtype) for e in probes.exports]
    ctx.record(**result)
    expected = {"sft": {"model"}, "reward": {"model"}, "ppo": {"model", "ema"}}[stage]
    got = {e["dir"] for e in result["exports"]}
    if got != expected:
        raise CheckFailed(f"exports {sorted(got)}, expected {sorted(expected)}")
    bad = [e for e in result["exports"] if not e["match"]]
    if bad:
        raise CheckFailed(
            "exported model does not reproduce the engine: "
            + "; ".join(f"{e['dir']}: rel diff {e['rel_diff']:.3g} > {e['rtol']}" for e in bad)
        )
    check_facts(stage, p, probes.facts, cuda)
    return result


def planner_vs_measured(pipeline: Any, stage: str, peak_gib: float | None) -> dict[str, Any]:
    """The memory planner's per-GPU estimate of the case's stage (model shapes from the fixtures' config.json)
    next to the measured device peak (issue 14), with and without its runtime reserve (CUDA context, allocator
    slack: torch's peak counter does not see the context); and its host estimate per rank next to this process's
    peak RSS (what calibrates the planner's CUDA host reserve)."""
    import resource

    from kuberlhf.planner.estimate import GiB, estimate_pipeline
    from kuberlhf.planner.shapes import read_model_shape

    spec = pipeline.spec
    shapes = {"actor": read_model_shape(spec.actor.model, "spec.actor.model")}
    if spec.reward is not None:
        shapes["reward"] = read_model_shape(spec.reward.model, "spec.reward.model")
    est = estimate_pipeline(spec, shapes).stage(stage)
    out: dict[str, Any] = {
        "estimate_gib": est.per_gpu_bytes / GiB,
        "states_gib": est.states_bytes / GiB,
        "working_gib": est.working_bytes / GiB,
        "reserve_gib": est.reserve / GiB,
        "host_estimate_per_rank_gib": est.host_bytes_per_pod / max(est.gpus_per_node, 1) / GiB,
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,  # KiB on Linux
    }
    if peak_gib:
        out["estimate_over_measured"] = out["estimate_gib"] / peak_gib
        out["estimate_without_reserve_over_measured"] = (est.per_gpu_bytes - est.reserve) / GiB / peak_gib
    return out


def throughput(stage: str, st: dict[str, Any], probes: Probes, metrics: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Samples/s and tokens/s: the stage's own per-step figures (``metrics``, mean after the first step) and,
    from the probes, the whole train phase (eval and checkpoints included) and generation alone."""
    ph = probes.summary()
    out: dict[str, Any] = {}
    if stage in ("sft", "reward") and "train" in ph:
        tr = ph["train"]
        samples = tr.get("optimizer_steps", 0) * st["perDeviceBatchSize"] * st["gradientAccumulationSteps"]
        out["train_phase_samples_per_s"] = samples / max(tr["total_s"], 1e-9)
        if "tokens_per_s" in metrics:
            out["tokens_per_s"] = metrics["tokens_per_s"]
    if stage == "ppo":
        if "samples_per_s" in metrics:
            out["samples_per_s"] = metrics["samples_per_s"]
        if "generate_experience" in ph:
            g = ph["generate_experience"]
            out["gen_tokens_per_s"] = g.get("answer_tokens", 0) / max(g["total_s"], 1e-9)
    if cuda:
        out["peak_gib"] = max((v.get("peak_gib", 0.0) for v in ph.values()), default=0.0)
    return out


def check_facts(stage: str, p: dict[str, Any], facts: dict[str, Any], cuda: bool) -> None:
    """What must hold on the CUDA path: the NCCL backend, the configured ZeRO stage and weight dtype, fp16 runs
    with a loss scaler, the hybrid engine class when asked for."""
    want_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[p["dtype"]]
    problems = []
    for role, f in facts.items():
        if not isinstance(f, dict) or "engine_class" not in f:
            continue
        if cuda and f.get("backend") not in (None, "nccl"):
            problems.append(f"{role}: backend {f.get('backend')}, expected nccl")
        if role in ("model", "actor", "critic") and f.get("zero_stage") != p["zero"]:
            problems.append(f"{role}: ZeRO stage {f.get('zero_stage')}, expected {p['zero']}")
        if f.get("param_dtype") != want_dtype:
            problems.append(f"{role}: weights in {f.get('param_dtype')}, expected {want_dtype}")
        if p["dtype"] == "fp16" and role in ("model", "actor", "critic") and "loss_scale" not in f:
            problems.append(f"{role}: fp16 without a loss scale")
    if stage == "ppo" and p.get("hybrid") and facts.get("actor", {}).get("engine_class") != "DeepSpeedHybridEngine":
        problems.append(f"actor engine is {facts.get('actor', {}).get('engine_class')}, expected the hybrid engine")
    gaps = facts.get("generation_logprobs_vs_forward") or []
    if gaps and gaps[-1]["mean_abs"] > LOGPROB_GAP_TOL:
        problems.append(
            f"generation's log-probs differ from the actor's training forward by {gaps[-1]['mean_abs']:.3g} nats "
            f"per token on average (> {LOGPROB_GAP_TOL}): the rollouts do not come from the policy being trained"
        )
    if problems:
        raise CheckFailed("; ".join(problems))


def install_stage_probes(probes: Probes, stage: str, device: Any, last_call: int = 0) -> None:
    """Wrap what the stage module calls (module attributes, so the stage code itself is untouched)."""
    import torch

    import kuberlhf.stages.ppo as ppo_mod
    import kuberlhf.stages.reward as reward_mod
    import kuberlhf.stages.sft as sft_mod
    from kuberlhf.rlhf.engine import RLHFEngine
    from kuberlhf.rlhf.trainer import PPOTrainer

    vocab = 512
    state: dict[str, Any] = {}

    def export_probe(kind: str, reference: Callable[[Any, dict[str, Any]], Any]):
        def before(engine: Any, tokenizer: Any, out_dir: Path, *a: Any, **kw: Any) -> None:
            name = Path(out_dir).name
            role = {"model": "actor" if stage == "ppo" else "model", "ema": "ema"}[name]
            probes.facts[role] = engine_facts(engine)
            rlhf = state.get("rlhf")
            if stage == "ppo" and name == "model" and rlhf is not None and rlhf() is not None:
                probes.facts["critic"] = engine_facts(rlhf().critic)
            probes.exports.append(
                {
                    "dir": str(out_dir),
                    "kind": kind,
                    "vocab": vocab,
                    "ref": reference(engine, fixed_inputs(engine.device, vocab)),
                }
            )

        return before

    if stage == "sft":
        probes.wrap(sft_mod, "training_engine", "engine_init")
        probes.wrap(sft_mod, "supervised_loop", "train", after=lambda steps, *a, **k: {"optimizer_steps": steps})
        probes.wrap(sft_mod, "export_causal_lm", "export", before=export_probe("causal_lm", lm_reference))
    elif stage == "reward":
        probes.wrap(reward_mod, "training_engine", "engine_init")
        probes.wrap(reward_mod, "supervised_loop", "train", after=lambda steps, *a, **k: {"optimizer_steps": steps})
        probes.wrap(reward_mod, "export_reward_model", "export", before=export_probe("reward", reward_reference))
    else:

        def keep(engine: Any, *a: Any, **k: Any) -> None:
            state["rlhf"] = weakref.ref(engine)

        def counted(exp: dict[str, Any], *a: Any, **k: Any) -> dict[str, Any]:
            return {"answer_tokens": int(exp["action_mask"].sum()), "samples": int(exp["seq"].shape[0])}

        probes.wrap(RLHFEngine, "__init__", "engine_init", after=lambda out, engine, *a, **k: keep(engine))
        probes.wrap(PPOTrainer, "generate_experience", "generate_experience", after=counted)

        calls = [0]

        def logprob_consistency(trainer: Any, exp: dict[str, Any], *a: Any, **k: Any) -> None:
            """On the first and the last micro-batch, outside the phase timings: the old log-probs PPO's ratio
            starts from (generation's own logits; the hybrid engine's inference kernels when they serve the
            layers) against a training-path forward of the same actor. The last one sees trained (LoRA) weights."""
            calls[0] += 1
            if calls[0] not in (1, last_call):
                return
            with torch.no_grad():
                lp = trainer._answer_logprobs(trainer.actor, exp["seq"], exp["attention_mask"], exp["prompts"].shape[1])
            d = (lp - exp["logprobs"]).abs()[exp["action_mask"].bool()]
            probes.facts.setdefault("generation_logprobs_vs_forward", []).append(
                {"call": calls[0], "max_abs": float(d.max()), "mean_abs": float(d.mean())}
            )

        probes.wrap(PPOTrainer, "train_rlhf", "train_rlhf", before=logprob_consistency)
        probes.wrap(PPOTrainer, "train_unsupervised", "train_ptx")
        probes.wrap(RLHFEngine, "update_ema", "ema_update")
        probes.wrap(ppo_mod, "export_causal_lm", "export", before=export_probe("causal_lm", lm_reference))
