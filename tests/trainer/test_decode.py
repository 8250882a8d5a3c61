"""kuberlhf.rlhf.decode's static-cache sampler against transformers' ``generate``: the same tokens under the
same seeded noise and the same raw logits (within 1e-5) at every step, on left-padded prompts, with EOS stopping
and pad filling, for pre-LN OPT, post-LN OPT with projections (OPT-350m's layout) and a peft LoRA actor; and the
trainer's choice of sampler (``spec.stages.ppo.decoder``)."""

from __future__ import annotations

import pytest
import torch

from kuberlhf.rlhf.decode import Sampling, StaticDecoder, _layer_plan, generate_reference, pick_decoder, supports


def tiny_opt(seed: int, **overrides):
    from transformers import AutoModelForCausalLM

    from kuberlhf.models.tiny import tiny_config

    config = tiny_config()
    for k, v in overrides.items():
        setattr(config, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()


def left_padded(batch: int = 5, length: int = 9, pad: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):  # 0, 2, 4 ... pads on the left (at least one real token); one row unpadded
        n = min(2 * i, length - 1)
        mask[i, :n] = 0
        ids[i, :n] = pad
    return ids, mask


def by_generate(model, ids, mask, s: Sampling, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        return generate_reference(model, ids, mask, s)


def by_static(model, ids, mask, s: Sampling, seed: int):
    torch.manual_seed(seed)
    return StaticDecoder(model).generate(ids, mask, s)


def shared_token(model, ids, mask, s: Sampling, seed: int) -> int:
    """The token sampled by the most rows under ``seed`` (EOS never sampled): as EOS, it stops those rows at
    different steps under the same seed (the draws up to a row's first EOS do not depend on the EOS id)."""
    seq, _ = by_static(model, ids, mask, s, seed)
    answers = seq[:, ids.shape[1] :]
    rows = torch.zeros(model.config.vocab_size, dtype=torch.long)
    for row in answers:
        rows[row.unique()] += 1
    rows[s.pad_id] = 0
    return int(rows.argmax())


def assert_same(model, ids, mask, s: Sampling, seed: int = 3):
    g_seq, g_logits = by_generate(model, ids, mask, s, seed)
    s_seq, s_logits = by_static(model, ids, mask, s, seed)
    assert s_seq.shape == g_seq.shape and s_logits.shape == g_logits.shape
    assert torch.equal(s_seq, g_seq)
    assert (s_logits - g_logits).abs().max() <= 1e-5
    return s_seq


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 0.8)])
def test_same_tokens_and_logits_as_generate_on_left_padded_prompts(temperature: float, top_p: float) -> None:
    model = tiny_opt(11)
    ids, mask = left_padded()
    seq = assert_same(model, ids, mask, Sampling(24, temperature, top_p, eos_id=10_000, pad_id=0))
    assert seq.shape[1] == ids.shape[1] + 24  # no EOS in the vocabulary: every row runs to max_new_tokens


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_eos_stops_rows_and_pads_them_like_generate(pad_is_eos: bool) -> None:
    model = tiny_opt(12)
    ids, mask = left_padded(batch=6)
    probe = Sampling(30, 1.0, 1.0, eos_id=10_000, pad_id=0)
    eos = shared_token(model, ids, mask, probe, seed=3)
    s = Sampling(30, 1.0, 1.0, eos_id=eos, pad_id=eos if pad_is_eos else 0)
    seq = assert_same(model, ids, mask, s, seed=3)
    answers = seq[:, ids.shape[1] :]
    hit = (answers == eos).any(1)
    assert hit.sum() >= 2, "the test needs rows that sample EOS"
    for row in answers[hit]:  # everything after the first EOS is the pad token
        first = int((row == eos).nonzero()[0])
        assert (row[first + 1 :] == s.pad_id).all()


def test_stops_when_every_row_has_sampled_eos() -> None:
    model = tiny_opt(13)
    ids, mask = left_padded(batch=2)
    eos = shared_token(model, ids, mask, Sampling(60, 1.0, 1.0, eos_id=10_000, pad_id=0), seed=3)
    seq = assert_same(model, ids, mask, Sampling(200, 1.0, 1.0, eos_id=eos, pad_id=0), seed=3)
    assert seq.shape[1] < ids.shape[1] + 200


def test_post_layer_norm_opt_with_projections() -> None:
    """OPT-350m's layout: layer norm after attention/FFN, embeddings projected in and out of a narrower space."""
    model = tiny_opt(14, do_layer_norm_before=False, word_embed_proj_dim=32)
    assert model.model.decoder.project_in is not None and model.model.decoder.final_layer_norm is None
    ids, mask = left_padded()
    assert_same(model, ids, mask, Sampling(16, 0.7, 0.9, eos_id=10_000, pad_id=0))


def test_lora_actor_samples_with_its_adapters() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_opt(15), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"]))
    with torch.no_grad():  # adapters that change the outputs (peft initialises lora_B at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    ids, mask = left_padded()
    s = Sampling(12, 0.7, 1.0, eos_id=10_000, pad_id=0)
    assert_same(model, ids, mask, s)
    with model.disable_adapter():
        base_seq, base_logits = by_static(model, ids, mask, s, seed=3)
    _, lora_logits = by_static(model, ids, mask, s, seed=3)
    assert (lora_logits[:, 0] - base_logits[:, 0]).abs().max() > 1e-3
    # the adapted projections are called as modules (q/k/v not fused), the plain ones through F.linear
    lp = _layer_plan(model.get_base_model().model.decoder.layers[0])
    attn = model.get_base_model().model.decoder.layers[0].self_attn
    assert lp.qkv is None and lp.q is attn.q_proj and lp.v is attn.v_proj and lp.k is not attn.k_proj


def test_plain_layers_run_fused_and_functional() -> None:
    """What the equivalence tests above exercise on a plain OPT: q/k/v as one matmul, no Module calls."""
    layer = tiny_opt(17).model.decoder.layers[0]
    lp = _layer_plan(layer)
    assert lp.qkv is not None and lp.qkv.keywords["weight"].shape[0] == 3 * layer.self_attn.q_proj.out_features
    assert not isinstance(lp.fc1, torch.nn.Module) and not isinstance(lp.ln1, torch.nn.Module)
    traced = _layer_plan(layer, direct=False)  # what torch.compile traces
    assert traced.qkv is None and traced.fc1 is layer.fc1


def test_pick_decoder_follows_the_spec() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    opt = tiny_opt(16)
    assert isinstance(pick_decoder(opt, "auto", False, hybrid=False), StaticDecoder)
    assert pick_decoder(opt, "auto", False, hybrid=False).compiled is False
    assert pick_decoder(opt, "auto", False, hybrid=True) is None  # the hybrid engine's generate
    assert pick_decoder(opt, "generate", False, hybrid=False) is None
    assert isinstance(pick_decoder(opt, "static", False, hybrid=True), StaticDecoder)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    assert not supports(gpt2)
    assert pick_decoder(gpt2, "auto", False, hybrid=False) is None
    with pytest.raises(ValueError, match=r"spec\.stages\.ppo\.decoder"):
        pick_decoder(gpt2, "static", False, hybrid=False)
