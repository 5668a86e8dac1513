"""Tokenizers: train our own with ``tokenizers`` or load a local Hugging Face one.

Either way the GPT4RoI special tokens (``<im_patch> <bbox> <im_start> <im_end>`` and a pad token)
are added as special tokens so they are never split.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from model.prompt import ADDED_TOKENS

__all__ = ["add_special_tokens", "load_tokenizer", "train_tokenizer"]

BOS, EOS, PAD, UNK = "<s>", "</s>", "[PAD]", "<unk>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (exact round trip of any text, spaces included)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    add_special_tokens(fast)
    return fast


def add_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the region/image special tokens (and a pad token if missing); returns how many were new."""
    added = 0
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": PAD})
    missing = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        added += tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return added


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder only (never the hub) and make sure it has our tokens."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_special_tokens(tok)
    return tok
