"""The promotion gate: score parent and candidate the same way, promote only if nothing got worse.

Two kinds of figures: exact-match rates on the gate's corrections (:func:`score_records`), per
question kind (caption / attribute / relation / other) and per script of the reference answer
(Latin / CJK / Arabic / other), with a count of malformed answers (:func:`malformed_reason`); and
the lineage's base evaluation, an :class:`BaseEvaluator` given to the job (see
:mod:`backend.finetune.sources`), which says which of its figures the gate compares.
"""

from __future__ import annotations

import math
import re
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from model.data.dataset import load_record_image, record_turns
from model.geometry import boxes_tensor
from model.inference.engine import InferenceEngine
from model.tasks import ATTRIBUTE_QUESTIONS, CAPTION_QUESTIONS, RELATION_LABELS, RELATION_QUESTIONS

__all__ = [
    "KIND_NAMES",
    "SCRIPTS",
    "BaseEvaluator",
    "RecordEvaluator",
    "evaluate",
    "gate",
    "gate_decision",
    "malformed_reason",
    "question_kind",
    "score_answers",
    "score_records",
    "script_of",
]


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


KIND_NAMES = (*KINDS, "other")
SCRIPTS = ("latin", "cjk", "arabic", "other")
# Unicode character-name prefixes of each non-Latin script group (stdlib has no script property).
_SCRIPT_PREFIXES = {
    "cjk": ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO", "IDEOGRAPHIC", "HALFWIDTH KATAKANA"),
    "arabic": ("ARABIC",),
}
_RELATION_WORDS = re.compile(
    r"\b(?:" + "|".join(re.escape(w) for w in RELATION_LABELS) + r")\b", re.IGNORECASE
)
MAX_EXAMPLES = 5  # malformed answers quoted in the figures


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def question_kind(question: str) -> str:
    """``"caption"``, ``"attribute"``, ``"relation"`` or ``"other"`` (by the question templates)."""
    return next((k for k, rx in KINDS.items() if rx.match(question)), "other")


def script_of(text: str) -> str:
    """Script group of a reference answer: the most frequent non-Latin group among its letters
    (``"cjk"``, ``"arabic"``, ``"other"``), else ``"latin"`` if it has Latin letters, else ``"other"``."""
    counts = dict.fromkeys(SCRIPTS, 0)
    for ch in text:
        if not unicodedata.category(ch).startswith("L"):
            continue  # marks, digits, emoji and punctuation follow their base text
        name = unicodedata.name(ch, "")
        group = next((g for g, pre in _SCRIPT_PREFIXES.items() if name.startswith(pre)), None)
        counts[group or ("latin" if name.startswith("LATIN") else "other")] += 1
    foreign = max(("cjk", "arabic", "other"), key=lambda g: counts[g])
    if counts[foreign]:
        return foreign
    return "latin" if counts["latin"] else "other"


def malformed_reason(kind: str, answer: str, reference: str = "") -> str | None:
    """Why ``answer`` (to a question of ``kind``) is not a well-formed answer, or None.

    Malformed: U+FFFD (a broken character; kept only if the reference has it), a control
    character, or relation words (:data:`model.tasks.RELATION_LABELS`) in a caption or attribute
    answer that its reference does not have (answer types bleeding into each other).
    """
    if "\ufffd" in answer and "\ufffd" not in reference:
        return "U+FFFD replacement character"
    bad = next((ch for ch in answer if unicodedata.category(ch) in ("Cc", "Cs")), None)
    if bad is not None:
        return f"control character U+{ord(bad):04X}"
    if kind in ("caption", "attribute"):
        words = {w.lower() for w in _RELATION_WORDS.findall(answer)} - {
            w.lower() for w in _RELATION_WORDS.findall(reference)
        }
        if words:
            return f"relation words in a {kind} answer: {', '.join(sorted(words))}"
    return None


def score_answers(items: Sequence[tuple[str, str, str]]) -> dict[str, Any]:
    """Figures of ``(question, reference answer, model answer)`` triples.

    ``accuracy`` (exact match after case/space folding) and ``questions`` overall; per question
    kind ``{kind}_accuracy``, ``{kind}_questions``, ``{kind}_malformed``; per script of the
    reference ``script_{script}_accuracy``/``_questions``; ``malformed`` (count) and up to
    :data:`MAX_EXAMPLES` ``malformed_examples`` (question, answer, reason).  Only groups with
    questions appear.
    """
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    bad: dict[str, int] = {}
    s_right: dict[str, int] = {}
    s_total: dict[str, int] = {}
    examples: list[dict[str, str]] = []
    for question, reference, answer in items:
        kind, script = question_kind(question), script_of(reference)
        ok = int(_norm(answer) == _norm(reference))
        total[kind] = total.get(kind, 0) + 1
        right[kind] = right.get(kind, 0) + ok
        s_total[script] = s_total.get(script, 0) + 1
        s_right[script] = s_right.get(script, 0) + ok
        reason = malformed_reason(kind, answer, reference)
        bad[kind] = bad.get(kind, 0) + (reason is not None)
        if reason is not None and len(examples) < MAX_EXAMPLES:
            examples.append({"question": question, "answer": answer, "reason": reason})
    n = sum(total.values())
    return {
        "accuracy": sum(right.values()) / n if n else math.nan,
        **{f"{k}_accuracy": right[k] / total[k] for k in total},
        **{f"{k}_questions": total[k] for k in total},
        **{f"{k}_malformed": bad[k] for k in total},
        **{f"script_{s}_accuracy": s_right[s] / s_total[s] for s in s_total},
        **{f"script_{s}_questions": s_total[s] for s in s_total},
        "questions": n,
        "malformed": sum(bad.values()),
        "malformed_examples": examples,
    }


def score_records(engine: InferenceEngine, records: Sequence[dict], batch: int = 8) -> dict[str, Any]:
    """:func:`score_answers` of the engine's answers to every question of ``records`` (in-memory
    images)."""
    items: list[tuple[str, str, str]] = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        boxes = [boxes_tensor(r["boxes"], r["width"], r["height"]) for r in chunk]
        turns = [(i, q, a) for i, r in enumerate(chunk) for q, a in record_turns(r)]
        answers = engine.answer([r["image"] for r in chunk], boxes, [(i, q) for i, q, _ in turns])
        items += [(q, a, ans.text) for (_, q, a), ans in zip(turns, answers)]
    return score_answers(items)


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


def _pairs(parent: dict, candidate: dict, groups: Sequence[str], key: str) -> dict[str, dict[str, float]]:
    """``{group: {"parent", "candidate", "questions"}}`` of ``key.format(group)`` where either has it."""
    out = {}
    for g in groups:
        name = key.format(g)
        if name in parent or name in candidate:
            out[g] = {
                "parent": parent.get(name, math.nan),
                "candidate": candidate.get(name, math.nan),
                "questions": candidate.get(name.replace("_accuracy", "_questions"), 0),
            }
    return out


def gate_decision(parent: dict, candidate: dict, tolerance: float, metrics: Sequence[str]) -> dict[str, Any]:
    """Promotion rule with its figures: ``{"accepted", "reasons", "kinds", "scripts", "malformed"}``.

    ``parent``/``candidate``: :func:`evaluate` results.  NaN figures are not compared.  Rejected
    when the candidate gives any malformed answer on the gate's corrections (:func:`malformed_reason`),
    a base figure named in ``metrics`` drops by more than ``tolerance``, the corrections score is
    lower than the parent's, or one question kind's or one script's corrections score drops by more
    than ``tolerance``.  ``kinds``/``scripts``: parent vs candidate per kind/script.
    """
    reasons = []
    cand, par = candidate["corrections"], parent["corrections"]
    if cand.get("malformed", 0):
        quoted = "; ".join(f"{e['reason']}: {e['answer']!r}" for e in cand.get("malformed_examples", []))
        reasons.append(f"{cand['malformed']} malformed answers on held-out corrections ({quoted})")
    for key in metrics:
        p, c = parent["base"].get(key, math.nan), candidate["base"].get(key, math.nan)
        if not (math.isnan(p) or math.isnan(c)) and c < p - tolerance:
            reasons.append(f"base {key} {c:.4f} < parent {p:.4f} - {tolerance}")
    p, c = par["accuracy"], cand["accuracy"]
    if not (math.isnan(p) or math.isnan(c)) and c < p:
        reasons.append(f"held-out corrections {c:.4f} < parent {p:.4f}")
    kinds = _pairs(par, cand, KIND_NAMES, "{}_accuracy")
    scripts = _pairs(par, cand, SCRIPTS, "script_{}_accuracy")
    for label, table in (("", kinds), ("script ", scripts)):
        for g, f in table.items():
            if (
                not (math.isnan(f["parent"]) or math.isnan(f["candidate"]))
                and f["candidate"] < f["parent"] - tolerance
            ):
                reasons.append(
                    f"held-out {label}{g} {f['candidate']:.4f} < parent {f['parent']:.4f} - {tolerance}"
                )
    return {
        "accepted": not reasons,
        "reasons": reasons,
        "kinds": kinds,
        "scripts": scripts,
        "malformed": {"parent": par.get("malformed", 0), "candidate": cand.get("malformed", 0)},
    }


def gate(parent: dict, candidate: dict, tolerance: float, metrics: Sequence[str]) -> tuple[bool, list[str]]:
    """``(accepted, reasons for rejection)`` of :func:`gate_decision`."""
    decision = gate_decision(parent, candidate, tolerance, metrics)
    return decision["accepted"], decision["reasons"]
