"""Tests-only: a character-level transformers tokenizer (no download) for tiny random decoders.

Ids: ``<unk>`` 0, ``<s>`` 1 (the BOS, and :data:`sinkmodels.SINK_ID`: the implanted sink token),
``</s>`` 2, ``<pad>`` 3, then newline and the printable ASCII characters.  Every text of the
fixtures (Lady Susan) is encoded one id per character and decodes back exactly.
"""
from __future__ import annotations

import string

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHARS = ["\n"] + [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


VOCAB_SIZE = len(SPECIALS) + len(CHARS)
