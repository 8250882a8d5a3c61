"""Step 3's rollout sampler without ``generate``: a sampling loop over a pre-allocated (static) KV cache.

At the sizes step 3 runs on a CPU, and for every decoding step on a GPU without CUDA graphs, a decoding step is
bound by per-token Python and dispatch, not by arithmetic: transformers' ``generate`` runs logits processors,
stopping criteria, ``prepare_inputs_for_generation``, a growing ``DynamicCache`` and the model's decorated
forward (mask building, output capture) for every token. :class:`StaticDecoder` runs the same model's own
submodules (so LoRA adapters and trained weights are the live ones) over one pre-allocated K/V tensor per
layer, with shapes that do not change between steps: the attention of a step covers the whole cache under a
boolean mask, and the new key/value are written at the step's slot. That step is what ``torch.compile`` compiles
(``compile=True``; on CUDA ``mode="reduce-overhead"`` captures it as a CUDA graph, the cache being marked as a
static address), through the same code. Eager, a step calls plain ``Linear``/``LayerNorm`` layers through their
functional forms on the live parameters and fuses q/k/v into one matmul (their weights concatenated once per
``generate`` call); LoRA-wrapped or hooked modules are called as themselves.

Sampling is ``generate``'s own arithmetic, in its order (float32 logits, temperature, top-p as transformers'
``TopPLogitsWarper``, softmax, ``torch.multinomial``; finished rows get the pad token; stop when every row has
sampled EOS or at ``max_new_tokens``), so under the same RNG state it draws the same tokens and returns the raw
logits of every step like ``generate(output_logits=True)`` (tests/trainer/test_decode.py).

Supported: OPT-family causal LMs (every model this project ships and benchmarks), plain or peft-wrapped, whose
weights are not partitioned (ZeRO 0-2). :func:`supports` says whether a model qualifies; the trainer falls back
to ``generate`` (or the hybrid engine) otherwise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    eos_id: int
    pad_id: int


def _base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports(model: Any) -> bool:
    """OPT-family causal LM (``model.model.decoder`` + ``lm_head``) whose weights are not ZeRO-3 partitioned."""
    base = _base_model(model)
    if getattr(getattr(base, "config", None), "model_type", None) != "opt":
        return False
    if not hasattr(base, "lm_head") or not hasattr(getattr(base, "model", None), "decoder"):
        return False
    # ZeRO-3 leaves an empty placeholder in .data and gathers inside module hooks: generate() handles that
    return not any(hasattr(p, "ds_id") for p in base.parameters())


def top_p_mask(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' ``TopPLogitsWarper`` (min_tokens_to_keep=1): -inf on tokens outside the nucleus."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from float32 logits, with generate's processors in generate's order."""
    scores = logits
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        scores = top_p_mask(scores, top_p)
    return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def _plain(module: Any, kind: type) -> bool:
    """Exactly ``kind`` (not a LoRA or other wrapper subclass) with no forward hooks: calling its functional form
    on its own parameters is the same computation."""
    return type(module) is kind and not module._forward_hooks and not module._forward_pre_hooks


def _direct(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` as a callable: for a plain Linear / LayerNorm, its functional form bound to its live parameters
    (no ``Module.__call__`` bookkeeping, a few microseconds per call that a decoding step pays ~10 times per
    layer); anything else (LoRA layers, hooked modules) is called as itself."""
    if _plain(module, torch.nn.Linear):
        return partial(F.linear, weight=module.weight, bias=module.bias)
    if _plain(module, torch.nn.LayerNorm):
        return partial(
            F.layer_norm,
            normalized_shape=module.normalized_shape,
            weight=module.weight,
            bias=module.bias,
            eps=module.eps,
        )
    return module


@dataclass(frozen=True)
class _LayerPlan:
    """One decoder layer's callables for a generate call. ``qkv``: q, k and v projections fused into one matmul
    (their weights concatenated once per call, as training changes them between calls), when all three are plain
    Linear; else ``None`` and the three are called one by one."""

    ln1: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], torch.Tensor] | None
    q: Callable[[torch.Tensor], torch.Tensor]
    k: Callable[[torch.Tensor], torch.Tensor]
    v: Callable[[torch.Tensor], torch.Tensor]
    out: Callable[[torch.Tensor], torch.Tensor]
    ln2: Callable[[torch.Tensor], torch.Tensor]
    fc1: Callable[[torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    fc2: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


def _layer_plan(layer: Any, direct: bool = True) -> _LayerPlan:
    """``direct``: functional forms and fused q/k/v (eager decoding); else the modules themselves (what
    ``torch.compile`` traces, once)."""
    a = layer.self_attn
    wrap = _direct if direct else (lambda m: m)
    qkv = None
    projections = (a.q_proj, a.k_proj, a.v_proj)
    with_bias = [m.bias is not None for m in projections]
    if direct and all(_plain(m, torch.nn.Linear) for m in projections) and len(set(with_bias)) == 1:
        bias = torch.cat([m.bias for m in projections]) if with_bias[0] else None
        qkv = partial(F.linear, weight=torch.cat([m.weight for m in projections]), bias=bias)
    return _LayerPlan(
        ln1=wrap(layer.self_attn_layer_norm),
        qkv=qkv,
        q=wrap(a.q_proj),
        k=wrap(a.k_proj),
        v=wrap(a.v_proj),
        out=wrap(a.out_proj),
        ln2=wrap(layer.final_layer_norm),
        fc1=wrap(layer.fc1),
        act=layer.activation_fn,
        fc2=wrap(layer.fc2),
        scaling=a.scaling,
    )


class StaticDecoder:
    """Samples answers of an OPT-family causal LM. Build once per model (cheap); ``compile=True`` compiles the
    decoding step (worth it on GPU, where it also becomes a CUDA graph; on a small CPU model the compile time is
    not earned back: bench/ppo_bench.py measures both)."""

    def __init__(self, model: Any, compile: bool = False):
        if not supports(model):
            raise ValueError("StaticDecoder needs an OPT-family causal LM with unpartitioned weights")
        self.model = model
        base = _base_model(model)
        self.decoder = base.model.decoder
        self.lm_head = base.lm_head
        cfg = base.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.pre_ln = bool(cfg.do_layer_norm_before)
        self.compiled = compile
        # compiled: the modules, traced once; eager: functional forms and fused q/k/v, rebuilt per generate call
        self._module_plans = [_layer_plan(layer, direct=False) for layer in self.decoder.layers]
        self._plans = self._module_plans
        self._step = self._decode_step
        if compile:
            mode = "reduce-overhead" if self.decoder.embed_tokens.weight.is_cuda else None
            self._step = torch.compile(self._decode_step, dynamic=False, fullgraph=False, mode=mode)

    # --- the model, over the static cache ----------------------------------------------------------------
    def _layers(
        self, h: torch.Tensor, allowed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """The decoder stack on ``h`` (B, T, E) whose tokens go to cache ``slots`` (T,); ``allowed`` (B, 1, T, L)
        says which cached positions each query sees. Same operations as transformers' OPT layers."""
        b, t, e = h.shape
        nh, hd = self.n_heads, self.head_dim
        for i, lp in enumerate(self._plans):
            residual = h
            if self.pre_ln:
                h = lp.ln1(h)
            if lp.qkv is not None:
                q, k, v = lp.qkv(h).split(e, dim=-1)
            else:
                q, k, v = lp.q(h), lp.k(h), lp.v(h)
            q = (q * lp.scaling).view(b, t, nh, hd).transpose(1, 2)
            k = k.view(b, t, nh, hd).transpose(1, 2)
            v = v.view(b, t, nh, hd).transpose(1, 2)
            k_cache[i].index_copy_(2, slots, k)
            v_cache[i].index_copy_(2, slots, v)
            o = F.scaled_dot_product_attention(q, k_cache[i], v_cache[i], attn_mask=allowed, scale=1.0)
            h = residual + lp.out(o.transpose(1, 2).reshape(b, t, -1))
            if not self.pre_ln:
                h = lp.ln1(h)
            residual = h
            if self.pre_ln:
                h = lp.ln2(h)
            h = residual + lp.fc2(lp.act(lp.fc1(h)))
            if not self.pre_ln:
                h = lp.ln2(h)
        return h

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        h = d.embed_tokens(ids)
        if d.project_in is not None:
            h = d.project_in(h)
        return h + F.embedding(pos + d.embed_positions.offset, d.embed_positions.weight).to(h.dtype)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        if d.final_layer_norm is not None:
            h = d.final_layer_norm(h)
        if d.project_out is not None:
            h = d.project_out(h)
        return self.lm_head(h)[:, -1].float()

    def _decode_step(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        allowed: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot: torch.Tensor,
    ) -> torch.Tensor:
        """One token per row (ids, pos: (B, 1)) at cache ``slot`` (1,): float32 logits (B, V). Static shapes."""
        return self._logits(self._layers(self._embed(ids, pos), allowed, k_cache, v_cache, slot))

    # --- sampling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompts: torch.Tensor, prompt_mask: torch.Tensor, s: Sampling
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sequences (B, P + T), logits (B, T, V))`` for left-padded ``prompts`` (B, P), T <= max_new_tokens
        (fewer when every row has sampled EOS), as ``generate(do_sample=True, output_logits=True)`` returns."""
        if self.compiled:
            return self._generate(prompts, prompt_mask, s)
        # the eager layers' callables, q/k/v fused, once per call: the weights are the live (just trained) ones
        self._plans = [_layer_plan(layer) for layer in self.decoder.layers]
        try:
            return self._generate(prompts, prompt_mask, s)
        finally:
            self._plans = self._module_plans

    def _generate(
        self, prompts: torch.Tensor, prompt_mask: torch.Tensor, s: Sampling
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, p = prompts.shape
        n, dev = s.max_new_tokens, prompts.device
        total = p + n
        w = self.decoder.embed_tokens.weight
        shape = (self.n_layers, b, self.n_heads, total, self.head_dim)
        k_cache = torch.zeros(shape, dtype=w.dtype, device=dev)
        v_cache = torch.zeros(shape, dtype=w.dtype, device=dev)
        if self.compiled:
            torch._dynamo.mark_static_address(k_cache)
            torch._dynamo.mark_static_address(v_cache)
        # keys a query may see: real prompt tokens, every generated slot (generate's mask is 1 there even after
        # EOS), causally; a pad query also sees itself, so no row of the softmax is empty (no NaN)
        keys = torch.cat([prompt_mask.bool(), torch.ones(b, n, dtype=torch.bool, device=dev)], dim=1)
        ar = torch.arange(total, device=dev)
        causal = ar[None, :] <= ar[:p, None]
        allowed = (keys[:, None, :] & causal[None]) | (ar[None, :] == ar[:p, None])[None]
        pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self._layers(self._embed(prompts, pos), allowed[:, None], k_cache, v_cache, ar[:p])
        logits = self._logits(h[:, -1:])
        next_pos = prompt_mask.long().sum(-1, keepdim=True)
        tokens = torch.full((b, n), s.pad_id, dtype=prompts.dtype, device=dev)
        out = torch.empty((b, n, logits.shape[-1]), dtype=torch.float32, device=dev)
        unfinished = torch.ones(b, dtype=torch.bool, device=dev)
        steps = 0
        for t in range(n):
            out[:, t] = logits
            nxt = torch.where(unfinished, sample(logits, s.temperature, s.top_p), s.pad_id)
            tokens[:, t] = nxt
            unfinished &= nxt != s.eos_id
            steps = t + 1
            if t == n - 1 or not bool(unfinished.any()):
                break
            slot = ar[p + t : p + t + 1]
            step_allowed = (keys & (ar <= p + t))[:, None, None, :]
            logits = self._step(nxt[:, None], next_pos + t, step_allowed, k_cache, v_cache, slot)
        return torch.cat([prompts, tokens[:, :steps]], dim=1), out[:, :steps]


def pick_decoder(model: Any, mode: str, compile: bool, hybrid: bool) -> StaticDecoder | None:
    """``spec.stages.ppo.decoder``'s choice for ``model``: a :class:`StaticDecoder`, or ``None`` for ``generate``
    (which the hybrid engine replaces with its inference kernels when it is on)."""
    if mode == "generate" or (mode == "auto" and hybrid):
        return None
    if not supports(model):
        if mode == "static":
            raise ValueError(
                "spec.stages.ppo.decoder=static needs an OPT-family actor whose weights are not "
                "partitioned (actorZeroStage 0-2); fix: set spec.stages.ppo.decoder to auto or generate"
            )
        return None
    return StaticDecoder(model, compile=compile)


def generate_reference(
    model: Any, prompts: torch.Tensor, prompt_mask: torch.Tensor, s: Sampling
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``generate`` with the settings :class:`StaticDecoder` reproduces: ``(sequences, logits)``
    (the equivalence tests and the GPU check's decode case compare the two)."""
    out = model.generate(
        input_ids=prompts,
        attention_mask=prompt_mask,
        max_new_tokens=s.max_new_tokens,
        do_sample=True,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=0,
        pad_token_id=s.pad_id,
        eos_token_id=s.eos_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences, torch.stack(out.logits, dim=1)
