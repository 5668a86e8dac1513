"""Questions about regions typed in the labeling UI -> the model's canonical question -> an answer.

The annotator draws boxes and types a question in the config's question TextArea
(:attr:`backend.label_config.LabelConfig.question`); with Auto-Annotation on, Label Studio sends
it in the interactive ``params.context.result`` as a ``textarea`` item (``value.text``: every
question submitted so far, the newest last).  Each question:

1. its box references - ``<region2>``, ``region 2``, ``box 2`` (the Nth box of the context, in
   drawing order) or a box's label (when exactly one box has it) - become ``<region1>``,
   ``<region2>``, ... in the order they appear in the question; a question without a reference
   but with a pronoun (``it``, ``they``) refers to the boxes of the turn before it;
2. is classified into a kind the model was trained on (caption, colour, shape, size, position,
   relation) by the templates of :mod:`model.tasks` and paraphrases of them;
3. is asked as that kind's canonical question about the referenced boxes only.

Anything else is answered :data:`CANNOT_ANSWER` (the reason goes to the log): the model would
otherwise answer a question it was never taught with a made-up shape.  A question beyond the
caption about a box the model calls empty is answered ``no object`` (the box named in the log).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from backend.label_config import LabelConfig
from backend.results import Region
from model.inference.describe import answer_with_presence
from model.inference.engine import InferenceEngine
from model.inference.image_input import ImageLike
from model.tasks import (
    ATTRIBUTE_QUESTION,
    ATTRIBUTE_QUESTIONS,
    CAPTION_QUESTION,
    CAPTION_QUESTIONS,
    POSITION_QUESTIONS,
    RELATION_QUESTION,
    RELATION_QUESTIONS,
)

__all__ = [
    "CANNOT_ANSWER",
    "KIND_REGIONS",
    "Turn",
    "answer_result",
    "canonical_question",
    "classify",
    "context_questions",
    "plan_turns",
    "resolve_references",
]

log = logging.getLogger(__name__)

CANNOT_ANSWER = "cannot answer this"
# Label Studio resends every earlier question with each new one: the newest MAX_QUESTIONS are
# answered (one engine call holds the engine), questions longer than MAX_QUESTION_CHARS are not.
MAX_QUESTIONS = 32
MAX_QUESTION_CHARS = 1000
KIND_REGIONS = {"caption": 1, "color": 1, "shape": 1, "size": 1, "position": 1, "relation": 2}

_R = r"<region\d+>"
_NUMBERED = re.compile(r"(?:\bthe\s+)?(?:<region(\d+)>|\b(?:region|box)\s*#?\s*(\d+)\b)", re.I)
_PRONOUN = re.compile(r"\b(?:it|its|they|them|their|this one|that one|this box|that box)\b", re.I)


def _templates(templates: Sequence[str]) -> list[str]:
    """``model.tasks`` templates as regex sources over normalised text (lowercase, no final ?/.)."""
    out = []
    for t in templates:
        text = _normalise(t.replace("{a}", "\0a").replace("{b}", "\0b"))
        out.append(re.escape(text).replace("\0a", _R).replace("\0b", _R))
    return out


def _normalise(text: str) -> str:
    text = " ".join(text.lower().replace("’", "'").split()).rstrip(" ?.!")
    return _FILLER.sub("", text)


_FILLER = re.compile(r"^(?:(?:and|so|ok|okay|now|then|also|please|hey)\b[ ,]*)+")


_COLOUR = r"colou?r"
_PARAPHRASES: dict[str, list[str]] = {
    "caption": [
        rf"(?:what|what's) (?:is )?(?:in |inside |shown in |the object in )?{_R}",
        rf"(?:what|which) (?:object|thing|shape) is (?:in |inside )?{_R}",
        rf"(?:please )?(?:describe|caption) {_R}(?: briefly| for me)?",
        rf"tell me about {_R}",
        rf"what (?:can|do) (?:you|i|we) see in {_R}",
        rf"what does {_R} (?:show|contain)",
    ],
    "color": [
        rf"(?:what|which) {_COLOUR} is {_R}",
        rf"what is the {_COLOUR} of {_R}",
        rf"(?:what|which) {_COLOUR} does {_R} have",
        rf"{_R}(?:'s| is) (?:what|which) {_COLOUR}",
    ],
    "shape": [
        rf"(?:what|which) (?:shape|kind of shape|form) is {_R}",
        rf"what is the shape of {_R}",
        rf"(?:what|which) shape does {_R} have",
    ],
    "size": [
        rf"(?:what|which) size is {_R}",
        rf"what is the size of {_R}",
        rf"how (?:big|large|small) is {_R}",
        rf"is {_R} small, medium or large",
    ],
    "position": [
        rf"where is {_R}(?: located)?(?: in the (?:image|picture|scene))?",
        rf"where in the (?:image|picture|scene) is {_R}",
        rf"(?:which|what) part of the (?:image|picture|scene) is {_R} in",
        rf"in (?:which|what) part of the (?:image|picture|scene) is {_R}",
    ],
    "relation": [
        rf"how is {_R} related to {_R}",
        rf"how does {_R} relate to {_R}",
        rf"where is {_R} (?:relative|compared|with respect|in relation) to {_R}",
        rf"what is the (?:spatial )?relation(?:ship)? (?:between|of) {_R} (?:and|to) {_R}",
    ],
}
_SOURCES: dict[str, list[str]] = {
    "caption": _templates(CAPTION_QUESTIONS),
    **{attr: _templates(qs) for attr, qs in ATTRIBUTE_QUESTIONS.items()},
    "position": _templates(POSITION_QUESTIONS),
    "relation": _templates(RELATION_QUESTIONS),
}
KINDS = {
    kind: re.compile("^(?:" + "|".join(_SOURCES[kind] + _PARAPHRASES[kind]) + ")$")
    for kind in ("relation", "color", "shape", "size", "position", "caption")
}


@dataclass
class Turn:
    """One typed question: its text, the boxes it refers to (indices into the context's regions, in
    order of reference), its kind and the canonical question asked, or ``reason`` it is not asked."""

    question: str
    refs: list[int]
    kind: str | None = None
    asked: str | None = None
    reason: str | None = None
    dropped: bool = False  # older than the newest MAX_QUESTIONS (logged once, not per question)


def resolve_references(question: str, regions: Sequence[Region]) -> tuple[str, list[int]]:
    """``question`` with its box references rewritten ``<region1>``, ``<region2>``, ... (in order of
    first mention) and the regions they name (indices into ``regions``, drawing order).

    ``<regionN>``, ``region N`` and ``box N`` name the Nth region; a label names the one region
    carrying it.  Raises ``ValueError`` naming a reference that names no box or several."""
    refs: list[int] = []

    def slot(index: int) -> str:
        if index not in refs:
            refs.append(index)
        return f"<region{refs.index(index) + 1}>"

    spans: list[tuple[int, int, int]] = []  # start, end, region index
    for m in _NUMBERED.finditer(question):
        number = int(m.group(1) or m.group(2))
        if not 1 <= number <= len(regions):
            raise ValueError(f"{m.group(0).strip()!r} names no box: the context has {len(regions)}")
        spans.append((m.start(), m.end(), number - 1))
    owners: dict[str, list[int]] = {}
    for k, region in enumerate(regions):
        for label in region.all_labels:
            if label.strip():
                owners.setdefault(label.strip().lower(), []).append(k)
    for label in sorted(owners, key=len, reverse=True):  # longest first: "red car" before "car"
        pattern = re.compile(rf"(?:\bthe\s+)?(?<!\w){re.escape(label)}(?!\w)", re.I)
        for m in pattern.finditer(question):
            if any(s < m.end() and m.start() < e for s, e, _ in spans):
                continue
            if len(owners[label]) > 1:
                raise ValueError(f"label {label!r} is on {len(owners[label])} boxes: say box 1, box 2, ...")
            spans.append((m.start(), m.end(), owners[label][0]))
    out, last = [], 0
    for start, end, index in sorted(spans):
        out += [question[last:start], slot(index)]
        last = end
    out.append(question[last:])
    return "".join(out), refs


def classify(question: str) -> str | None:
    """Kind of a question whose references are ``<regionN>`` (see :data:`KIND_REGIONS`), or None."""
    text = _normalise(question)
    return next((kind for kind, rx in KINDS.items() if rx.match(text)), None)


def canonical_question(kind: str, refs: Sequence[int] = (0, 1)) -> str:
    """The question the model was trained to answer for ``kind`` about the boxes ``refs`` (indices
    into the image's boxes: ``<region{refs[0] + 1}>``, and ``<region{refs[1] + 1}>`` for a relation)."""
    if kind == "caption":
        template = CAPTION_QUESTION
    elif kind == "position":
        template = POSITION_QUESTIONS[0]
    elif kind == "relation":
        template = RELATION_QUESTION
    else:
        template = ATTRIBUTE_QUESTION[kind]
    a, b = (list(refs) + [1])[:2]
    return template.format(a=f"<region{a + 1}>", b=f"<region{b + 1}>")


def context_questions(context: dict | None, config: LabelConfig) -> list[str]:
    """Questions typed in the config's question TextArea, oldest first (``[]``: none); more than
    :data:`MAX_QUESTIONS` are logged (:func:`plan_turns` asks only the newest)."""
    if not context or not config.question or not config.answer:
        return []
    found: list[str] = []
    for item in context.get("result") or []:
        if not isinstance(item, dict) or item.get("from_name") != config.question:
            continue
        text = (item.get("value") or {}).get("text") if isinstance(item.get("value"), dict) else None
        if isinstance(text, str):
            text = [text]
        if isinstance(text, list):
            found += [t.strip() for t in text if isinstance(t, str) and t.strip()]
    if len(found) > MAX_QUESTIONS:
        log.warning(
            "region questions dropped",
            extra={
                "reason": f"{len(found)} questions in the TextArea: the newest {MAX_QUESTIONS} are answered",
                "code": "too_many_questions",
            },
        )
    return found


class _Renamer:
    """Replaces successive pronouns with ``<region1>``, ``<region2>``, ... (then leaves them)."""

    def __init__(self, count: int) -> None:
        self.names = iter(f"<region{k + 1}>" for k in range(count))

    def __call__(self, m: re.Match[str]) -> str:
        return next(self.names, m.group(0))


def plan_turns(questions: Sequence[str], regions: Sequence[Region]) -> list[Turn]:
    """Each question's references, kind and canonical question (or the reason it is not asked)."""
    turns: list[Turn] = []
    oldest_asked = len(questions) - MAX_QUESTIONS
    for n, question in enumerate(questions):
        if n < oldest_asked:  # its line stays, so that answers still line up with the questions
            reason = f"only the newest {MAX_QUESTIONS} questions are answered"
            turns.append(Turn(question[:80], [], reason=reason, dropped=True))
            continue
        if len(question) > MAX_QUESTION_CHARS:
            turns.append(
                Turn(question[:80], [], reason=f"the question is longer than {MAX_QUESTION_CHARS} characters")
            )
            continue
        try:
            text, refs = resolve_references(question, regions)
        except ValueError as exc:
            turns.append(Turn(question, [], reason=str(exc)))
            continue
        if not refs and turns and turns[-1].refs and _PRONOUN.search(text):
            refs = list(turns[-1].refs)  # "what colour is it?" after a question about box 2
            text = _PRONOUN.sub(_Renamer(len(refs)), text)
        turn = Turn(question, refs, kind=classify(text))
        if not refs:
            turn.reason = "the question names no box (say <region1>, region 1, box 1 or a box's label)"
        elif turn.kind is None:
            turn.reason = f"not a question kind the model answers ({', '.join(KIND_REGIONS)})"
        elif len(refs) != KIND_REGIONS[turn.kind]:
            turn.reason = (
                f"a {turn.kind} question is about {KIND_REGIONS[turn.kind]} box(es), not {len(refs)}"
            )
        else:
            turn.asked = canonical_question(turn.kind, refs)
        turns.append(turn)
    return turns


def answer_result(
    engine: InferenceEngine,
    image: ImageLike,
    boxes: torch.Tensor,
    regions: Sequence[Region],
    questions: Sequence[str],
    config: LabelConfig,
    task_id: Any,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> dict | None:
    """The answer TextArea result for the typed ``questions`` (one line per question, in order).

    ``boxes``: ``(N, 4)`` normalised boxes of ``regions`` (same order); ``masks``: their brush
    masks (:func:`backend.results.region_masks`) or None.  All asked questions go in
    one engine call over the image's boxes (as :func:`model.inference.describe.describe_regions`
    asks them); the image's state comes from the engine's cache, so a turn costs no re-encoding."""
    if not questions or not config.answer:
        return None
    turns = plan_turns(questions, regions)
    asked = [t for t in turns if t.asked is not None]
    # Boxes asked about beyond their caption get the presence check describe_regions makes.
    answered = answer_with_presence(
        engine, image, boxes, [(t.asked, t.refs if t.kind != "caption" else ()) for t in asked], masks
    )
    by_turn = dict(zip(map(id, asked), answered))
    lines, scores = [], []
    for turn in turns:
        if turn.asked is None:
            if not turn.dropped:
                log.info(
                    "region question not answered",
                    extra={"task": task_id, "question": turn.question, "reason": turn.reason},
                )
            lines.append(CANNOT_ANSWER)
            continue
        ans, empty = by_turn[id(turn)]
        if empty:
            log.info(
                "region question about an empty box",
                extra={"task": task_id, "question": turn.question, "empty_boxes": [r + 1 for r in empty]},
            )
        lines.append(ans.text.strip())  # for an empty box: its check's "no object"
        scores.append(ans.score)
    item: dict[str, Any] = {
        "id": f"answer-{task_id}",
        "from_name": config.answer,
        "to_name": config.image_name,
        "type": "textarea",
        "value": {"text": lines},
    }
    if scores:
        item["score"] = round(sum(scores) / len(scores), 4)
    return item
