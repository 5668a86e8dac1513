"""The region-level multimodal LLM (GPT4RoI architecture).

Vision tower (frozen open_clip ViT) -> image tokens through a linear ``projector`` and a
multi-level ``region_encoder`` giving one token per box -> Hugging Face causal LM.  Placeholder
tokens in the prompt (``<im_patch>``, ``<bbox>``) have their embeddings replaced, vectorised,
by those features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.calibration import ScoreCalibration
from model.config import ModelConfig, check_freeze
from model.focal import FocalCrops
from model.prompt import BBOX, IGNORE_INDEX, IM_PATCH, EncodedPrompt, PromptBuilder
from model.region_encoder import RegionEncoder
from model.vision import ImageProcessor, VisionFeatures, VisionTower

__all__ = ["PlaceholderError", "RegionMLLM", "merge_placeholders", "merge_regions"]


class PlaceholderError(ValueError):
    """The number of placeholder tokens does not match the number of features to put there."""


def merge_placeholders(
    embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, expected: Sequence[int], what: str
) -> torch.Tensor:
    """Replace the embeddings at ``mask`` by ``features`` in row-major order.

    ``embeds``: ``(R, L, D)``; ``mask``: ``(R, L)`` bool; ``features``: ``(sum(expected), D)``;
    ``expected[r]``: how many placeholders row r must hold.  Raises :class:`PlaceholderError`
    naming the first row whose count differs.
    """
    counts = mask.sum(dim=1).tolist()
    for row, (have, want) in enumerate(zip(counts, expected)):
        if have != want:
            raise PlaceholderError(
                f"prompt {row} has {have} {what} placeholder tokens but {want} {what} features"
            )
    if features.shape[0] != sum(counts):
        raise PlaceholderError(f"{sum(counts)} {what} placeholders but {features.shape[0]} {what} features")
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))


def merge_regions(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    region_feats: Sequence[torch.Tensor],
    row_image: Sequence[int],
    region_orders: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Put region tokens at the ``<bbox>`` placeholders: row r takes boxes ``region_orders[r]`` of
    its image ``row_image[r]``, in order.

    ``embeds``: ``(R, L, D)``; ``mask``: ``(R, L)`` bool, True at ``<bbox>``; ``region_feats[i]``:
    ``(N_i, D)``.  Raises :class:`PlaceholderError` naming the prompt and the missing region, or
    (from :func:`merge_placeholders`) the first prompt whose placeholder count differs.
    """
    for r, order in enumerate(region_orders):
        n = len(region_feats[row_image[r]])
        bad = [i for i in order if i >= n]
        if bad:
            raise PlaceholderError(f"prompt {r} refers to region {bad[0] + 1} but its image has {n} boxes")
    ordered = [region_feats[row_image[r]][list(order)] for r, order in enumerate(region_orders)]
    flat = torch.cat(ordered) if ordered else embeds.new_zeros(0, embeds.shape[-1])
    return merge_placeholders(embeds, mask, flat, [len(o) for o in region_orders], "region")


class RegionMLLM(nn.Module):
    """GPT4RoI-style model.  Build it with :func:`model.checkpoint.build_model` / ``load_model``."""

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        lm: PreTrainedModel,
        checkpoint_root: Path | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vision = VisionTower(cfg.vision, checkpoint_root)
        hidden = int(lm.get_input_embeddings().weight.shape[1])
        self.projector = nn.Linear(self.vision.width, hidden)
        self.region_encoder = RegionEncoder(self.vision.width, hidden, cfg.vision.image_size, cfg.region)
        self.lm = lm
        self.processor = ImageProcessor(cfg.vision)
        self.prompts = PromptBuilder(tokenizer, cfg.prompt, self.vision.grid**2)
        self.image_patch_id = int(tokenizer.convert_tokens_to_ids(IM_PATCH))
        self.bbox_id = int(tokenizer.convert_tokens_to_ids(BBOX))
        self.stage = 2
        # Its folder's answer-score calibration (model.calibration), set by load_model; None: raw.
        self.score_calibration: ScoreCalibration | None = None

    # ------------------------------------------------------------------ freeze policy
    def set_stage(self, stage: int, frozen: Sequence[str] = ()) -> None:
        """Stage 1: region encoder only.  Stage 2: region encoder + projector + LM (LoRA adapters
        only when the LM is a peft model), less the modules named in ``frozen`` (any of
        :data:`model.config.TRAINABLE_MODULES`).  The vision tower is never trained."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        held = check_freeze(frozen, stage)
        self.stage = stage
        self.requires_grad_(False)
        self.region_encoder.requires_grad_("region_encoder" not in held)
        if stage == 1:
            return
        self.projector.requires_grad_("projector" not in held)
        if "lm" in held:
            return
        if hasattr(self.lm, "peft_config"):
            for name, param in self.lm.named_parameters():
                param.requires_grad_("lora_" in name)
        else:
            self.lm.requires_grad_(True)

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ features
    @property
    def device(self) -> torch.device:
        return self.projector.weight.device

    def encode_images(self, pixels: torch.Tensor) -> VisionFeatures:
        """``(I, 3, S, S)`` -> frozen vision features (computed without gradients)."""
        return self.vision(pixels.to(self.device, self.vision.visual.conv1.weight.dtype))

    def region_features(
        self,
        vision: VisionFeatures,
        boxes: Sequence[torch.Tensor],
        focal: Sequence[FocalCrops | None] | None = None,
    ) -> list[torch.Tensor]:
        """Per image ``(N_i, 4)`` normalised boxes -> per image ``(N_i, D)`` region tokens (one
        RoIAlign call per level for all boxes of all images).  ``focal``: per image the crops of its
        small boxes (:func:`model.focal.focal_crops`), whose tokens are pooled from the crops."""
        boxes = [b.to(self.device, torch.float32).reshape(-1, 4) for b in boxes]
        crops = None
        if focal is not None and any(f is not None for f in focal):
            starts = [sum(len(b) for b in boxes[:i]) for i in range(len(boxes))]
            kept = [(start, f) for start, f in zip(starts, focal) if f is not None]
            rows = torch.tensor([start + r for start, f in kept for r in f.rows], device=self.device)
            levels = self.cast_levels(self.encode_images(torch.cat([f.pixels for _, f in kept])))
            crops = (
                levels,
                torch.cat([f.boxes for _, f in kept]).to(self.device),
                rows,
                torch.cat([f.frames for _, f in kept]).to(self.device),
            )
        feats = self.region_encoder(self.cast_levels(vision), boxes, crops)
        return list(feats.split([len(b) for b in boxes]))

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the trainable parts (bf16 on CUDA, float32 on CPU)."""
        return self.projector.weight.dtype

    def cast_levels(self, vision: VisionFeatures) -> list[torch.Tensor]:
        """Vision levels in the region encoder's dtype (the tower returns float32)."""
        return [lvl.to(self.device, self.dtype) for lvl in vision.levels]

    def embed_prompts(
        self,
        input_ids: torch.Tensor,
        vision: VisionFeatures,
        region_feats: Sequence[torch.Tensor],
        row_image: Sequence[int],
        region_orders: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Token embeddings with image and region placeholders filled in.

        ``input_ids``: ``(R, L)``; row r belongs to image ``row_image[r]`` of ``vision`` /
        ``region_feats`` and its ``<bbox>`` tokens take boxes ``region_orders[r]`` in order.
        Returns ``(R, L, D)``.
        """
        input_ids = input_ids.to(self.device)
        embeds = self.lm.get_input_embeddings()(input_ids)
        rows = torch.as_tensor(list(row_image), device=self.device)
        image_tokens = self.projector(vision.image_tokens.to(self.device, self.dtype))[rows]  # (R, P, D)
        p = image_tokens.shape[1]
        embeds = merge_placeholders(
            embeds, input_ids == self.image_patch_id, image_tokens.flatten(0, 1), [p] * len(rows), "image"
        )
        return merge_regions(embeds, input_ids == self.bbox_id, region_feats, row_image, region_orders)

    def embed_questions(
        self,
        input_ids: torch.Tensor,
        region_feats: Sequence[torch.Tensor],
        row_image: Sequence[int],
        region_orders: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Embeddings of prompt parts without image tokens (the engine's questions after a cached
        prefix): ``input_ids`` ``(R, L)`` -> ``(R, L, D)`` with ``<bbox>`` filled as in
        :meth:`embed_prompts`."""
        input_ids = input_ids.to(self.device)
        embeds = self.lm.get_input_embeddings()(input_ids)
        return merge_regions(embeds, input_ids == self.bbox_id, region_feats, row_image, region_orders)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        pixels: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        region_orders: Sequence[Sequence[int]],
        row_image: Sequence[int] | None = None,
        focal: Sequence[FocalCrops | None] | None = None,
    ):
        """``pixels`` ``(B, 3, S, S)``; ``input_ids``/``labels`` ``(R, L)``: R prompts, row r about
        image ``row_image[r]`` (default: one prompt per image); ``focal``: per image the crops of
        its small boxes (:meth:`region_features`).  Each image is encoded once however many
        prompts ask about it.  Returns the LM output; ``loss`` is the mean cross-entropy over
        answer tokens."""
        vision = self.encode_images(pixels)
        feats = self.region_features(vision, boxes, focal)
        rows = list(range(len(boxes))) if row_image is None else list(row_image)
        embeds = self.embed_prompts(input_ids, vision, feats, rows, region_orders)
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask.to(self.device),
            labels=None if labels is None else labels.to(self.device),
        )

    def collate(self, prompts: Sequence[EncodedPrompt]) -> dict[str, torch.Tensor]:
        """Right-pad encoded prompts into ``input_ids``, ``attention_mask``, ``labels`` ``(B, L)``."""
        length = max(len(p.input_ids) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        labels = torch.full((len(prompts), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            n = len(p.input_ids)
            ids[i, :n] = torch.tensor(p.input_ids)
            labels[i, :n] = torch.tensor(p.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
