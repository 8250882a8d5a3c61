"""Fixtures of the data-layer tests: a word-level tokenizer whose ids are known by hand."""

from __future__ import annotations

import pytest

# id = position: expected token ids in the tests are read straight off this list.
WORDS = ["<pad>", "</s>", "Human:", "Assistant:", "hi", "hello", "yes", "no", "a", "b", "c", "d", "e", "f", "g"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


@pytest.fixture(scope="session")
def words_tok():
    """Whitespace word-level tokenizer: ' Human: hi Assistant:' -> [2, 4, 3]; pad 0, EOS 1, no BOS."""
    return word_tokenizer()
