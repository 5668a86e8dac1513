"""The promotion gate: score parent and candidate the same way, promote only if nothing got worse.

Two kinds of figures: exact-match rates on the gate's corrections (:func:`score_records`), and the
lineage's base evaluation, an :class:`BaseEvaluator` given to the job (see
:mod:`backend.finetune.sources`), which says which of its figures the gate compares.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from model.data.dataset import load_record_image, record_turns
from model.geometry import boxes_tensor
from model.inference.engine import InferenceEngine
from model.tasks import ATTRIBUTE_QUESTIONS, CAPTION_QUESTIONS, RELATION_QUESTIONS

__all__ = ["BaseEvaluator", "RecordEvaluator", "evaluate", "gate", "score_records"]


class BaseEvaluator(Protocol):
    """Scores a model on the skills its lineage had before the corrections (the ``base`` figures)."""

    @property
    def metrics(self) -> Sequence[str]:
        """The figures the gate compares (higher is better)."""
        ...

    @property
    def identity(self) -> dict[str, Any]:
        """What is scored; a parent's stored figures with the same identity are reused."""
        ...

    def __call__(self, engine: InferenceEngine) -> dict[str, Any]:
        """The figures, keyed by name (may hold more than :attr:`metrics`)."""
        ...


def _template_regex(templates: Sequence[str]) -> re.Pattern[str]:
    parts = [
        re.escape(t).replace(r"\{a\}", r"<region\d+>").replace(r"\{b\}", r"<region\d+>") for t in templates
    ]
    return re.compile("^(?:" + "|".join(parts) + ")$")


KINDS = {
    "caption": _template_regex(CAPTION_QUESTIONS),
    "attribute": _template_regex([q for qs in ATTRIBUTE_QUESTIONS.values() for q in qs]),
    "relation": _template_regex(RELATION_QUESTIONS),
}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def score_records(engine: InferenceEngine, records: Sequence[dict], batch: int = 8) -> dict[str, Any]:
    """Exact-match rate of the engine's answers to every question of ``records`` (in-memory images),
    overall (``accuracy``) and per question kind (``caption_accuracy``...)."""
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        boxes = [boxes_tensor(r["boxes"], r["width"], r["height"]) for r in chunk]
        turns = [(i, q, a) for i, r in enumerate(chunk) for q, a in record_turns(r)]
        answers = engine.answer([r["image"] for r in chunk], boxes, [(i, q) for i, q, _ in turns])
        for (_, q, a), ans in zip(turns, answers):
            kind = next((k for k, rx in KINDS.items() if rx.match(q)), "other")
            total[kind] = total.get(kind, 0) + 1
            right[kind] = right.get(kind, 0) + int(_norm(ans.text) == _norm(a))
    n = sum(total.values())
    return {
        "accuracy": sum(right.values()) / n if n else math.nan,
        **{f"{k}_accuracy": right[k] / total[k] for k in total},
        "questions": n,
    }


class RecordEvaluator:
    """Base evaluation on region-text records whose images are files (a real model's own data).

    ``records`` (the held-out records, image paths) is called when figures or identity are needed.
    """

    metrics = ("caption_accuracy", "attribute_accuracy", "relation_accuracy", "other_accuracy")

    def __init__(self, records: Callable[[], Sequence[dict]], source: str) -> None:
        self.records, self._source = records, source

    @property
    def identity(self) -> dict[str, Any]:
        ids = [str(r["id"]) for r in self.records()]
        return {"data": self._source, "records": len(ids), "ids_crc32": zlib.crc32("\n".join(ids).encode())}

    def __call__(self, engine: InferenceEngine) -> dict[str, Any]:
        loaded = []
        for rec in self.records():
            image = load_record_image(rec)
            # A record's width/height of 0 means "unknown": take the image's.
            size = {"width": rec["width"] or image.width, "height": rec["height"] or image.height}
            loaded.append({**rec, "image": image, **size})
        return score_records(engine, loaded)


def evaluate(
    engine: InferenceEngine, gate_records: Sequence[dict], evaluator: BaseEvaluator, base: dict | None = None
) -> dict[str, Any]:
    """``{"corrections": ..., "base": ...}`` for one model; ``base``: figures already known."""
    return {"corrections": score_records(engine, gate_records), "base": base or evaluator(engine)}


def gate(parent: dict, candidate: dict, tolerance: float, metrics: Sequence[str]) -> tuple[bool, list[str]]:
    """Promotion rule; returns ``(accepted, reasons for rejection)``.  NaN figures are not compared.

    Rejected when a base figure named in ``metrics`` drops by more than ``tolerance`` or the gate's
    corrections score is lower than the parent's.
    """
    reasons = []
    for key in metrics:
        p, c = parent["base"].get(key, math.nan), candidate["base"].get(key, math.nan)
        if not (math.isnan(p) or math.isnan(c)) and c < p - tolerance:
            reasons.append(f"base {key} {c:.4f} < parent {p:.4f} - {tolerance}")
    p, c = parent["corrections"]["accuracy"], candidate["corrections"]["accuracy"]
    if not (math.isnan(p) or math.isnan(c)) and c < p:
        reasons.append(f"held-out corrections {c:.4f} < parent {p:.4f}")
    return not reasons, reasons
