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
    "answer_with_presence",
    "describe_regions",
    "relation_pairs",
]

ATTRIBUTES = tuple(ATTRIBUTE_QUESTION)
MAX_RELATION_BOXES = 8  # relations are asked among an image's first boxes: pairs grow as N^2


@dataclass
class RegionReport:
    caption: Answer | None  # None: not asked for
    attributes: dict[str, Answer] = field(default_factory=dict)
    # The caption question's answer whenever it was asked, also as the presence check alone.
    presence: Answer | None = None
    # The box holds no object (its caption answer is NO_OBJECT): no attribute or relation is reported.
    empty: bool = False

    def answer_scores(self) -> list[float]:
        """The scores of the region's own answers (its presence check counts as one)."""
        first = self.presence or self.caption  # the same answer when both are set
        own = [first] if first is not None else []
        return [a.score for a in (*own, *self.attributes.values())]


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
        scores = [score for r in self.regions for score in r.answer_scores()]
        scores += [rel.answer.score for rel in self.relations]
        return sum(scores) / len(scores) if scores else 0.0


def answer_with_presence(
    engine: InferenceEngine,
    image: ImageLike,
    boxes: torch.Tensor,
    asked: Sequence[tuple[str, Sequence[int]]],
    masks: Sequence[torch.Tensor | None] | None = None,
) -> list[tuple[Answer, list[int]]]:
    """Answer each ``(question, refs)`` about one image, with the presence check (the caption
    question, as :func:`describe_regions` asks it) of every box in ``refs``, all in one engine call.

    ``boxes``: ``(N, 4)`` normalised xyxy; ``refs``: 0-based box indices the question is about (empty:
    no check); ``masks``: optional per-box ``(H, W)`` masks.  Returns ``(answer, empty refs)`` per
    question: when a box of ``refs`` holds no object, the answer is that box's check
    (:data:`model.tasks.NO_OBJECT`), since anything more the model said about it would be invented.
    Identical questions (a check that is also asked, a question asked twice) are decoded once."""
    checked = sorted({k for _, refs in asked for k in refs})
    checks = {k: CAPTION_QUESTION.format(a=f"<region{k + 1}>") for k in checked}
    texts = list(dict.fromkeys([q for q, _ in asked] + list(checks.values())))
    answers = engine.answer([image], [boxes], [(0, q) for q in texts], [masks]) if texts else []
    by_text = dict(zip(texts, answers))
    out = []
    for question, refs in asked:
        empty = [k for k in dict.fromkeys(refs) if by_text[checks[k]].text.strip() == NO_OBJECT]
        out.append((by_text[checks[empty[0]]], empty) if empty else (by_text[question], []))
    return out


def relation_pairs(
    n: int, focus: set[int] | None = None, max_boxes: int = MAX_RELATION_BOXES
) -> list[tuple[int, int]]:
    """The ordered box pairs :func:`describe_regions` asks relations for among ``n`` boxes: every
    pair of the first ``max_boxes`` with a box of ``focus`` in it (None: all boxes)."""
    limit = min(n, max_boxes)
    return [
        (a, c) for a in range(limit) for c in range(limit) if a != c and (focus is None or {a, c} & focus)
    ]


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
    said about one would be invented.  The caption is asked as that check of every box asked about
    or paired in a relation, also when ``caption`` is False (then it is kept as ``presence`` only).
    """
    unknown = [a for a in attributes if a not in ATTRIBUTE_QUESTION]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; known: {list(ATTRIBUTE_QUESTION)}")
    queries: list[tuple[int, str]] = []
    slots: list[tuple] = []
    for i, b in enumerate(boxes):
        n = len(b)
        focus = set(range(n) if only is None or only[i] is None else only[i])
        pairs = relation_pairs(n, focus, max_relation_boxes) if relations else []
        checked = sorted((focus if caption or attributes else set()) | {k for pair in pairs for k in pair})
        for k in checked:
            queries.append((i, CAPTION_QUESTION.format(a=f"<region{k + 1}>")))
            slots.append(("presence", i, k))
        for k in sorted(focus):
            for attr in attributes:
                queries.append((i, ATTRIBUTE_QUESTION[attr].format(a=f"<region{k + 1}>")))
                slots.append(("attr", i, k, attr))
        for a, c in pairs:
            queries.append((i, RELATION_QUESTION.format(a=f"<region{a + 1}>", b=f"<region{c + 1}>")))
            slots.append(("rel", i, a, c))
    answers = engine.answer(images, boxes, queries, masks) if queries else []
    reports = [ImageReport([RegionReport(None) for _ in b], []) for b in boxes]
    for slot, ans in zip(slots, answers):
        if slot[0] == "presence":
            region = reports[slot[1]].regions[slot[2]]
            region.presence, region.empty = ans, ans.text.strip() == NO_OBJECT
            focused = only is None or only[slot[1]] is None or slot[2] in only[slot[1]]
            region.caption = ans if caption and focused else None
        elif slot[0] == "attr":
            reports[slot[1]].regions[slot[2]].attributes[slot[3]] = ans
        else:
            reports[slot[1]].relations.append(RelationReport(slot[2], slot[3], parse_relation(ans.text), ans))
    for report in reports:
        for region in report.regions:
            if region.empty:
                region.attributes.clear()
        empty = {k for k, region in enumerate(report.regions) if region.empty}
        report.relations = [r for r in report.relations if not {r.source, r.target} & empty]
    return reports
