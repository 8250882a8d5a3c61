"""Regenerates trainer_image/kuberlhf/assets/tiny-opt/: a byte-level BPE tokenizer (few hundred tokens) trained
on the synthetic corpus's vocabulary, plus a 2-layer OPT config. Run once by a developer; the files are committed
so nothing is trained or downloaded at install or test time."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import OPTConfig, PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parents[1] / "trainer_image" / "kuberlhf" / "assets" / "tiny-opt"

WORDS = (
    "Human Assistant what is the capital of colour color name a an the please tell me how do I why can you "
    "explain give example list number one two three four five six seven eight nine ten add plus minus times "
    "equals sum answer question is are was were yes no good bad helpful polite sorry thanks thank you sure "
    "here it that this there their they we our my your I am he she them cat dog bird fish tree sky sea sun "
    "moon red blue green yellow black white big small fast slow hot cold happy sad word words letter letters "
    "first last reverse spell count opposite of synonym capital France Paris Japan Tokyo Italy Rome Spain "
    "Madrid Germany Berlin Egypt Cairo Canada Ottawa Kenya Nairobi Peru Lima happy glad angry calm and or not "
    "don't know rude whatever figure out yourself because best way to learn practice read write code python "
    "water drink eat sleep walk run think"
)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    corpus = [WORDS, WORDS.lower(), "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 . , ? ! : ; ' \" - ( )"]
    corpus += [" ".join(WORDS.split()[i:i + 12]) for i in range(0, len(WORDS.split()), 3)]
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(corpus * 20, vocab_size=512, min_frequency=2,
                            special_tokens=["<pad>", "</s>", "<unk>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="right",
                                   model_max_length=2048)
    fast.save_pretrained(OUT)
    cfg = OPTConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                    max_position_embeddings=512, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
                    pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                    do_layer_norm_before=True, enable_bias=True, tie_word_embeddings=True)
    cfg.save_pretrained(OUT)
    (OUT / "README.md").write_text(
        "Tiny OPT (2 layers, hidden 64) config and a 512-token byte-level BPE tokenizer for CPU runs and tests.\n"
        "Weights are initialised from this config at run time (`kuberlhf.models.tiny`). Regenerate with\n"
        "`python hack/make_tiny_assets.py`.\n")
    print(json.dumps({"vocab": len(fast), "dir": str(OUT)}))


if __name__ == "__main__":
    main()
