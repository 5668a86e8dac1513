"""Tokenizers: train our own with ``tokenizers`` or load a Hugging Face one (local folder or Hub
repo id), and the embedding rows of tokens added to a pretrained LM.

The GPT4RoI special tokens are added as special tokens so they are never split.  A tokenizer that
has none of them gets GPT4RoI's full set in the official order (``[PAD]`` if there is no pad token,
then ``<im_patch> <bbox> <point> <im_start> <im_end>``), so a LLaMA/Vicuna vocabulary ends with the
ids of GPT4RoI's ``added_tokens.json`` (32000-32005); one that already has some (older checkpoint
folders) only gets the missing ones the prompts need.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from model.prompt import ADDED_TOKENS, REQUIRED_TOKENS

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "UNK",
    "add_special_tokens",
    "load_tokenizer",
    "mean_init_rows",
    "resize_embeddings",
    "train_tokenizer",
]

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
    vocab = tokenizer.get_vocab()
    if tokenizer.pad_token is None:
        if PAD in vocab:  # GPT4RoI folders whose special-token map lost the pad entry
            tokenizer.pad_token = PAD
        else:
            added += tokenizer.add_special_tokens({"pad_token": PAD})
    fresh = not any(t in vocab for t in ADDED_TOKENS)
    missing = [t for t in (ADDED_TOKENS if fresh else REQUIRED_TOKENS) if t not in vocab]
    if missing:
        # One call keeps the list order, so the ids follow GPT4RoI's.
        added += tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    return added


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (never the hub) and make sure it has our tokens.
    Hub repo ids are resolved to a local folder first (:func:`model.lm.resolve_pretrained`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_special_tokens(tok)
    return tok


@torch.no_grad()
def mean_init_rows(weight: torch.Tensor, old_rows: int) -> None:
    """Set rows ``old_rows:`` of an embedding matrix ``(V, D)`` to the mean of the rows before
    them, in place (GPT4RoI's initialisation of added tokens, spi_llava.py)."""
    if weight.shape[0] > old_rows > 0:
        weight[old_rows:] = weight[:old_rows].float().mean(dim=0, keepdim=True).to(weight.dtype)


def resize_embeddings(lm: PreTrainedModel, size: int) -> None:
    """Resize ``lm``'s input (and untied output) embeddings to ``size`` rows; new rows are the mean
    of the existing ones, exactly (transformers' ``mean_resizing`` draws them at random around it)."""
    old = int(lm.get_input_embeddings().weight.shape[0])
    if old == size:
        return
    lm.resize_token_embeddings(size, mean_resizing=False)
    mean_init_rows(lm.get_input_embeddings().weight, old)
    out = lm.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr():
        mean_init_rows(out.weight, old)
