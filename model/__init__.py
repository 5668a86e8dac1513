"""The region-level multimodal LLM library (GPT4RoI-style): configs, vision tower, region encoder,
projector + causal LM, prompts, geometry and checkpoint folders.

Rooms below it: :mod:`model.inference` (engine, KV decode, image input), :mod:`model.training`
(loop, distributed helpers, auxiliary heads), :mod:`model.data` (region-text records, converters).
The library imports neither the toy world nor the backend.  Names are resolved lazily, so
``import model.tasks`` does not load torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "model.config",
    "TrainConfig": "model.config",
    "VisionConfig": "model.config",
    "RegionEncoderConfig": "model.config",
    "LMConfig": "model.config",
    "PromptConfig": "model.config",
    "load_model_config": "model.config",
    "RegionMLLM": "model.mllm",
    "PlaceholderError": "model.mllm",
    "RegionEncoder": "model.region_encoder",
    "VisionTower": "model.vision",
    "ImageProcessor": "model.vision",
    "PromptBuilder": "model.prompt",
    "PromptError": "model.prompt",
    "BoxError": "model.geometry",
    "boxes_tensor": "model.geometry",
    "CheckpointError": "model.checkpoint",
    "DEFAULT_DIR": "model.checkpoint",
    "build_model": "model.checkpoint",
    "load_model": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "read_metadata": "model.checkpoint",
    "load_tokenizer": "model.tokenizer",
    "pick_device": "model.device",
    "pick_dtype": "model.device",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
