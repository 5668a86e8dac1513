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
from model.tasks import ATTRIBUTE_QUESTION, CAPTION_QUESTION, NO_OBJECT, RELATION_QUESTION, parse_relation

__all__ = [
    "ATTRIBUTES",
    "MAX_RELATION_BOXES",
    "ImageReport",
    "RegionReport",
    "RelationReport",
    "describe_regions",
]

ATTRIBUTES = tuple(ATTRIBUTE_QUESTION)
MAX_RELATION_BOXES = 8  # relations are asked among an image's first boxes: pairs grow as N^2


@dataclass
class RegionReport:
    caption: Answer | None
    attributes: dict[str, Answer] = field(default_factory=dict)
    # The box holds no object (its caption answer is NO_OBJECT): no attribute or relation is reported.
    empty: bool = False


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
    max_relation_boxes: int = MAX_RELATION_BOXES,
    only: Sequence[Sequence[int] | None] | None = None,
    masks: Sequence[Sequence[torch.Tensor | None] | None] | None = None,
) -> list[ImageReport]:
    """Ask every wanted question for every box, all in one batched engine call.

    ``boxes[i]``: ``(N_i, 4)`` normalised xyxy.  Relations are asked for every ordered pair of the
    first ``max_relation_boxes`` boxes.  ``only[i]`` restricts questions to those box indices of
    image i (e.g. the box just drawn), relations then pair those boxes with every other box.
    ``masks``: optional per-box ``(H, W)`` image masks (:meth:`InferenceEngine.answer`).

    A box whose caption answer is :data:`model.tasks.NO_OBJECT` is reported ``empty``, without
    attributes or relations: the model is only taught what an empty box holds, so anything else it
    said about one would be invented.  The caption is asked for that check even when ``caption`` is
    False (then it is not reported); boxes outside ``only`` (relation partners) are not checked.
    """
    unknown = [a for a in attributes if a not in ATTRIBUTE_QUESTION]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; known: {list(ATTRIBUTE_QUESTION)}")
    queries: list[tuple[int, str]] = []
    slots: list[tuple] = []
    for i, b in enumerate(boxes):
        n = len(b)
        focus = range(n) if only is None or only[i] is None else list(only[i])
        limit = min(n, max_relation_boxes) if relations else 0
        for k in focus:
            ref = f"<region{k + 1}>"
            if caption or attributes or limit > 1:  # the presence check of every region asked about
                queries.append((i, CAPTION_QUESTION.format(a=ref)))
                slots.append(("caption", i, k))
            for attr in attributes:
                queries.append((i, ATTRIBUTE_QUESTION[attr].format(a=ref)))
                slots.append(("attr", i, k, attr))
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
            region = reports[slot[1]].regions[slot[2]]
            region.empty = ans.text.strip() == NO_OBJECT
            region.caption = ans if caption else None
        elif slot[0] == "attr":
            reports[slot[1]].regions[slot[2]].attributes[slot[3]] = ans
        else:
            reports[slot[1]].relations.append(RelationReport(slot[2], slot[3], parse_relation(ans.text), ans))
    for report in reports:
        for region in report.regions:
            if region.empty:
                region.attributes.clear()
        report.relations = [
            r
            for r in report.relations
            if not (report.regions[r.source].empty or report.regions[r.target].empty)
        ]
    return reports
