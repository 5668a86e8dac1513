"""Inference: the batched engine (image cache, greedy decode on KV caches), encoded image input,
and ``describe_regions`` (captions, attributes, relations of a task's boxes)."""

from model.inference.describe import ImageReport, RegionReport, RelationReport, describe_regions
from model.inference.engine import Answer, InferenceEngine
from model.inference.image_input import EncodedImage, ImageLike, decode_rgb

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
]
