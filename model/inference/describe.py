"""High-level region description: captions, attributes and relations for the boxes of images.

Used by evaluation and by the Label Studio backend, so both ask the same questions
(``model.tasks``) through the same batched engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.inference.engine import Answer, InferenceEngine
from model.inference.image_input import ImageLike
from model.tasks import ATTRIBUTE_QUESTION, CAPTION_QUESTION, RELATION_QUESTION, parse_relation

__all__ = ["ATTRIBUTES", "ImageReport", "RegionReport", "RelationReport", "describe_regions"]

ATTRIBUTES = tuple(ATTRIBUTE_QUESTION)


@dataclass
class RegionReport:
    caption: Answer | None
    attributes: dict[str, Answer] = field(default_factory=dict)


@dataclass
class RelationReport:
    source: int  # box index (0-based)
    target: int
    labels: list[str]
    answer: Answer


@dataclass
class ImageReport:
    regions: list[RegionReport]
    relations: list[RelationReport]

    @property
    def score(self) -> float:
        """Mean confidence over every answer of the image (for uncertainty sampling)."""
        scores = [r.caption.score for r in self.regions if r.caption]
        scores += [a.score for r in self.regions for a in r.attributes.values()]
        scores += [rel.answer.score for rel in self.relations]
        return sum(scores) / len(scores) if scores else 0.0


def describe_regions(
    engine: InferenceEngine,
    images: Sequence[ImageLike],
    boxes: Sequence[torch.Tensor],
    caption: bool = True,
    attributes: Sequence[str] = ATTRIBUTES,
    relations: bool = True,
    max_relation_boxes: int = 8,
    only: Sequence[Sequence[int] | None] | None = None,
    masks: Sequence[Sequence[torch.Tensor | None] | None] | None = None,
) -> list[ImageReport]:
    """Ask every wanted question for every box, all in one batched engine call.

    ``boxes[i]``: ``(N_i, 4)`` normalised xyxy.  Relations are asked for every ordered pair of the
    first ``max_relation_boxes`` boxes.  ``only[i]`` restricts questions to those box indices of
    image i (e.g. the box just drawn), relations then pair those boxes with every other box.
    ``masks``: optional per-box ``(H, W)`` image masks (:meth:`InferenceEngine.answer`).
    """
    unknown = [a for a in attributes if a not in ATTRIBUTE_QUESTION]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; known: {list(ATTRIBUTE_QUESTION)}")
    queries: list[tuple[int, str]] = []
    slots: list[tuple] = []
    for i, b in enumerate(boxes):
        n = len(b)
        focus = range(n) if only is None or only[i] is None else list(only[i])
        for k in focus:
            ref = f"<region{k + 1}>"
            if caption:
                queries.append((i, CAPTION_QUESTION.format(a=ref)))
                slots.append(("caption", i, k))
            for attr in attributes:
                queries.append((i, ATTRIBUTE_QUESTION[attr].format(a=ref)))
                slots.append(("attr", i, k, attr))
        if relations:
            limit = min(n, max_relation_boxes)
            for a in range(limit):
                for c in range(limit):
                    if a == c or (a not in focus and c not in focus):
                        continue
                    queries.append((i, RELATION_QUESTION.format(a=f"<region{a + 1}>", b=f"<region{c + 1}>")))
                    slots.append(("rel", i, a, c))
    answers = engine.answer(images, boxes, queries, masks) if queries else []
    reports = [ImageReport([RegionReport(None) for _ in b], []) for b in boxes]
    for slot, ans in zip(slots, answers):
        if slot[0] == "caption":
            reports[slot[1]].regions[slot[2]].caption = ans
        elif slot[0] == "attr":
            reports[slot[1]].regions[slot[2]].attributes[slot[3]] = ans
        else:
            reports[slot[1]].relations.append(RelationReport(slot[2], slot[3], parse_relation(ans.text), ans))
    return reports
