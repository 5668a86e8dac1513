"""Converters from published checkpoints to this project's checkpoint folders.

``python -m model.convert gpt4roi --merged DIR --vision CLIP --out DIR`` (see
:mod:`model.convert.gpt4roi`); Hugging Face CLIP weights to open_clip's layout in
:mod:`model.convert.clip`; streamed shard reading and safetensors writing in
:mod:`model.convert.shards`.
"""

from model.convert.shards import ConversionError

__all__ = ["ConversionError"]
