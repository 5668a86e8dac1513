"""Inference: the batched engine (:mod:`~model.inference.cache` per-image cache,
:mod:`~model.inference.decode` greedy decoding on :mod:`~model.inference.kv_decode` KV caches),
encoded image input, ``describe_regions`` (captions, attributes, relations of a task's boxes) and
the reference per-prompt path the engine is checked against."""

from model.inference.describe import ImageReport, RegionReport, RelationReport, describe_regions
from model.inference.engine import Answer, InferenceEngine
from model.inference.image_input import EncodedImage, ImageLike, decode_rgb
from model.inference.reference import generate_naive

__all__ = [
    "Answer",
    "EncodedImage",
    "ImageLike",
    "ImageReport",
    "InferenceEngine",
    "RegionReport",
    "RelationReport",
    "decode_rgb",
    "describe_regions",
    "generate_naive",
]
