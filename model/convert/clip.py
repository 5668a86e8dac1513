"""Hugging Face ``CLIPVisionModel`` / ``CLIPModel`` weights -> open_clip ``VisionTransformer`` layout.

OpenAI's CLIP is published on the Hub in the Hugging Face layout (``openai/clip-vit-large-patch14``:
``vision_model.encoder.layers.{i}.self_attn.q_proj`` ...); open_clip names the same tensors
``visual.transformer.resblocks.{i}.attn.in_proj_weight`` with q, k, v stacked.  Every vision key is
mapped or refused by name; the text tower of a full ``CLIPModel`` is recognised and left out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "VisionSourceError",
    "hf_clip_to_open_clip",
    "hf_vision_config",
    "is_hf_clip_state",
    "read_hf_clip_folder",
    "read_state_file",
]

HF_VISION_PREFIX = "vision_model."
# transformers 5 saves a CLIPVisionModel without its ``vision_model.`` prefix.
_BARE_VISION = ("embeddings.", "encoder.layers.", "pre_layrnorm.", "post_layernorm.")
# Keys of a full CLIPModel that belong to the text side (not used by a vision tower).
HF_TEXT_KEYS = re.compile(r"^(text_model\.|text_projection\.|logit_scale$)")
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_RENAMES = {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class VisionSourceError(ValueError):
    """Vision weights that cannot become the configured open_clip tower (named key or size)."""


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one weights file: safetensors without unpickling, anything else through
    ``torch.load(weights_only=True)``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def is_hf_clip_state(keys: Any) -> bool:
    """True for a state dict in the Hugging Face CLIP layout."""
    return any(str(k).startswith((HF_VISION_PREFIX, *_BARE_VISION)) for k in keys)


def hf_clip_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP state -> open_clip ``visual.*`` state.

    q, k, v projections are stacked into ``attn.in_proj_weight``/``in_proj_bias``;
    ``visual_projection.weight`` (``(E, W)``, CLIPModel only) becomes ``visual.proj`` ``(W, E)``.
    A ``CLIPVisionModel`` has no projection: ``visual.proj`` is then absent and the caller fills
    it (the region model never uses it: it reads intermediate blocks).  Raises
    :class:`VisionSourceError` naming any key it cannot place.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith(_BARE_VISION):
            key = HF_VISION_PREFIX + key
        if HF_TEXT_KEYS.match(key) or key.endswith("position_ids"):
            continue  # text tower / a constant index buffer of older transformers versions
        if key in _RENAMES:
            out[f"visual.{_RENAMES[key]}"] = tensor
            continue
        if key == "visual_projection.weight":
            out["visual.proj"] = tensor.t().contiguous()
            continue
        m = _LAYER.match(key)
        if m is None:
            raise VisionSourceError(f"Hugging Face CLIP key {key!r} has no open_clip counterpart")
        layer, rest = int(m.group(1)), m.group(2)
        pm = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if pm:
            qkv.setdefault((layer, pm.group(2)), {})[pm.group(1)] = tensor
        elif rest in _LAYER_RENAMES:
            out[f"visual.transformer.resblocks.{layer}.{_LAYER_RENAMES[rest]}"] = tensor
        else:
            raise VisionSourceError(f"Hugging Face CLIP key {key!r} has no open_clip counterpart")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise VisionSourceError(f"layer {layer}: self_attn {missing} projection {kind} missing")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"visual.transformer.resblocks.{layer}.attn.{name}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    cls = out.get("visual.class_embedding")
    if cls is not None and cls.dim() == 2:  # some exports keep a (1, W) class embedding
        out["visual.class_embedding"] = cls.reshape(-1)
    return out


def hf_vision_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The vision part of a Hugging Face ``CLIPConfig`` / ``CLIPVisionConfig`` dict."""
    return dict(config.get("vision_config") or config)


def read_hf_clip_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(vision config, open_clip visual.* state)`` of a Hugging Face CLIP folder."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise VisionSourceError(f"{folder} is not a Hugging Face CLIP folder (no config.json)")
    config = hf_vision_config(json.loads(cfg_path.read_text()))
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return config, hf_clip_to_open_clip(read_state_file(folder / name))
    raise VisionSourceError(f"{folder} has none of {WEIGHT_FILES}")


def check_hf_matches_tower(config: Mapping[str, Any], visual: torch.nn.Module, name: str) -> None:
    """Refuse a Hugging Face CLIP config whose sizes or activation differ from the open_clip tower
    ``name`` (``ViT-L-14`` is GELU, OpenAI's CLIP QuickGELU: ``ViT-L-14-quickgelu``)."""
    from open_clip.transformer import QuickGELU

    blocks = visual.transformer.resblocks
    side = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    have = {
        "hidden_size": int(visual.transformer.width),
        "num_hidden_layers": len(blocks),
        "image_size": int(side),
        "patch_size": int(patch),
        "intermediate_size": int(blocks[0].mlp.c_fc.out_features),
    }
    diffs = [f"{k} {config[k]} vs {v}" for k, v in have.items() if k in config and int(config[k]) != v]
    quick = isinstance(blocks[0].mlp.gelu, QuickGELU)
    act = config.get("hidden_act")
    if act is not None and (act == "quick_gelu") != quick:
        diffs.append(
            f"activation {act} vs {'QuickGELU' if quick else 'GELU'}"
            + (f" (use {name}-quickgelu)" if act == "quick_gelu" else "")
        )
    if diffs:
        raise VisionSourceError(f"CLIP weights do not fit open_clip {name!r}: {', '.join(diffs)}")
