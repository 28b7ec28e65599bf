"""The embedded character-level tokenizer, in the Hugging Face format.

One token per printable ASCII character plus newline and tab, and three special tokens (padding, end of sequence, unknown). Any
``transformers`` code loads it with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
CHARACTERS = "\n\t" + "".join(c for c in string.printable if c not in "\n\t\r\x0b\x0c")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character tokenizer; ids are stable: specials first, then ``CHARACTERS``."""
    vocab = {tok: i for i, tok in enumerate([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
