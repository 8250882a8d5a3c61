"""Regenerates trainer_image/kuberlhf/assets/tiny-opt/: a byte-level BPE tokenizer of 768 tokens trained on the
shipped synthetic data (trainer_image/kuberlhf/assets/data, written by hack/make_synthetic_data.py), plus a
2-layer OPT config. Run by a developer after the data changes; the files are committed so nothing is trained
or downloaded at install or test time. Deterministic: the same data writes the same bytes
(tests/data/test_synthetic.py regenerates and compares).

Trained on the dialogues, every word of the data is one token (" Human:" and " Assistant:" two each), so a
4-turn dialogue fits the tiny example's maxPromptLen of 80 and a follow-up answer copies its subject as one
token from the earlier turn; any other text still encodes, byte by byte."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import OPTConfig, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parents[1] / "trainer_image" / "kuberlhf" / "assets"
OUT = ASSETS / "tiny-opt"
DATA = ASSETS / "data"
# 256 bytes + 3 specials + merges: 768 leaves room for every word of the data (it needs ~510 merges at
# min_frequency 2); a larger vocabulary only grows the embedding.
VOCAB_SIZE = 768
# words outside the built-in data that users and bench/quality_tasks.py use; one line, repeated so each word
# passes min_frequency
EXTRA_WORDS = (
    "please tell me how do I why can you explain give example list number add answer question yes no helpful "
    "polite sorry thanks thank you sure here it that this there their they we our my your am he she them cat "
    "dog bird fish horse frog bear duck pink gray red blue green yellow black white colors animals reverse "
    "count synonym don't know"
)


def training_text(data_dir: Path = DATA) -> Iterator[str]:
    """Every string of the shipped data files, as the model sees it (after a space: ' Human: ...', ' answer'),
    in a fixed order."""
    for path in sorted(data_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for key in sorted(row):
                yield " " + row[key]
    for _ in range(4):
        yield " " + EXTRA_WORDS
    yield " 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 . , ? ! : ; ' \" - ( )"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        list(training_text()),
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<pad>", "</s>", "<unk>"],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=2048,
    )
    fast.save_pretrained(args.out)
    cfg = OPTConfig(
        vocab_size=len(fast),
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=256,
        num_attention_heads=4,
        max_position_embeddings=512,
        word_embed_proj_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        do_layer_norm_before=True,
        enable_bias=True,
        tie_word_embeddings=True,
    )
    cfg.save_pretrained(args.out)
    (args.out / "README.md").write_text(
        f"Tiny OPT (2 layers, hidden 64) config and a {len(fast)}-token byte-level BPE tokenizer trained on the\n"
        "built-in synthetic data (../data), for CPU runs and tests. Weights are initialised from this config at run\n"
        "time (`kuberlhf.models.tiny`). Regenerate with `python hack/make_tiny_assets.py` after\n"
        "`python hack/make_synthetic_data.py`.\n"
    )
    print(json.dumps({"vocab": len(fast), "dir": str(args.out)}))


if __name__ == "__main__":
    main()
