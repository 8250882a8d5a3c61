"""Models without DeepSpeed: loading errors, the reward-model format round trip, LoRA merge, export."""

from __future__ import annotations

import pytest
import torch

from kuberlhf.contract.spec import LoraSpec
from kuberlhf.models.loading import ModelError, load_causal_lm, load_tokenizer, resolve_local
from kuberlhf.models.lora import apply_lora, has_lora, merge_lora_
from kuberlhf.models.reward import RewardModel
from kuberlhf.training.export import export_tensors


def test_tiny_model_is_seeded_and_tokenizer_has_pad():
    a, b = load_causal_lm("kuberlhf/tiny-opt", seed=3), load_causal_lm("kuberlhf/tiny-opt", seed=3)
    c = load_causal_lm("kuberlhf/tiny-opt", seed=4)
    w = "model.decoder.layers.0.fc1.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w]) and not torch.equal(a.state_dict()[w], c.state_dict()[w])
    tok = load_tokenizer("kuberlhf/tiny-opt", padding_side="left")
    assert tok.pad_token_id is not None and tok.padding_side == "left"


def test_model_path_errors_name_the_field(tmp_path):
    with pytest.raises(ModelError, match=r"spec.reward.model=.*does not exist"):
        resolve_local(str(tmp_path / "missing"), "spec.reward.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_local(str(tmp_path / "empty"), "spec.actor.model")
    assert resolve_local("facebook/opt-350m", "spec.actor.model") == "facebook/opt-350m"
    with pytest.raises(ModelError, match="spec.actor.model=facebook/opt-350m"):
        load_causal_lm("facebook/opt-350m", "spec.actor.model")


def test_reward_model_round_trip_scores_last_non_pad_token(tmp_path):
    tok = load_tokenizer("kuberlhf/tiny-opt")
    rm = RewardModel.from_causal_lm_source("kuberlhf/tiny-opt", seed=1).eval()
    batch = tok([" Human: hi Assistant: hello there", " Human: x Assistant: y"], return_tensors="pt", padding=True)
    values, scores = rm(batch["input_ids"], batch["attention_mask"])
    last = batch["attention_mask"].sum(1) - 1
    assert torch.allclose(scores, values[torch.arange(2), last])
    rm.save_pretrained(tmp_path, tokenizer=tok)
    again = RewardModel.from_pretrained(tmp_path).eval()
    assert torch.allclose(again(batch["input_ids"], batch["attention_mask"])[1], scores, atol=1e-6)
    # the reward dir also initialises a reward model/critic through the generic entry point
    assert torch.allclose(RewardModel.from_causal_lm_source(str(tmp_path)).eval()(
        batch["input_ids"], batch["attention_mask"])[1], scores, atol=1e-6)


def exported_copy(model, build):
    """A fresh model of the same architecture loaded with what the export writes (LoRA merged, tied weights
    once): it must load strictly, apart from a tied LM head."""
    plain = build()
    missing, unexpected = plain.load_state_dict(dict(export_tensors(model)), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    plain.tie_weights()
    return plain


def test_lora_only_trains_adapters_and_merges_to_same_function():
    model = load_causal_lm("kuberlhf/tiny-opt", seed=1)
    apply_lora(model, LoraSpec(dim=4, alpha=8, only_optimize_lora=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapters non-trivial (lora_B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ids = torch.tensor([[1, 5, 9, 30, 77]])
    expected = model(input_ids=ids).logits
    plain = exported_copy(model, lambda: type(model)(model.config))
    assert not has_lora(plain)
    assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)
    merge_lora_(model)
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)


def test_lora_module_name_that_matches_nothing():
    with pytest.raises(ValueError, match="moduleName='nope'"):
        apply_lora(load_causal_lm("kuberlhf/tiny-opt"), LoraSpec(dim=4, module_name="nope"), "spec.stages.sft.lora")


def tiny_llama_and_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    return {"llama": llama, "gpt2": gpt2}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_default_lora_module_name_adapts_the_decoder_blocks_of_any_causal_lm(arch):
    """DeepSpeed-Chat's default moduleName ('decoder.layers.', OPT's names) on a Llama (model.layers.N, Linear)
    and a GPT-2 (transformer.h.N, Conv1D): the adapters go on the decoder blocks' layers, a rank (dim 128) above
    the hidden size (32) trains, and the merged export computes the same function."""
    model = tiny_llama_and_gpt2()[arch].eval()  # GPT-2's default dropout would make two forwards differ
    spec = LoraSpec(dim=128)
    apply_lora(model, spec, "spec.stages.sft.lora")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    block = "model.layers." if arch == "llama" else "transformer.h."
    assert adapted and all(n.startswith(block) for n in adapted)
    per_block = {"llama": 7, "gpt2": 4}[arch]  # q,k,v,o,gate,up,down | c_attn, c_proj, c_fc, mlp.c_proj
    assert len(adapted) == 2 * per_block
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    ids = torch.tensor([[1, 5, 9, 30, 77]])
    expected = model(input_ids=ids).logits
    plain = exported_copy(model, lambda: type(model)(model.config)).eval()
    assert not has_lora(plain)
    assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)
    # a name the user chose is taken as given: no fallback
    with pytest.raises(ValueError, match="moduleName='decoder.blocks.'"):
        apply_lora(tiny_llama_and_gpt2()[arch], LoraSpec(dim=4, module_name="decoder.blocks."))


REVISION_PROBE = r"""
import json, sys
from kuberlhf.models.loading import load_causal_lm, load_tokenizer
from kuberlhf.models.reward import RewardModel
name, out = sys.argv[1], []
for rev in sys.argv[2:]:
    rev = rev or None
    lm = load_causal_lm(name, revision=rev)
    rm = RewardModel.from_causal_lm_source(name, revision=rev)
    out.append([lm.config.num_hidden_layers, rm.config.num_hidden_layers, len(load_tokenizer(name, revision=rev))])
print(json.dumps(out))
"""


def test_revision_reaches_from_pretrained(tmp_path):
    """spec.actor/reward.revision: a hub cache laid out as the hub writes it (refs/<branch> -> snapshots/<commit>),
    read offline. Two revisions of one repository differ in depth; each loader gets the one asked for."""
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from kuberlhf.models.tiny import TINY_ASSETS

    repo = tmp_path / "hub" / "models--acme--tiny-opt"
    commits = {"main": "1" * 40, "v1": "2" * 40}
    tokenizer = AutoTokenizer.from_pretrained(TINY_ASSETS)
    for branch, layers in (("main", 2), ("v1", 1)):
        snapshot = repo / "snapshots" / commits[branch]
        config = OPTConfig.from_pretrained(TINY_ASSETS, num_hidden_layers=layers)
        OPTForCausalLM(config).save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commits[branch])
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    # one process (the hub cache location is read at import): no revision, a branch, a commit
    out = subprocess.run([sys.executable, "-c", REVISION_PROBE, "acme/tiny-opt", "", "v1", commits["v1"]], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    vocab = len(tokenizer)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[2, 2, vocab], [1, 1, vocab], [1, 1, vocab]]
