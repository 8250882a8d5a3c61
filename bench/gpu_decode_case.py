"""GPU check case ``decode-opt1.3b`` (issue 17, part 5): step-3 rollout generation on an OPT-1.3B-sized actor
(random weights) with kuberlhf.rlhf.decode's static-cache sampler, eager and torch.compile'd
(``mode="reduce-overhead"``: CUDA graphs of the decoding step), against transformers' ``generate``, at
DeepSpeed-Chat's single-GPU step-3 shapes (16 prompts of 256 tokens, 256-token answers). First an equivalence
check in fp32 (same tokens under the same seed, logits within a tolerance), then bf16 timings: tokens/s of each
path and the compile time. The hybrid engine's generation is timed by the ``ppo-*-hybrid`` cases (phase
``generate``). ``--cpu`` runs the same body on the tiny OPT family, compile left out (its CPU compile time is
minutes)."""

from __future__ import annotations

import time
from typing import Any


def run(
    ctx: Any, model: str = "opt-1.3b", batch: int = 16, prompt_len: int = 256, answer_len: int = 256, repeats: int = 2
) -> dict[str, Any]:
    import torch
    from gpu_check_stages import CheckFailed, write_fixture
    from transformers import AutoModelForCausalLM

    from kuberlhf.rlhf.decode import Sampling, StaticDecoder, generate_reference

    cuda = not ctx.cpu
    dev = "cuda" if cuda else "cpu"
    if ctx.cpu:
        batch, prompt_len, answer_len = 4, 24, 12
    path = write_fixture(ctx.shared / "fixtures", "lm", model, tiny=ctx.cpu, cuda=cuda)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):  # left padding of 0 .. prompt_len / 2 tokens
        n = (i * prompt_len) // (2 * batch)
        ids[i, :n], mask[i, :n] = 1, 0
    ids, mask = ids.to(dev), mask.to(dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    result: dict[str, Any] = {"model": model, "batch": batch, "prompt_len": prompt_len, "answer_len": answer_len}
    # 1. equivalence, fp32 (TF32 off: the comparison is about the algorithm, not the matmul precision)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    s8 = Sampling(8, 0.7, 1.0, eos_id=10**6, pad_id=1)  # no EOS in the vocabulary: full length
    with torch.no_grad():
        torch.manual_seed(5)
        g_seq, g_logits = generate_reference(m32, ids, mask, s8)
        torch.manual_seed(5)
        s_seq, s_logits = StaticDecoder(m32).generate(ids, mask, s8)
    equiv = {
        "tokens_equal": bool(torch.equal(g_seq, s_seq)),
        "max_logit_diff": float((g_logits - s_logits).abs().max()),
    }
    result["equivalence_fp32"] = equiv
    ctx.record(**result)
    del m32
    if cuda:
        torch.cuda.empty_cache()
    if equiv["max_logit_diff"] > (1e-3 if cuda else 1e-5):
        raise CheckFailed(f"static decoder logits differ from generate's by {equiv['max_logit_diff']:.2e}")
    # 2. timings, bf16 on the GPU (the recipe's dtype), fp32 on the CPU
    dtype = torch.bfloat16 if cuda else torch.float32
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    s = Sampling(answer_len, 1.0, 1.0, eos_id=10**6, pad_id=1)
    static = StaticDecoder(m)
    paths: dict[str, Any] = {
        "generate": lambda: generate_reference(m, ids, mask, s),
        "static": lambda: static.generate(ids, mask, s),
    }
    if cuda:
        compiled = StaticDecoder(m, compile=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled.generate(ids, mask, s)
        sync()
        result["compile_first_call_s"] = time.perf_counter() - t0
        paths["static-compiled"] = lambda: compiled.generate(ids, mask, s)
    timings: dict[str, Any] = {}
    for name, fn in paths.items():
        with torch.no_grad():
            fn()  # warm-up
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync()
        sec = (time.perf_counter() - t0) / repeats
        timings[name] = {"s_per_rollout": sec, "gen_tokens_per_s": batch * answer_len / sec}
        result["timings"] = timings
        ctx.record(**result)
    base = timings["generate"]["s_per_rollout"]
    result["speedup_vs_generate"] = {k: base / v["s_per_rollout"] for k, v in timings.items() if k != "generate"}
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result
