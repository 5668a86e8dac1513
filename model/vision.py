"""Frozen open_clip vision tower and image preprocessing.

Images are *squashed* to the model's square input (GPT4RoI does the same); a centre crop would
cut boxes off.  Input size, mean/std and interpolation come from the tower's open_clip
``preprocess_cfg`` unless the config sets them.  The tower returns the patch tokens of
``image_token_layer`` (image tokens for the LM) and the patch maps of ``region_layers`` (input of
the region encoder).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.config import OPEN_CLIP_CONFIG_DIR, VisionConfig

__all__ = [
    "ImageProcessor",
    "VisionFeatures",
    "VisionTower",
    "build_clip",
    "build_visual",
    "register_open_clip_configs",
    "resolve_preprocessing",
]

_registered = False
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# open_clip's defaults for a tower without a preprocess_cfg (OpenAI CLIP's statistics).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def register_open_clip_configs() -> None:
    """Make the project's own open_clip architectures (``model/open_clip_configs``) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
        _registered = True


def _is_quick_gelu(visual: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return isinstance(visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def build_clip(model_name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """Build a full open_clip CLIP model (vision + text), optionally from a local checkpoint file
    or an open_clip pretrained tag (``openai``: downloaded into the Hugging Face cache by open_clip;
    offline, that cache must hold it).

    This is the real loading path: ``open_clip.create_model(name, pretrained=<file or tag>)``.
    A missing file raises ``FileNotFoundError`` (open_clip would otherwise try a hub download).
    """
    register_open_clip_configs()
    if checkpoint is not None and not Path(checkpoint).is_file():
        if str(checkpoint) not in open_clip.list_pretrained_tags_by_model(model_name):
            raise FileNotFoundError(f"open_clip checkpoint not found: {checkpoint}")
        pretrained = open_clip.get_pretrained_cfg(model_name, str(checkpoint))
        if pretrained.get("quick_gelu") and not model_name.endswith("quickgelu"):
            raise ValueError(
                f"open_clip tag {checkpoint!r} was trained with QuickGELU: use {model_name}-quickgelu"
            )
    return open_clip.create_model(model_name, pretrained=str(checkpoint) if checkpoint else None)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.text


def _tower_to_fill(model_name: str) -> nn.Module:
    """The bare vision tower of ``model_name``, for weights loaded into it right after: open_clip's
    "initialized randomly" warning about it (on the root logger) is dropped, as users read it as a
    broken model; a tower left random (:func:`build_visual` without a checkpoint) still warns."""
    quiet = _DropMessage(
        f"No pretrained weights loaded for model '{model_name}'. Model initialized randomly."
    )
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        return build_clip(model_name).visual
    finally:
        root.removeFilter(quiet)


def _visual_from_state(
    model_name: str, state: dict[str, torch.Tensor], visual: nn.Module | None = None
) -> nn.Module:
    """open_clip tower ``model_name`` loaded strictly from a ``visual.*`` state (a Hugging Face
    CLIPVisionModel has no output projection: the tower's is zeroed, it is never used here)."""
    from model.convert.clip import VisionSourceError

    visual = visual if visual is not None else _tower_to_fill(model_name)
    own = {k[len("visual.") :]: v for k, v in state.items()}
    if "proj" not in own and getattr(visual, "proj", None) is not None:
        own["proj"] = torch.zeros_like(visual.proj)
    try:
        visual.load_state_dict(own, strict=True)
    except RuntimeError as exc:
        raise VisionSourceError(f"vision weights do not fit open_clip {model_name!r}: {exc}") from None
    return visual


def build_visual(model_name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """The open_clip vision tower of ``model_name`` with weights from ``checkpoint``.

    ``checkpoint`` may be: a full open_clip CLIP checkpoint (loaded by open_clip itself, with its
    format conversions); a vision-only file whose keys start with ``visual.`` (what our checkpoint
    folders store); a Hugging Face CLIP weights file or folder (``CLIPVisionModel``/``CLIPModel``,
    converted by :mod:`model.convert.clip`; a folder's ``config.json`` must fit the tower, QuickGELU
    included) or the Hub repo id of one (fetched through the Hugging Face cache); or an open_clip
    pretrained tag.  ``.safetensors`` files are read without
    unpickling; other files go through ``torch.load(weights_only=True)``.
    """
    from model.convert.clip import (
        check_hf_matches_tower,
        hf_clip_to_open_clip,
        is_hf_clip_state,
        read_hf_clip_folder,
    )

    if checkpoint is None:
        return build_clip(model_name).visual
    path = Path(checkpoint)
    if path.is_dir():
        config, state = read_hf_clip_folder(path)
        visual = _tower_to_fill(model_name)
        check_hf_matches_tower(config, visual, model_name)  # sizes and activation, named
        return _visual_from_state(model_name, state, visual)
    if not path.is_file():
        if str(checkpoint) in open_clip.list_pretrained_tags_by_model(model_name) or path.is_absolute():
            return build_clip(model_name, checkpoint).visual  # a pretrained tag (or a clear error)
        from model.lm import resolve_pretrained  # a Hub repo id (openai/clip-vit-large-patch14)

        return build_visual(model_name, resolve_pretrained(str(checkpoint)))
    state = open_clip.factory.load_state_dict(str(checkpoint), weights_only=True)
    if is_hf_clip_state(state):
        return _visual_from_state(model_name, hf_clip_to_open_clip(state))
    if any(not k.startswith("visual.") for k in state):
        return build_clip(model_name, checkpoint).visual
    return _visual_from_state(model_name, state)


def _side(value: int | tuple[int, ...] | list[int]) -> int:
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def resolve_preprocessing(cfg: VisionConfig, visual: nn.Module, model_name: str) -> None:
    """Fill ``image_size``, ``mean``, ``std`` and ``interpolation`` left unset in ``cfg`` from the
    tower's open_clip ``preprocess_cfg``; refuse an ``image_size`` the tower was not built for."""
    pp = dict(getattr(visual, "preprocess_cfg", None) or {})
    side = _side(visual.image_size)
    if cfg.image_size is None:
        cfg.image_size = side
    elif int(cfg.image_size) != side:
        grid, patch = side // _side(visual.patch_size), _side(visual.patch_size)
        raise ValueError(
            f"vision.image_size {cfg.image_size} does not match the open_clip tower {model_name!r}: "
            f"it takes {side} px images ({grid}x{grid} patches of {patch} px; its positional "
            f"embedding has {grid * grid + 1} rows); set image_size to {side} or leave it out"
        )
    if cfg.mean is None:
        cfg.mean = [float(v) for v in pp.get("mean", OPENAI_MEAN)]
    if cfg.std is None:
        cfg.std = [float(v) for v in pp.get("std", OPENAI_STD)]
    if cfg.interpolation is None:
        cfg.interpolation = str(pp.get("interpolation", "bicubic"))


@dataclass
class VisionFeatures:
    """Output of :class:`VisionTower`.

    ``image_tokens``: ``(B, P, C)`` patch tokens of ``image_token_layer`` (P = grid²).
    ``levels``: list of ``(B, C, g, g)`` maps, one per ``region_layers`` entry, shallow first.
    """

    image_tokens: torch.Tensor
    levels: list[torch.Tensor]

    def select(self, index: torch.Tensor) -> VisionFeatures:
        """Rows ``index`` of the batch (used to share one encode between several prompts)."""
        return VisionFeatures(self.image_tokens[index], [lvl[index] for lvl in self.levels])


class VisionTower(nn.Module):
    """open_clip ``VisionTransformer`` wrapper; always frozen and in eval mode."""

    def __init__(self, cfg: VisionConfig, checkpoint_root: Path | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        ckpt = cfg.checkpoint
        if ckpt is not None and checkpoint_root is not None and not Path(ckpt).is_absolute():
            joined = checkpoint_root / ckpt
            if joined.exists() or not _REPO_ID.match(ckpt):  # else a Hub repo id
                ckpt = str(joined)
        # The text tower is only needed for contrastive pre-training; keep the vision tower alone.
        self.visual = build_visual(cfg.open_clip_model, ckpt)
        self.num_blocks = len(self.visual.transformer.resblocks)
        grid = self.visual.grid_size
        self.grid = int(grid[0]) if isinstance(grid, (tuple, list)) else int(grid)
        self.width = int(self.visual.transformer.width)
        if self.width != cfg.width:
            raise ValueError(f"vision width in config ({cfg.width}) != open_clip model width ({self.width})")
        resolve_preprocessing(cfg, self.visual, cfg.open_clip_model)
        self.quick_gelu = _is_quick_gelu(self.visual)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VisionTower:  # noqa: ARG002 - frozen: stay in eval mode
        return super().train(False)

    def _block_index(self, hidden_state_index: int) -> int:
        """HF ``hidden_states`` index (0 = embeddings) -> open_clip block index (0-based output)."""
        idx = hidden_state_index % (self.num_blocks + 1)
        if idx == 0:
            raise ValueError("hidden state 0 (the embedding output) is not a transformer block output")
        return idx - 1

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> VisionFeatures:
        """``pixels``: ``(B, 3, S, S)`` normalised -> :class:`VisionFeatures` (float32)."""
        region_blocks = [self._block_index(i) for i in self.cfg.region_layers]
        token_block = self._block_index(self.cfg.image_token_layer)
        wanted = sorted(set(region_blocks + [token_block]))
        out = self.visual.forward_intermediates(
            pixels, indices=wanted, stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )
        by_block = dict(zip(wanted, out["image_intermediates"]))
        tokens = by_block[token_block].flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C)
        return VisionFeatures(tokens.float(), [by_block[b].float() for b in region_blocks])


_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class ImageProcessor:
    """PIL image -> normalised ``(3, S, S)`` tensor, no crop (a crop would cut boxes off).

    ``squash``: resize straight to ``S x S``.  ``gpt4roi``: the official demo's two steps —
    Hugging Face ``CLIPImageProcessor`` without centre crop (short side to ``S``, bicubic, aspect
    kept, normalised), then ``F.interpolate(..., (S, S), bilinear)`` on the normalised tensor.
    Either way a normalised box keeps its meaning (the image is stretched, never cut).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        if cfg.image_size is None or cfg.mean is None or cfg.std is None:
            raise ValueError("vision preprocessing unresolved: build the VisionTower first")
        self.size = int(cfg.image_size)
        self.mode = cfg.preprocess
        interpolation = cfg.interpolation or "bicubic"
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"vision.interpolation must be one of {sorted(_INTERPOLATION)}")
        self.resample = _INTERPOLATION[interpolation]
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def _normalise(self, rgb: Image.Image) -> torch.Tensor:
        arr = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (arr - self.mean) / self.std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rgb = image.convert("RGB")
        if self.mode == "squash":
            return self._normalise(rgb.resize((self.size, self.size), self.resample))
        w, h = rgb.size
        short, long = (w, h) if w <= h else (h, w)
        other = int(self.size * long / short)  # CLIPImageProcessor's shortest-edge rule
        size = (self.size, other) if w <= h else (other, self.size)
        arr = self._normalise(rgb.resize(size, self.resample))
        return F.interpolate(arr[None], (self.size, self.size), mode="bilinear", align_corners=False)[0]

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, 3, S, S)``."""
        return torch.stack([self(im) for im in images])
