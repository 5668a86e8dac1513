"""Synthetic region data set: images of coloured shapes with captions, attributes and relations.

Scenes are deterministic functions of ``(seed, index)``.  Objects sit in distinct cells of a 3x3
grid with a little jitter, so every relation word computed from the boxes (``model.tasks``) has a
clear margin.  Images are not square (the squash-resize and geometry code must cope) and sizes are
relative to the shorter image side, which equals ``max(w, h)`` of the normalised box.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from model.tasks import (
    ATTRIBUTE_QUESTIONS,
    ATTRIBUTE_VALUES,
    CAPTION_QUESTIONS,
    POSITION_QUESTIONS,
    RELATION_LABELS,
    RELATION_QUESTIONS,
    caption_text,
    position_text,
    relation_labels,
    relation_text,
)

__all__ = [
    "COLORS",
    "HELD_OUT_COLORS",
    "SHAPES",
    "SIZE_FRACTIONS",
    "Scene",
    "SceneObject",
    "SceneSpec",
    "SyntheticRecords",
    "answer_forms",
    "balanced_pair",
    "corpus_texts",
    "draw_shape",
    "make_scene",
    "relation_form",
    "render_scene",
    "scene_record",
    "scene_rng",
    "scene_turns",
    "synthetic_records",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 220),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "pink": (250, 125, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZE_FRACTIONS = {"small": 0.16, "medium": 0.24, "large": 0.32}
HELD_OUT_COLORS: tuple[str, ...] = ("pink",)
# The renderer draws exactly the words the model library declares as its answer vocabulary.
assert tuple(COLORS) == ATTRIBUTE_VALUES["color"] and SHAPES == ATTRIBUTE_VALUES["shape"]
assert tuple(SIZE_FRACTIONS) == ATTRIBUTE_VALUES["size"]


@dataclass
class SceneObject:
    color: str
    shape: str
    size: str
    box: tuple[float, float, float, float]  # pixels xyxy

    @property
    def caption(self) -> str:
        return caption_text(self.size, self.color, self.shape)


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


@dataclass
class SceneSpec:
    """What a generator may draw.  ``colors`` defaults to all colours but the held-out ones."""

    colors: Sequence[str] = field(default_factory=lambda: [c for c in COLORS if c not in HELD_OUT_COLORS])
    shapes: Sequence[str] = SHAPES
    sizes: Sequence[str] = tuple(SIZE_FRACTIONS)
    min_objects: int = 2
    max_objects: int = 4
    min_side: int = 128
    max_side: int = 224


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], color: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=color)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(width: int, height: int, background: int, objects: list[SceneObject]) -> Scene:
    """Draw ``objects`` (boxes in pixels) on a plain grey canvas."""
    image = Image.new("RGB", (width, height), (background, background, background))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_shape(draw, obj.shape, obj.box, COLORS[obj.color])
    return Scene(image, objects)


def make_scene(rng: random.Random, spec: SceneSpec, forced: Sequence[tuple[str, str, str]] = ()) -> Scene:
    """One random scene.  ``forced`` (color, shape, size) triples are placed first."""
    w = rng.randint(spec.min_side, spec.max_side)
    h = rng.randint(max(spec.min_side, int(w / 1.6)), min(spec.max_side, int(w * 1.6)))
    grey = rng.randint(200, 240)
    n = max(len(forced), rng.randint(spec.min_objects, spec.max_objects))
    cells = rng.sample(range(9), n)
    short = min(w, h)
    objects = []
    for i, cell in enumerate(cells):
        if i < len(forced):
            color, shape, size = forced[i]
        else:
            color, shape, size = rng.choice(spec.colors), rng.choice(spec.shapes), rng.choice(spec.sizes)
        side = short * (SIZE_FRACTIONS[size] + rng.uniform(-0.01, 0.01))
        col, row = cell % 3, cell // 3
        cx = (col + 0.5) * w / 3 + rng.uniform(-0.03, 0.03) * w
        cy = (row + 0.5) * h / 3 + rng.uniform(-0.03, 0.03) * h
        objects.append(
            SceneObject(color, shape, size, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        )
    return render_scene(w, h, grey, objects)


def scene_rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


# Which axis each relation word answers: an answer's "form" is the set of axes it names.
_RELATION_AXIS: dict[str, str] = {
    "left of": "x",
    "right of": "x",
    "above": "y",
    "below": "y",
    "larger than": "size",
    "smaller than": "size",
}
assert set(_RELATION_AXIS) == set(RELATION_LABELS)


def relation_form(a: Sequence[float], b: Sequence[float], w: int, h: int) -> tuple[str, ...]:
    """The axes the relation answer of pixel box ``a`` to ``b`` names (``()``: "near")."""
    return tuple(sorted(_RELATION_AXIS[label] for label in relation_labels(a, b, w, h)))


def answer_forms(
    pairs: Sequence[tuple[int, int]], form: Callable[[int, int], tuple[str, ...]]
) -> dict[tuple[str, ...], list[tuple[int, int]]]:
    """``pairs`` grouped by their answer's form (one scene's, computed once for all its turns)."""
    groups: dict[tuple[str, ...], list[tuple[int, int]]] = defaultdict(list)
    for i, j in pairs:
        groups[form(i, j)].append((i, j))
    return dict(groups)


def balanced_pair(
    rng: random.Random, groups: dict[tuple[str, ...], list[tuple[int, int]]]
) -> tuple[int, int] | None:
    """A pair of :func:`answer_forms` ``groups``, drawn so each answer form is equally likely (then
    uniformly within the form): a lone "left of" is as common as one with a size word, where the
    scene has both, so the answer's length is read from the boxes rather than from a prior."""
    if not groups:
        return None
    return rng.choice(groups[rng.choice(sorted(groups))])


def scene_turns(
    scene: Scene, rng: random.Random, num_turns: int = 3, balance_relations: bool = False
) -> list[tuple[str, str]]:
    """Random questions about the scene's regions (``<regionK>`` = object K-1); with
    ``balance_relations`` a relation question's pair is drawn by :func:`balanced_pair`."""
    objs = scene.objects
    w, h = scene.width, scene.height
    turns = []
    forms = None  # the scene's pairs by answer form, grouped on the first balanced relation turn
    for _ in range(num_turns):
        kind = rng.random()
        i = rng.randrange(len(objs))
        # Mix: captions 25%, positions 20%, attributes 20%, relations 35% (reading box positions is
        # what a small model learns last, so it gets the larger share).
        if kind < 0.25:
            turns.append((rng.choice(CAPTION_QUESTIONS).format(a=f"<region{i + 1}>"), objs[i].caption))
        elif kind < 0.45:
            question = rng.choice(POSITION_QUESTIONS).format(a=f"<region{i + 1}>")
            turns.append((question, position_text(objs[i].box, w, h)))
        elif kind < 0.65:
            attr = rng.choice(list(ATTRIBUTE_QUESTIONS))
            question = rng.choice(ATTRIBUTE_QUESTIONS[attr]).format(a=f"<region{i + 1}>")
            turns.append((question, getattr(objs[i], attr)))
        else:
            if balance_relations:
                if forms is None:
                    pairs = [(a, b) for a in range(len(objs)) for b in range(len(objs)) if a != b]
                    forms = answer_forms(pairs, lambda a, b: relation_form(objs[a].box, objs[b].box, w, h))
                pair = balanced_pair(rng, forms)
                if pair is None:  # a lone object has no relation to ask about
                    continue
                i, j = pair
            else:
                j = rng.choice([k for k in range(len(objs)) if k != i])
            question = rng.choice(RELATION_QUESTIONS).format(a=f"<region{i + 1}>", b=f"<region{j + 1}>")
            turns.append((question, relation_text(objs[i].box, objs[j].box, w, h)))
    return turns


def scene_record(scene: Scene, turns: list[tuple[str, str]], record_id: str) -> dict:
    """A scene as a region-text record (the JSONL format, with an in-memory image)."""
    conv = []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {
        "id": record_id,
        "image": scene.image,
        "width": scene.width,
        "height": scene.height,
        "boxes": [list(o.box) for o in scene.objects],
        "conversations": conv,
        "box_labels": [{"color": o.color, "shape": o.shape, "size": o.size} for o in scene.objects],
        "source": "synthetic",
    }


def synthetic_records(
    seed: int, count: int, spec: SceneSpec | None = None, num_turns: int = 3
) -> Iterator[dict]:
    """``count`` deterministic training records."""
    spec = spec or SceneSpec()
    for i in range(count):
        rng = scene_rng(seed, i)
        scene = make_scene(rng, spec)
        yield scene_record(scene, scene_turns(scene, rng, num_turns), f"syn-{seed}-{i}")


def corpus_texts(spec: SceneSpec | None = None, count: int = 2000, seed: int = 1) -> Iterator[str]:
    """Text for tokenizer training: every question template and answer the data can produce."""
    spec = spec or SceneSpec(colors=list(COLORS))
    for rec in synthetic_records(seed, count, spec, num_turns=4):
        for turn in rec["conversations"]:
            yield turn["value"]
    for color in COLORS:
        for shape in SHAPES:
            for size in SIZE_FRACTIONS:
                yield caption_text(size, color, shape)


class SyntheticRecords(Sequence):
    """Lazy, indexable synthetic record set: record ``i`` is rendered on access (no image cache)."""

    def __init__(
        self,
        seed: int,
        count: int,
        spec: SceneSpec | None = None,
        num_turns: int = 3,
        balance_relations: bool = False,
    ) -> None:
        self.seed, self.count, self.num_turns = seed, count, num_turns
        self.spec = spec or SceneSpec()
        self.balance_relations = balance_relations  # relation pairs drawn by balanced_pair

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self._record(scene_rng(self.seed, index), index)

    def _record(self, rng: random.Random, index: int) -> dict:
        """Record ``index``, drawn from its own ``rng`` (subclasses draw other worlds)."""
        scene = make_scene(rng, self.spec)
        turns = scene_turns(scene, rng, self.num_turns, self.balance_relations)
        return scene_record(scene, turns, f"syn-{self.seed}-{index}")
