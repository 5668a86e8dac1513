"""Tiny models for fast unit tests (built once per process)."""

from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image

from model.checkpoint import build_model
from model.config import RegionEncoderConfig, load_model_config
from model.inference.image_input import encode_image
from model.mllm import RegionMLLM
from model.tokenizer import train_tokenizer
from toyworld.scenes import SyntheticRecords, corpus_texts


@lru_cache(maxsize=1)
def tiny_tokenizer():
    return train_tokenizer(corpus_texts(count=200), vocab_size=280)


def tiny_model(seed: int = 0) -> RegionMLLM:
    """A fresh random ``roi-test`` model (about 0.3 M parameters)."""
    torch.manual_seed(seed)
    return build_model(load_model_config("roi-test"), tiny_tokenizer())


def tiny_records(count: int = 64, seed: int = 3) -> SyntheticRecords:
    return SyntheticRecords(seed=seed, count=count)


def tiny_region_config(**overrides) -> RegionEncoderConfig:
    """A one-level region encoder config small enough to run on hand-made feature maps."""
    sizes = {"fuse_channels": 8, "level_sizes": [8], "gn_groups": 2, "roi_output_size": 2, "hidden_dim": 16}
    return RegionEncoderConfig(**{**sizes, "pos_hidden_dim": 8, **overrides})


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as a PNG file (lossless: decoding it gives back the same pixels)."""
    return encode_image(image, "PNG")
