"""Frozen open_clip vision tower and image preprocessing.

Images are *squashed* to the model's square input (GPT4RoI does the same); a centre crop would
cut boxes off.  The tower returns the patch tokens of ``image_token_layer`` (image tokens for the
LM) and the patch maps of ``region_layers`` (input of the region encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from torch import nn

from model.config import OPEN_CLIP_CONFIG_DIR, VisionConfig

_registered = False


def register_open_clip_configs() -> None:
    """Make the project's own open_clip architectures (``model/open_clip_configs``) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
        _registered = True


def build_clip(model_name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """Build a full open_clip CLIP model (vision + text), optionally from a local checkpoint file.

    This is the real loading path: ``open_clip.create_model(name, pretrained=<local file>)``.
    A missing file raises ``FileNotFoundError`` (open_clip would otherwise try a hub download).
    """
    register_open_clip_configs()
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"open_clip checkpoint not found: {checkpoint}")
    return open_clip.create_model(model_name, pretrained=str(checkpoint) if checkpoint else None)


def build_visual(model_name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """The open_clip vision tower of ``model_name`` with weights from ``checkpoint``.

    ``checkpoint`` may be a full open_clip CLIP checkpoint (loaded by open_clip itself, with its
    format conversions) or a vision-only file whose keys start with ``visual.`` (what our
    checkpoint folders store).  ``.safetensors`` files are read without unpickling; other files go
    through ``torch.load(weights_only=True)``.
    """
    if checkpoint is None:
        return build_clip(model_name).visual
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"open_clip checkpoint not found: {checkpoint}")
    state = open_clip.factory.load_state_dict(str(checkpoint), weights_only=True)
    if any(not k.startswith("visual.") for k in state):
        return build_clip(model_name, checkpoint).visual
    visual = build_clip(model_name).visual
    visual.load_state_dict({k[len("visual.") :]: v for k, v in state.items()}, strict=True)
    return visual


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
            ckpt = str(checkpoint_root / ckpt)
        # The text tower is only needed for contrastive pre-training; keep the vision tower alone.
        self.visual = build_visual(cfg.open_clip_model, ckpt)
        self.num_blocks = len(self.visual.transformer.resblocks)
        grid = self.visual.grid_size
        self.grid = int(grid[0]) if isinstance(grid, (tuple, list)) else int(grid)
        self.width = int(self.visual.transformer.width)
        if self.width != cfg.width:
            raise ValueError(f"vision width in config ({cfg.width}) != open_clip model width ({self.width})")
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


class ImageProcessor:
    """PIL image -> normalised ``(3, S, S)`` tensor by squash-resize (no crop)."""

    def __init__(self, cfg: VisionConfig) -> None:
        self.size = cfg.image_size
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rgb = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        arr = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (arr - self.mean) / self.std

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, 3, S, S)``."""
        return torch.stack([self(im) for im in images])
