"""The region tasks the embedded default model answers: questions, answer formats, parsing.

Training data, evaluation and the Label Studio backend all use these definitions, so a relation
word means the same thing everywhere.  Relations are computed from boxes alone, in normalised
coordinates (see ``model.geometry``).
"""

from __future__ import annotations

from collections.abc import Sequence

from model.geometry import box_center, pixels_to_normalized

__all__ = [
    "NO_OBJECT",
    "ATTRIBUTE_QUESTION",
    "ATTRIBUTE_QUESTIONS",
    "ATTRIBUTE_VALUES",
    "CAPTION_QUESTION",
    "CAPTION_QUESTIONS",
    "POSITION_COLUMNS",
    "POSITION_MARGIN",
    "POSITION_QUESTIONS",
    "POSITION_ROWS",
    "RELATION_LABELS",
    "RELATION_QUESTION",
    "RELATION_QUESTIONS",
    "SIZE_ORDER",
    "SIZE_THRESHOLDS",
    "attribute_of_value",
    "attribute_vocabulary",
    "caption_text",
    "normalize_relation_label",
    "parse_caption",
    "parse_relation",
    "position_text",
    "relation_key",
    "relation_labels",
    "relation_text",
    "size_class",
]

CAPTION_QUESTIONS = ("What is {a}?", "Describe {a} briefly.", "What can you see in {a}?")
ATTRIBUTE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What colour is {a}?", "What is the colour of {a}?"),
    "shape": ("What shape is {a}?", "What is the shape of {a}?"),
    "size": ("What size is {a}?", "How big is {a}?"),
}
RELATION_QUESTIONS = ("How is {a} related to {b}?", "Where is {a} relative to {b}?")
# Where a region lies in the image (thirds).  Not an attribute the backend fills in: it teaches the
# model to read box positions, which relations then compare (as the size answer does for sizes).
POSITION_QUESTIONS = ("Which part of the image is {a} in?", "In which part of the picture is {a}?")
POSITION_ROWS = ("top", "middle", "bottom")
POSITION_COLUMNS = ("left", "centre", "right")

# Canonical questions the backend and the evaluation ask.
CAPTION_QUESTION = CAPTION_QUESTIONS[0]
ATTRIBUTE_QUESTION = {name: qs[0] for name, qs in ATTRIBUTE_QUESTIONS.items()}
RELATION_QUESTION = RELATION_QUESTIONS[0]

RELATION_LABELS = ("left of", "right of", "above", "below", "larger than", "smaller than")
POSITION_MARGIN = 0.15  # normalised centre distance below which no left/right/above/below is said
# What a region that holds no object is (its caption, and what the stress suite expects there).
NO_OBJECT = "no object"
SIZE_THRESHOLDS = (0.20, 0.28)  # max(w, h) normalised: small < 0.20 <= medium < 0.28 <= large
SIZE_ORDER = ("small", "medium", "large")


def caption_text(size: str, color: str, shape: str) -> str:
    return f"a {size} {color} {shape}"


def size_class(box: Sequence[float], image_w: int, image_h: int) -> str:
    """Size word of a pixel box: relative to the shorter image side (= max normalised side)."""
    x0, y0, x1, y1 = pixels_to_normalized(box, image_w, image_h)
    side = max(x1 - x0, y1 - y0)
    if side < SIZE_THRESHOLDS[0]:
        return "small"
    return "medium" if side < SIZE_THRESHOLDS[1] else "large"


def position_text(box: Sequence[float], image_w: int, image_h: int) -> str:
    """``"top left"`` ... ``"bottom right"``: the third of the image holding the box centre."""
    cx, cy = box_center(pixels_to_normalized(box, image_w, image_h))
    row = POSITION_ROWS[min(2, max(0, int(cy * 3)))]
    col = POSITION_COLUMNS[min(2, max(0, int(cx * 3)))]
    return f"{row} {col}"


def relation_labels(a: Sequence[float], b: Sequence[float], image_w: int, image_h: int) -> list[str]:
    """Relation words that hold for pixel box ``a`` relative to pixel box ``b`` (fixed order)."""
    ax, ay = box_center(pixels_to_normalized(a, image_w, image_h))
    bx, by = box_center(pixels_to_normalized(b, image_w, image_h))
    labels = []
    if bx - ax > POSITION_MARGIN:
        labels.append("left of")
    elif ax - bx > POSITION_MARGIN:
        labels.append("right of")
    if by - ay > POSITION_MARGIN:
        labels.append("above")
    elif ay - by > POSITION_MARGIN:
        labels.append("below")
    sa = SIZE_ORDER.index(size_class(a, image_w, image_h))
    sb = SIZE_ORDER.index(size_class(b, image_w, image_h))
    if sa > sb:
        labels.append("larger than")
    elif sa < sb:
        labels.append("smaller than")
    return labels


def relation_text(a: Sequence[float], b: Sequence[float], image_w: int, image_h: int) -> str:
    labels = relation_labels(a, b, image_w, image_h)
    return ", ".join(labels) if labels else "near"


def parse_relation(answer: str) -> list[str]:
    """Model answer -> known relation labels, in canonical order (unknown words dropped)."""
    parts = {p.strip() for p in answer.split(",")}
    return [label for label in RELATION_LABELS if label in parts]


def parse_caption(answer: str) -> dict[str, str] | None:
    """``"a small red triangle"`` -> ``{"size": "small", "color": "red", "shape": "triangle"}``."""
    words = answer.strip().split()
    if len(words) != 4 or words[0] != "a":
        return None
    return {"size": words[1], "color": words[2], "shape": words[3]}


# Answer words of each attribute question the embedded default knows (held-out colours included:
# the toy world renders these and only these; a real model's vocabulary is open).
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "color": ("red", "green", "blue", "yellow", "purple", "orange", "pink"),
    "shape": ("circle", "square", "triangle", "diamond"),
    "size": SIZE_ORDER,
}


def attribute_vocabulary() -> dict[str, tuple[str, ...]]:
    """Answer words of each attribute question (a copy of :data:`ATTRIBUTE_VALUES`)."""
    return dict(ATTRIBUTE_VALUES)


def attribute_of_value(value: str) -> str | None:
    """Which attribute a word such as ``"red"`` or ``"triangle"`` is a value of (``None``: none)."""
    word = value.strip().lower()
    for name, words in attribute_vocabulary().items():
        if word in words:
            return name
    return None


def relation_key(label: str) -> str:
    """A relation label as compared everywhere: ``"Left_of"``/``"left-of"`` -> ``"left of"``."""
    return " ".join(label.strip().lower().replace("_", " ").replace("-", " ").split())


def normalize_relation_label(label: str) -> str | None:
    """``"left_of"``/``"Left-of"`` -> ``"left of"`` if it is a known relation label, else ``None``."""
    text = relation_key(label)
    return text if text in RELATION_LABELS else None
