"""Tokenizers: load any Hugging Face ``tokenizer.json`` from a path, or train the builtin byte-level BPE.

Nothing is downloaded: production passes the path of the real MiMo ``tokenizer.json``; the demo and the tests
train a small byte-level BPE on the builtin corpus (seconds) and cache it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens of common tokenizer families, in order of preference (Qwen/MiMo/GPT first).
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")


def load_tokenizer(path: str) -> Tokenizer:
    """Load a ``tokenizer.json`` (any Hugging Face tokenizer) from a local path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(path)


def eos_token_id(tokenizer: Tokenizer) -> int:
    """The id of the end-of-document token that separates packed documents."""
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(f"tokenizer has none of the end-of-document tokens {EOS_CANDIDATES}")


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: every byte is a symbol, so any text round-trips)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
