"""Per-stage, per-GPU memory estimate of a pipeline, as a pure function of the spec and the model shapes.

Model states (bytes per parameter; DeepSpeed's accounting, the same as its ``estimate_zero2/3_model_states_mem_needs``):

=====================  ===========  ==================================================================
                        replicated   partitioned over the W data-parallel ranks from ZeRO stage ...
=====================  ===========  ==================================================================
weights                 b (2 or 4)   3
gradients               b            2 (+4 for the fp32 copy of mixed precision; ZeRO-3: the fp32 copy only)
fp32 master weights     4 (mixed)    1
Adam m and v            8            1
=====================  ===========  ==================================================================

so mixed precision at ZeRO-2 is ``2N + 18N/W`` (2 + 4 gradients, 4 master, 8 Adam) and at ZeRO-3 ``18N/W + 4 * largest layer`` (the gathered layer);
``offload`` moves master weights, Adam and fp32 gradients to CPU (and at ZeRO-3 the weights too, leaving the
gathered layer). With LoRA only the adapters have gradients and optimizer state; the frozen base keeps its
16-bit weights. Frozen models (reference, EMA, reward) hold weights only, partitioned at ZeRO-3, none on the GPU
when offloaded.

Activations of a training micro-batch (b16 bytes per element; Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", eq. 2 without the ``5as/h`` attention-score term, which SDPA /
flash attention do not store): ``34 * s * B * h`` per layer; with gradient checkpointing only each layer's
input (``2 * s * B * h``) plus one recomputed layer. The LM head adds its logits (16-bit), their fp32 upcast
for the loss and its gradient: ``10 * s * B * V``. Step 3 adds the generation KV cache
(``2 * layers * B * (prompt + answer) * h * b``, ``B`` the rollout batch: ``rolloutBatchSize``, else
``generationBatchSize``), the generation logits kept for the log-probs (``4 * B * answer * V``) and, with the
hybrid engine at ZeRO-3, the actor gathered whole for generation.
Training and generation do not overlap, so the working memory is the larger of the two.

Checkpoint size on disk: weights (b) + master and Adam (12 bytes mixed, 8 fp32) per trainable parameter, per
trained model, plus the EMA's weights and the final export; the scratch volume of a node must hold the inputs
it downloads, its share of the checkpoint and (node 0) the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kuberlhf.planner.shapes import ModelShape

GiB = 1024**3
# CUDA context, NCCL buffers and the caching allocator's fragmentation, per GPU
CUDA_RESERVE = int(1.5 * GiB)
# the rank's process itself (torch, transformers, deepspeed) when it trains on the CPU accelerator
CPU_RESERVE = int(0.45 * GiB)
# a CUDA rank's own host memory (torch, CUDA libraries, pinned staging buffers) next to what offload puts in host
# memory: an assumption, not measured here (no GPU); the GPU check records each case's host peak RSS to check it
CUDA_HOST_RESERVE = 3 * GiB
DEFAULT_GPU_MEMORY = {"cuda": 80 * GiB}  # A100/H100-80G; declare spec.gpuMemory for anything else
STAGE3_MAX_LIVE_PARAMETERS = int(3e7)  # training/ds_config.py's stage3_max_live_parameters
SCRATCH_HEADROOM = 1.25


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def lora_params(shape: ModelShape, dim: int) -> int:
    """Adapters on every Linear of the decoder blocks (DeepSpeed-Chat's default ``decoder.layers.``)."""
    if dim <= 0:
        return 0
    h, kv, f = shape.hidden_size, shape.num_kv_heads * shape.head_dim, shape.ffn_dim
    per_layer = dim * ((h + h) * 2 + (h + kv) * 2 + (h + f) * (3 if shape.gated_mlp else 2))
    return shape.num_layers * per_layer


@dataclass(frozen=True)
class ModelStates:
    """GPU bytes of one model's weights, gradients and optimizer states on one rank."""

    weights: int
    gradients: int
    optimizer: int
    gathered: int  # ZeRO-3: the largest layer gathered at once (DeepSpeed's 4 * largest_layer_params)
    cpu: int  # host bytes per rank for what offload moved off the GPU

    @property
    def gpu(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered


def model_states(
    n_params: int,
    largest_layer: int,
    world: int,
    zero: int,
    dtype: str,
    offload: bool = False,
    trainable: int | None = None,
) -> ModelStates:
    """Model states of a trained model (``trainable`` < ``n_params`` with LoRA; 0 for a frozen model)."""
    b = dtype_bytes(dtype)
    mixed = b < 4
    trainable = n_params if trainable is None else trainable
    grad_bytes = b + (4 if mixed else 0)  # DeepSpeed's mixed precision also keeps fp32 gradients
    opt_bytes = (4 if mixed else 0) + 8  # fp32 master weights (mixed) + Adam m and v
    part = max(world, 1)
    if zero >= 3:
        grad_bytes = 4  # ZeRO-3 reduces the 16-bit gradients straight into the fp32 partition
    w = n_params * b // (part if zero >= 3 else 1)
    g = trainable * grad_bytes // (part if zero >= 2 else 1)
    opt = trainable * opt_bytes // (part if zero >= 1 else 1)
    gathered = 4 * largest_layer if zero >= 3 else 0
    cpu = 0
    if offload and zero >= 1:
        cpu, opt, g = opt + g, 0, 0
        if zero >= 3:  # training/ds_config.py offloads the parameters too at ZeRO-3
            cpu, w = cpu + w, 0
    return ModelStates(weights=w, gradients=g, optimizer=opt, gathered=gathered, cpu=cpu)


def frozen_states(n_params: int, largest_layer: int, world: int, zero3: bool, dtype: str, offload: bool) -> ModelStates:
    """A frozen model under the inference config (reference, EMA, reward): weights only."""
    b = dtype_bytes(dtype)
    if not zero3:
        return ModelStates(weights=n_params * b, gradients=0, optimizer=0, gathered=0, cpu=0)
    share = n_params * b // max(world, 1)
    if offload:
        return ModelStates(weights=0, gradients=0, optimizer=0, gathered=4 * largest_layer, cpu=share)
    return ModelStates(weights=share, gradients=0, optimizer=0, gathered=4 * largest_layer, cpu=0)


def activation_bytes(
    shape: ModelShape, micro_batch: int, seq_len: int, dtype: str, checkpointing: bool, lm_head: bool
) -> int:
    """Activations of one training micro-batch (see the module docstring)."""
    scale = dtype_bytes(dtype) / 2
    sbh = seq_len * micro_batch * shape.hidden_size
    per_layer = 34 * sbh
    body = (shape.num_layers * 2 * sbh + per_layer) if checkpointing else shape.num_layers * per_layer
    logits = 10 * seq_len * micro_batch * shape.vocab_size if lm_head else 0
    return int((body + logits) * scale)


def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, dtype: str) -> int:
    return 2 * shape.num_layers * batch * tokens * shape.num_kv_heads * shape.head_dim * dtype_bytes(dtype)


@dataclass
class ModelRow:
    """One model of a stage on one GPU."""

    role: str  # actor | reference | ema | critic | reward | model
    source: str
    params: int
    zero: int
    trained: bool
    states: ModelStates
    lora: int = 0
    offload: bool = False
    trainable: int = 0


@dataclass
class StageEstimate:
    stage: str
    nodes: int
    gpus_per_node: int
    models: list[ModelRow]
    working: dict[str, int]  # activations, logits, KV cache, gathered-for-generation ...
    reserve: int
    checkpoint_bytes: int  # one resumable checkpoint, all ranks together
    export_bytes: int
    download_bytes: int  # inputs every node downloads
    gpu_memory: int | None  # bytes per GPU available (None: not checked, e.g. the CPU accelerator)
    notes: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def states_bytes(self) -> int:
        return sum(m.states.gpu for m in self.models)

    @property
    def working_bytes(self) -> int:
        return max(self.working.values(), default=0)

    @property
    def per_gpu_bytes(self) -> int:
        return self.states_bytes + self.working_bytes + self.reserve

    @property
    def cpu_offload_bytes_per_node(self) -> int:
        return sum(m.states.cpu for m in self.models) * self.gpus_per_node

    @property
    def host_bytes_per_pod(self) -> int:
        """Host memory one pod (node) needs: every rank's process, plus what offload moved off the GPUs. On the
        CPU accelerator the ranks' whole estimate is host memory."""
        if self.gpu_memory is None:
            return self.per_gpu_bytes * self.gpus_per_node
        return self.cpu_offload_bytes_per_node + CUDA_HOST_RESERVE * self.gpus_per_node

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.per_gpu_bytes <= self.gpu_memory

    @property
    def scratch_bytes(self) -> int:
        """Per node: downloads + two of this node's checkpoint shares (node 0 writes the 16-bit weights whole at
        ZeRO < 3; the previous checkpoint may still be uploading in the background while the next is written) +
        the export, with headroom."""
        share = self.checkpoint_bytes * self.gpus_per_node // max(self.world, 1)
        weights = sum(m.params * (2 if m.trained else 0) for m in self.models)
        return int((self.download_bytes + 2 * max(share, weights) + self.export_bytes) * SCRATCH_HEADROOM)


@dataclass
class PipelinePlan:
    stages: list[StageEstimate]

    def stage(self, name: str) -> StageEstimate:
        return next(s for s in self.stages if s.stage == name)


def gpu_memory_bytes(spec: Any) -> int | None:
    """Bytes per GPU: ``spec.gpuMemory`` or the accelerator's default; None on the CPU accelerator."""
    if spec.accelerator.value == "cpu":
        return None
    declared = getattr(spec, "gpu_memory", None)
    if declared:
        return parse_quantity(str(declared))
    return DEFAULT_GPU_MEMORY.get(spec.accelerator.value)


_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "K": 10**3,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def parse_quantity(value: str) -> int:
    """A Kubernetes quantity ("80Gi", "40G", "49140Mi", "42949672960") in bytes."""
    value = value.strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * _SUFFIXES[suffix])
    return int(float(value))


def _trained_row(
    role: str,
    source: str,
    shape: ModelShape,
    params: int,
    world: int,
    zero: int,
    dtype: str,
    offload: bool,
    lora_dim: int,
    only_lora: bool,
) -> ModelRow:
    adapters = lora_params(shape, lora_dim)
    total = params + adapters
    trainable = adapters if (adapters and only_lora) else total
    states = model_states(total, shape.largest_layer_params, world, zero, dtype, offload, trainable)
    return ModelRow(
        role=role,
        source=source,
        params=total,
        zero=zero,
        trained=True,
        states=states,
        lora=adapters,
        offload=offload,
        trainable=trainable,
    )


def _frozen_row(role: str, source: str, params: int, shape: ModelShape, world: int, zero3: bool, dtype: str,
                offload: bool) -> ModelRow:
    """A frozen copy (reference, EMA, reward model): sharded only when its trained twin is at ZeRO-3."""
    states = frozen_states(params, shape.largest_layer_params, world, zero3, dtype, offload)
    return ModelRow(role, source, params, 3 if zero3 else 0, False, states, offload=offload)


def _checkpoint_bytes(rows: list[ModelRow], dtype: str) -> int:
    b = dtype_bytes(dtype)
    opt = 12 if b < 4 else 8
    total = 0
    for m in rows:
        if m.trained:
            total += m.params * b + m.trainable * opt
        elif m.role == "ema":
            total += m.params * b
    return total


def estimate_pipeline(spec: Any, shapes: dict[str, ModelShape]) -> PipelinePlan:
    """Pure. ``shapes``: {"actor": shape of spec.actor.model, "reward": shape of spec.reward.model, or the actor's
    with stages.reward.initFromSft (when the pipeline has a reward stage)}. Estimates every stage of the
    pipeline's graph (sft, reward, dpo, ppo, grpo)."""
    gpu_mem = gpu_memory_bytes(spec)
    reserve = CPU_RESERVE if spec.accelerator.value == "cpu" else CUDA_RESERVE
    actor, reward = shapes["actor"], shapes.get("reward")
    out = []
    max_seq = spec.data.max_seq_len
    graph = [st.value for st in spec.stage_graph]
    for stage in (st for st in ("sft", "reward", "dpo") if st in graph):
        st = spec.stages.get(stage)
        nodes, gpus = st.nodes or 1, st.gpus_per_node or 1
        world = nodes * gpus
        zero = st.zero_stage or 0
        dtype = st.dtype.value
        lm = stage != "reward"  # sft and dpo train the causal LM; reward its backbone + value head
        shape = actor if lm else reward
        from_sft = stage == "dpo" or spec.reward_from_sft  # a reward stage's model too with initFromSft
        source = spec.actor.model if stage == "sft" else "sft/model" if from_sft else spec.reward.model
        params = shape.causal_lm_params if lm else shape.backbone_params + _hidden(shape)
        lora = st.lora
        row = _trained_row(
            "model",
            source,
            shape,
            params,
            world,
            zero,
            dtype,
            st.offload,
            lora.dim if lora else 0,
            bool(lora and lora.only_optimize_lora),
        )
        micro = st.per_device_batch_size or 1
        # the reward and dpo stages run chosen and rejected rows of each pair in one batch
        rows_per_batch = micro * (1 if stage == "sft" else 2)
        act = activation_bytes(shape, rows_per_batch, max_seq, dtype, st.gradient_checkpointing, lm_head=lm)
        models = [row]
        if stage == "dpo":  # the frozen reference copy of the SFT model
            off = st.offload_reference_model or st.offload
            models.append(_frozen_row("reference", "sft/model", params, shape, world, zero == 3, dtype, off))
        out.append(
            StageEstimate(
                stage=stage,
                nodes=nodes,
                gpus_per_node=gpus,
                models=models,
                working={"activations": act},
                reserve=reserve,
                checkpoint_bytes=_checkpoint_bytes([row], dtype),
                export_bytes=row.params * dtype_bytes(dtype),
                download_bytes=shape.causal_lm_params * 2,
                gpu_memory=gpu_mem,
            )
        )
    for stage in (st for st in ("ppo", "grpo") if st in graph):
        out.append(_policy_estimate(spec, stage, actor, reward if "reward" in graph else None, gpu_mem, reserve))
    return PipelinePlan(out)


def _hidden(shape: ModelShape) -> int:
    return shape.embed_dim  # the value head: one weight per hidden unit


def _policy_estimate(spec: Any, stage: str, actor: ModelShape, reward: ModelShape | None, gpu_mem: int | None,
                     reserve: int) -> StageEstimate:
    """ppo: actor, critic (trained from the reward model), reference, EMA, frozen reward model; generation of
    generationBatchSize answers. grpo: no critic, the frozen reward model only without a rewardFunction
    (``reward`` None), and groupSize answers per prompt generated and trained on."""
    st = spec.stages.get(stage)
    ppo = stage == "ppo"
    nodes, gpus = st.nodes or 1, st.gpus_per_node or 1
    world = nodes * gpus
    dtype = st.dtype.value
    b = dtype_bytes(dtype)
    a_zero = st.actor_zero_stage or 0
    # the critic's ZeRO stage also shards ppo's frozen reward model; grpo's reward model has its own
    c_zero = (st.critic_zero_stage if ppo else st.reward_zero_stage) or 0
    n_actor = actor.causal_lm_params
    n_critic = reward.backbone_params + _hidden(reward) if reward is not None else 0
    a_lora = st.actor_lora
    rows = [
        _trained_row(
            "actor",
            "sft/model",
            actor,
            n_actor,
            world,
            a_zero,
            dtype,
            st.offload,
            a_lora.dim if a_lora else 0,
            bool(a_lora and a_lora.only_optimize_lora),
        ),
    ]
    if ppo:
        c_lora = st.critic_lora
        rows.append(
            _trained_row(
                "critic",
                "reward/model",
                reward,
                n_critic,
                world,
                c_zero,
                dtype,
                st.offload,
                c_lora.dim if c_lora else 0,
                bool(c_lora and c_lora.only_optimize_lora),
            )
        )
    offload_ref = st.offload_reference_model or st.offload
    rows.append(_frozen_row("reference", "sft/model", n_actor, actor, world, a_zero == 3, dtype, offload_ref))
    if st.ema.enabled:
        rows.append(_frozen_row("ema", "sft/model", rows[0].params, actor, world, a_zero == 3, dtype, offload_ref))
    if reward is not None:
        offload_rm = st.offload_reward_model or st.offload
        rows.append(_frozen_row("reward", "reward/model", n_critic, reward, world, c_zero == 3, dtype, offload_rm))
    # answers generated together per rank: a group of groupSize per prompt in grpo
    samples = (st.generation_batch_size or st.per_device_batch_size or 1) * (1 if ppo else st.group_size)
    micro = min(st.per_device_batch_size or samples, samples)
    seq = st.max_prompt_len + st.max_answer_len
    # ppo: rolloutBatchSize prompts decoded together (kuberlhf.planner.rollout picks its default)
    rollout = (getattr(st, "rollout_batch_size", None) or samples) if ppo else samples
    generation = kv_cache_bytes(actor, rollout, seq, dtype) + 4 * rollout * st.max_answer_len * actor.vocab_size
    if st.hybrid_engine and a_zero == 3:
        # the hybrid engine gathers the actor for generation: whole, or 1/inferenceTpSize of it per GPU
        generation += max(n_actor * b // max(st.inference_tp_size, 1) - rows[0].states.weights, 0)
    train = activation_bytes(actor, micro, seq, dtype, st.gradient_checkpointing, lm_head=True)
    if ppo:  # the critic trains on the same micro-batches
        train = max(train, activation_bytes(reward, micro, seq, dtype, st.gradient_checkpointing, lm_head=False))
    if spec.data.unsupervised is not None and st.ptx_coef > 0:
        train = max(
            train, activation_bytes(actor, micro, spec.data.max_seq_len, dtype, st.gradient_checkpointing, lm_head=True)
        )
    export = n_actor * b * (2 if st.ema.enabled else 1)
    return StageEstimate(
        stage=stage,
        nodes=nodes,
        gpus_per_node=gpus,
        models=rows,
        working={"training": train, "generation": generation},
        reserve=reserve,
        checkpoint_bytes=_checkpoint_bytes(rows, dtype),
        export_bytes=export,
        download_bytes=(n_actor + n_critic) * b,
        gpu_memory=gpu_mem,
    )
