"""Region-text records -> model-ready training samples.

A record is the JSONL format of ``model.data.converters`` (image path, pixel boxes, conversation);
synthetic records carry an in-memory PIL image instead of a path.  Boxes go through
``model.geometry.boxes_tensor``, the single pixel -> normalised conversion.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from model.focal import FocalCrops, focal_crops
from model.geometry import boxes_tensor
from model.mllm import RegionMLLM
from model.prompt import EncodedPrompt

__all__ = [
    "RecordDataset",
    "Sample",
    "collate_samples",
    "load_jsonl_records",
    "load_record_image",
    "record_turns",
]


@dataclass
class Sample:
    """``pixels``: ``(3, S, S)``; ``boxes``: ``(N, 4)`` normalised; ``prompts``: one or more encoded
    prompts (ids/labels/region order) about this image."""

    pixels: torch.Tensor
    boxes: torch.Tensor
    prompts: list[EncodedPrompt]
    box_labels: list[dict[str, str]] | None = None  # per box attributes (synthetic records only)
    focal: FocalCrops | None = None  # crops around its small boxes (model.focal)


def record_turns(record: dict) -> list[tuple[str, str]]:
    """Conversation list -> [(question, answer), ...] (roles must alternate human/gpt)."""
    conv = record["conversations"]
    turns = []
    for i in range(0, len(conv) - 1, 2):
        if conv[i]["from"] != "human" or conv[i + 1]["from"] != "gpt":
            raise ValueError(f"record {record.get('id')}: turns must alternate human/gpt")
        turns.append((conv[i]["value"], conv[i + 1]["value"]))
    return turns


def load_jsonl_records(path: str | Path) -> list[dict]:
    """Region-text JSONL records with relative image paths made relative to the file's folder."""
    from model.data.converters import read_jsonl

    folder = Path(path).parent
    records = list(read_jsonl(path))
    for rec in records:
        image = str(rec["image"])
        if not image.startswith(("http://", "https://", "/")):
            rec["image"] = str(folder / image)
    return records


def load_record_image(record: dict, root: Path | None = None) -> Image.Image:
    image = record["image"]
    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    if root is not None and not path.is_absolute():
        path = root / path
    with Image.open(path) as im:
        return im.convert("RGB")


class RecordDataset(Dataset):
    """Map-style dataset over in-memory records.

    ``max_turns`` caps the turns taken from a record (a random subset, fixed per index).  With
    ``separate_turns`` every turn becomes its own single-question prompt on the shared image (as the
    inference engine asks them) instead of one multi-turn conversation: a later question can then
    never be answered by copying an earlier answer about the same region.  ``focal`` False pools
    every box from its image even when the model config asks for focal crops (crops at inference only).
    """

    def __init__(
        self,
        records: Sequence[dict],
        model: RegionMLLM,
        root: Path | None = None,
        max_turns: int | None = None,
        text_only: bool = False,
        separate_turns: bool = False,
        focal: bool = True,
    ) -> None:
        self.records = records  # any Sequence: synthetic sets render lazily
        self.model = model
        self.root = root
        self.max_turns = max_turns
        self.text_only = text_only  # LM pre-training: prompts only, the image is never decoded
        self.separate_turns = separate_turns
        self.focal = focal  # focal crops around small boxes (model.focal), as the model config asks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        turns = record_turns(rec)
        if self.max_turns is not None and len(turns) > self.max_turns:
            turns = random.Random(index).sample(turns, self.max_turns)
        groups = [[turn] for turn in turns] if self.separate_turns else [turns]
        encode = self.model.prompts.encode_conversation
        if self.text_only:
            prompts = [encode(group, num_boxes=len(rec["boxes"])) for group in groups]
            size = self.model.cfg.vision.image_size
            return Sample(torch.zeros(3, size, size), torch.zeros(len(rec["boxes"]), 4), prompts)
        image = load_record_image(rec, self.root)
        w, h = rec.get("width") or image.width, rec.get("height") or image.height
        boxes = boxes_tensor(rec["boxes"], w, h)
        prompts = [encode(group, num_boxes=len(boxes)) for group in groups]
        region, process = self.model.cfg.region, self.model.processor.batch
        focal = focal_crops(image, boxes, region, process) if self.focal else None
        return Sample(self.model.processor(image), boxes, prompts, rec.get("box_labels"), focal)


def collate_samples(model: RegionMLLM, samples: Sequence[Sample]) -> dict:
    """Samples -> keyword arguments of :meth:`RegionMLLM.forward` (every prompt is a row; rows of
    one sample share its image)."""
    prompts = [p for s in samples for p in s.prompts]
    batch = model.collate(prompts)
    batch["pixels"] = torch.stack([s.pixels for s in samples])
    batch["boxes"] = [s.boxes for s in samples]
    batch["region_orders"] = [p.region_order for p in prompts]
    batch["row_image"] = [i for i, s in enumerate(samples) for _ in s.prompts]
    if any(s.focal is not None for s in samples):
        batch["focal"] = [s.focal for s in samples]
    return batch
