"""The wider toy world: scenes a user could draw boxes on, not only the 3x3 grid.

:func:`make_world_scene` draws, deterministically per ``rng``: 1-8 objects placed anywhere (a share
of scenes keeps the original grid layout), partial overlaps (later objects drawn over earlier
ones), continuous sizes inside bands that leave each size word unambiguous (down to 1.5 % of the
shorter side, the small objects of a large photo), canvases of any aspect ratio from ``min_side``
to ``max_side`` pixels, plain backgrounds of any colour, gradients and textures, shades of each
object colour, and distractor marks (lines, dots) that are not objects.

:func:`world_turns` asks about the scene's regions with hand-drawn boxes (every edge jittered by up
to ``box_jitter`` of the box side) and, now and then, a box on empty background whose right answer
is :data:`model.tasks.NO_OBJECT`.  Positions and relations are only asked where the scene puts
them clearly on one side of a boundary (:data:`CLEARANCE`), so labels stay right off the grid.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from model.geometry import box_center, focal_crop, pixels_to_normalized
from model.tasks import (
    ATTRIBUTE_QUESTIONS,
    CAPTION_QUESTIONS,
    NO_OBJECT,
    POSITION_MARGIN,
    POSITION_QUESTIONS,
    RELATION_QUESTIONS,
    SIZE_THRESHOLDS,
    position_text,
    relation_text,
)
from toyworld.scenes import (
    COLORS,
    HELD_OUT_COLORS,
    SHAPES,
    Scene,
    SceneObject,
    SceneSpec,
    SyntheticRecords,
    answer_forms,
    balanced_pair,
    draw_shape,
    make_scene,
    relation_form,
    scene_record,
)

__all__ = [
    "BACKGROUNDS",
    "CLEARANCE",
    "SIZE_BANDS",
    "TEXTURES",
    "Region",
    "WorldSpec",
    "canvas",
    "draw_objects",
    "MixedRecords",
    "WorldRecords",
    "make_world_scene",
    "world_clip_pair",
    "world_focal_pair",
    "world_index",
    "world_record",
    "world_turns",
]

# Object side (its box's larger side / the canvas's shorter side) per size word: bands kept clear
# of model.tasks.SIZE_THRESHOLDS (0.20, 0.28) so the word is never a coin toss.
SIZE_BANDS: dict[str, tuple[float, float]] = {
    "small": (0.015, 0.18),
    "medium": (0.215, 0.265),
    "large": (0.295, 0.40),
}
assert SIZE_BANDS["small"][1] < SIZE_THRESHOLDS[0] < SIZE_BANDS["medium"][0]
assert SIZE_BANDS["medium"][1] < SIZE_THRESHOLDS[1] < SIZE_BANDS["large"][0]
BACKGROUNDS = ("grey", "plain", "white", "dark", "gradient", "texture")
TEXTURES = ("diagonal", "stripes", "checks", "blotches")  # a "texture" background's patterns
# Normalised distance a box centre keeps from a position boundary (a third of the image) or from the
# relation margin before the scene asks about it: a hand-drawn box moves centres by a few percent.
CLEARANCE = 0.04


@dataclass(frozen=True)
class WorldSpec:
    """What the wider world may draw (defaults: everything the issue lists, pink held out)."""

    colors: Sequence[str] = field(default_factory=lambda: [c for c in COLORS if c not in HELD_OUT_COLORS])
    shapes: Sequence[str] = SHAPES
    min_objects: int = 1
    max_objects: int = 8
    min_side: int = 96
    max_side: int = 1500
    max_aspect: float = 2.5
    grid_share: float = 0.25  # scenes laid out by the original generator (its world stays learnt)
    overlap_share: float = 0.3  # scenes whose objects may overlap
    max_overlap: float = 0.35  # of an object's box covered by one drawn later
    small_share: float = 0.15  # scenes of only small objects, 1.5-4 % of the side, on canvases >= 800 px
    same_size_share: float = 0.0  # scenes (grid or free) whose objects all take one size word
    background_weights: Sequence[float] = (0.3, 0.2, 0.1, 0.1, 0.15, 0.15)  # per BACKGROUNDS
    textures: Sequence[str] = TEXTURES[:1]  # the patterns of texture backgrounds (TEXTURES)
    max_distractors: int = 4
    shade: float = 0.12  # each object's RGB scaled by up to +-12 %
    box_jitter: float = 0.15  # per edge, of the box's side
    no_object_share: float = 0.15  # turns asking about a box on empty background

    def __post_init__(self) -> None:
        textures = self.textures
        if isinstance(textures, str) or not textures or set(textures) - set(TEXTURES):
            raise ValueError(f"world textures must be a non-empty list of {list(TEXTURES)}, got {textures!r}")


@dataclass(frozen=True)
class Region:
    """A box shown to the model and what it holds: ``obj`` index, or None for empty background."""

    box: tuple[float, float, float, float]
    obj: int | None


# ---------------------------------------------------------------------- drawing
def canvas(
    rng: random.Random, w: int, h: int, kind: str, textures: Sequence[str] = TEXTURES[:1]
) -> Image.Image:
    """A ``w`` x ``h`` background of one of :data:`BACKGROUNDS` (a "texture" one draws one of
    ``textures``, names from :data:`TEXTURES`)."""
    if kind == "grey":
        g = rng.randint(200, 240)
        return Image.new("RGB", (w, h), (g, g, g))
    if kind == "white":
        return Image.new("RGB", (w, h), (255, 255, 255))
    if kind == "dark":
        g = rng.randint(15, 60)
        return Image.new("RGB", (w, h), (g, g, g))
    if kind == "plain":
        return Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))  # type: ignore[arg-type]
    gen = np.random.default_rng(rng.getrandbits(32))
    a, b = gen.uniform(0, 255, 3), gen.uniform(0, 255, 3)
    t = np.linspace(0, 1, w)[None, :, None] if gen.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    img = a * (1 - t) + b * t + np.zeros((h, w, 3))
    if kind == "texture":
        img += (_pattern(gen, w, h, textures)[..., None] - 0.5) * gen.uniform(10, 40)
        img += gen.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _pattern(gen: np.random.Generator, w: int, h: int, textures: Sequence[str]) -> np.ndarray:
    """A ``(h, w)`` field in [0, 1] of one of ``textures``, features 6-24 px across."""
    # A single pattern draws no choice, so recipes from before the choice keep their records.
    kind = textures[int(gen.integers(len(textures)))] if len(textures) > 1 else textures[0]
    period = int(gen.integers(6, 24))
    x, y = np.arange(w)[None, :], np.arange(h)[:, None]
    if kind == "diagonal":
        return ((x + y) // period) % 2
    if kind == "stripes":
        return np.broadcast_to(((x if gen.random() < 0.5 else y) // period) % 2, (h, w))
    if kind == "checks":
        return (x // period + y // period) % 2
    if kind == "blotches":  # smooth noise: fainter than the others (values bunch around 0.5)
        coarse = gen.random((h // period + 2, w // period + 2)).astype(np.float32)
        return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))
    raise ValueError(f"unknown texture {kind!r}; known: {list(TEXTURES)}")


def draw_objects(
    image: Image.Image, objects: Sequence[SceneObject], shades: Sequence[float] | None = None
) -> Image.Image:
    """``objects`` drawn in order on a copy of ``image``, each colour scaled by its ``shades`` factor."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for k, obj in enumerate(objects):
        f = shades[k] if shades else 1.0
        color = tuple(int(min(255, max(0, c * f))) for c in COLORS[obj.color])
        draw_shape(draw, obj.shape, obj.box, color)  # type: ignore[arg-type]
    return out


def _distractors(image: Image.Image, rng: random.Random, count: int) -> None:
    """Thin lines and dots: marks on the canvas that are not objects (and are never asked about)."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(count):
        color = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.5:
            pts = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2)]
            draw.line(pts, fill=color, width=rng.randint(1, max(1, min(w, h) // 150)))  # type: ignore[arg-type]
        else:
            r = max(1.0, min(w, h) * rng.uniform(0.002, 0.006))
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- layout
def _covered(a: tuple, b: tuple) -> float:
    """Share of box ``a``'s area inside box ``b``."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / max(1e-9, (a[2] - a[0]) * (a[3] - a[1]))


def _free_objects(
    rng: random.Random, spec: WorldSpec, w: int, h: int, small_only: bool, one_size: str | None
) -> list[SceneObject]:
    short = min(w, h)
    overlap = spec.max_overlap if rng.random() < spec.overlap_share else 0.0
    gap = 0.0 if overlap else 0.02 * short
    objects: list[SceneObject] = []
    for _ in range(rng.randint(spec.min_objects, spec.max_objects)):
        size = "small" if small_only else (one_size or rng.choice(list(SIZE_BANDS)))
        lo, hi = (0.015, 0.04) if small_only else SIZE_BANDS[size]
        side = short * rng.uniform(lo, hi)
        for _ in range(100):
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            box = (x0, y0, x0 + side, y0 + side)
            grown = (x0 - gap, y0 - gap, x0 + side + gap, y0 + side + gap)
            if all(_covered(o.box, grown) <= overlap and _covered(grown, o.box) <= overlap for o in objects):
                objects.append(
                    SceneObject(rng.choice(list(spec.colors)), rng.choice(list(spec.shapes)), size, box)
                )
                break
    return objects


def _inside(obj: SceneObject, w: int, h: int) -> SceneObject:
    """``obj`` moved (not resized) to lie on the canvas: the grid's jitter can overhang it a little."""
    x0, y0, x1, y1 = obj.box
    dx = max(0.0, -x0) - max(0.0, x1 - w)
    dy = max(0.0, -y0) - max(0.0, y1 - h)
    return SceneObject(obj.color, obj.shape, obj.size, (x0 + dx, y0 + dy, x1 + dx, y1 + dy))


def make_world_scene(rng: random.Random, spec: WorldSpec | None = None) -> Scene:
    """One scene of the wider world (see the module docstring); deterministic per ``rng``."""
    spec = spec or WorldSpec()
    one_size = None  # drawn only when asked for, so recipes without it keep their scenes
    if spec.same_size_share and rng.random() < spec.same_size_share:
        one_size = rng.choice(list(SIZE_BANDS))
    if rng.random() < spec.grid_share:  # the original generator's scene, on another background
        grid_spec = SceneSpec(colors=spec.colors, shapes=spec.shapes)
        grid = make_scene(rng, replace(grid_spec, sizes=(one_size,)) if one_size else grid_spec)
        (w, h), objects = grid.image.size, [_inside(o, *grid.image.size) for o in grid.objects]
    else:
        small_only = rng.random() < spec.small_share
        lo = max(spec.min_side, 800) if small_only else spec.min_side
        # Log-uniform side: as many small canvases as large ones.
        w = int(round(np.exp(rng.uniform(np.log(lo), np.log(spec.max_side)))))
        aspect = np.exp(rng.uniform(-np.log(spec.max_aspect), np.log(spec.max_aspect)))
        h = int(min(spec.max_side, max(lo if small_only else spec.min_side, round(w / aspect))))
        objects = _free_objects(rng, spec, w, h, small_only, one_size)
    kind = rng.choices(BACKGROUNDS, weights=spec.background_weights)[0]
    image = canvas(rng, w, h, kind, spec.textures)
    _distractors(image, rng, rng.randint(0, spec.max_distractors))
    shades = [1.0 + rng.uniform(-spec.shade, spec.shade) for _ in objects]
    return Scene(draw_objects(image, objects, shades), objects)


# ---------------------------------------------------------------------- questions
def _jittered(
    box: tuple, rng: random.Random, jitter: float, w: int, h: int
) -> tuple[float, float, float, float]:
    dx, dy = jitter * (box[2] - box[0]), jitter * (box[3] - box[1])
    x0, y0 = box[0] + rng.uniform(-dx, dx), box[1] + rng.uniform(-dy, dy)
    x1, y1 = box[2] + rng.uniform(-dx, dx), box[3] + rng.uniform(-dy, dy)
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
    return (x0, y0, x1, y1)


def _empty_box(scene: Scene, rng: random.Random) -> tuple[float, float, float, float] | None:
    """An object-sized box on background only (touching no object), or None if none fits."""
    w, h = scene.width, scene.height
    side = min(w, h) * rng.uniform(0.1, 0.3)
    for _ in range(50):
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        box = (x0, y0, x0 + side, y0 + side)
        if all(_covered(box, o.box) == 0.0 for o in scene.objects):
            return box
    return None


def _clear_position(box: Sequence[float], w: int, h: int) -> bool:
    cx, cy = box_center(pixels_to_normalized(box, w, h))
    return all(abs(c - edge) > CLEARANCE for c in (cx, cy) for edge in (1 / 3, 2 / 3))


def _clear_relation(a: Sequence[float], b: Sequence[float], w: int, h: int) -> bool:
    (ax, ay), (bx, by) = (box_center(pixels_to_normalized(x, w, h)) for x in (a, b))
    return all(abs(abs(d) - POSITION_MARGIN) > CLEARANCE for d in (ax - bx, ay - by))


def world_turns(
    scene: Scene,
    rng: random.Random,
    spec: WorldSpec | None = None,
    num_turns: int = 3,
    balance_relations: bool = False,
) -> tuple[list[Region], list[tuple[str, str]]]:
    """The regions shown to the model (jittered object boxes, maybe one empty box, in random
    order) and ``num_turns`` (question, answer) pairs about them (``<regionK>`` = region K-1);
    with ``balance_relations`` a relation question's pair is drawn by
    :func:`toyworld.scenes.balanced_pair`."""
    spec = spec or WorldSpec()
    w, h = scene.width, scene.height
    regions = [Region(_jittered(o.box, rng, spec.box_jitter, w, h), k) for k, o in enumerate(scene.objects)]
    if rng.random() < spec.no_object_share or not regions:
        empty = _empty_box(scene, rng)  # type: ignore[arg-type]
        if empty is not None:
            regions.append(Region(empty, None))
    rng.shuffle(regions)
    objs = scene.objects
    turns: list[tuple[str, str]] = []
    forms = None  # the scene's clear pairs by answer form, grouped on the first balanced relation turn
    for _ in range(num_turns * 4):  # a few tries per turn: unclear positions/relations are skipped
        if len(turns) == num_turns or not regions:
            break
        kind = rng.random()
        i = rng.randrange(len(regions))
        ref = f"<region{i + 1}>"
        target = regions[i].obj
        if kind < 0.25 or target is None:  # an empty box is asked what it holds, nothing else
            caption = NO_OBJECT if target is None else objs[target].caption
            turns.append((rng.choice(CAPTION_QUESTIONS).format(a=ref), caption))
        elif kind < 0.45:
            if _clear_position(objs[target].box, w, h):
                question = rng.choice(POSITION_QUESTIONS).format(a=ref)
                turns.append((question, position_text(objs[target].box, w, h)))
        elif kind < 0.65:
            attr = rng.choice(list(ATTRIBUTE_QUESTIONS))
            turns.append((rng.choice(ATTRIBUTE_QUESTIONS[attr]).format(a=ref), getattr(objs[target], attr)))
        else:
            if balance_relations:
                forms = forms if forms is not None else _clear_forms(regions, objs, w, h)
                pair = balanced_pair(rng, forms)
            else:
                others = [k for k, r in enumerate(regions) if k != i and r.obj is not None]
                if not others:
                    continue
                pair = (i, rng.choice(others))
            if pair is None:
                continue
            box_a, box_b = (objs[regions[k].obj].box for k in pair)  # type: ignore[index]
            if balance_relations or _clear_relation(box_a, box_b, w, h):
                question = rng.choice(RELATION_QUESTIONS).format(
                    a=f"<region{pair[0] + 1}>", b=f"<region{pair[1] + 1}>"
                )
                turns.append((question, relation_text(box_a, box_b, w, h)))
    return regions, turns


def _clear_forms(
    regions: list[Region], objs: list[SceneObject], w: int, h: int
) -> dict[tuple[str, ...], list[tuple[int, int]]]:
    """The scene's ordered pairs of object regions whose relation is clear of every margin,
    grouped by answer form (:func:`toyworld.scenes.answer_forms`)."""
    held = {k: objs[r.obj].box for k, r in enumerate(regions) if r.obj is not None}
    pairs = [(a, b) for a in held for b in held if a != b and _clear_relation(held[a], held[b], w, h)]
    return answer_forms(pairs, lambda a, b: relation_form(held[a], held[b], w, h))


def world_record(scene: Scene, regions: list[Region], turns: list[tuple[str, str]], record_id: str) -> dict:
    """A wider-world scene as a region-text record (:func:`toyworld.scenes.scene_record` with the
    regions' boxes; an empty region's ``box_labels`` entry is ``{}``, so no attribute head learns
    from it; position heads still do, its box has a place)."""
    labels = [
        {} if r.obj is None else {k: getattr(scene.objects[r.obj], k) for k in ("color", "shape", "size")}
        for r in regions
    ]
    return {
        **scene_record(scene, turns, record_id),
        "boxes": [list(r.box) for r in regions],
        "box_labels": labels,
        "source": "synthetic-world",
    }


def world_index(index: int, share: float) -> bool:
    """Whether item ``index`` of a run is a wider-world one when a ``share`` of them are, spread
    evenly (exactly ``share`` of a long run)."""
    return int((index + 1) * share) > int(index * share)


class MixedRecords(SyntheticRecords):
    """The original generator's records with the wider world's interleaved: a ``share`` of the
    indices, spread evenly, draw a world scene (``world-…`` ids), the others a grid scene."""

    def __init__(
        self,
        seed: int,
        count: int,
        share: float,
        spec: SceneSpec | None = None,
        world: WorldSpec | None = None,
        num_turns: int = 3,
        balance_relations: bool = False,
    ) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"world share must be in [0, 1], got {share}")
        super().__init__(seed, count, spec, num_turns, balance_relations)
        self.share = share
        self.world = world or WorldSpec()

    def is_world(self, index: int) -> bool:
        """Whether record ``index`` is drawn from the wider world (exactly ``share`` of a long run)."""
        return world_index(index, self.share)

    def _record(self, rng: random.Random, index: int) -> dict:
        if not self.is_world(index):
            return super()._record(rng, index)
        scene = make_world_scene(rng, self.world)
        regions, turns = world_turns(scene, rng, self.world, self.num_turns, self.balance_relations)
        return world_record(scene, regions, turns, f"world-{self.seed}-{index}")


class WorldRecords(MixedRecords):
    """Lazy, indexable wider-world record set: record ``i`` is drawn on access (a share of 1)."""

    def __init__(self, seed: int, count: int, spec: WorldSpec | None = None, num_turns: int = 3) -> None:
        super().__init__(seed, count, 1.0, world=spec, num_turns=num_turns)


def _lone(spec: WorldSpec) -> WorldSpec:
    """``spec`` drawing one object anywhere (the scenes of CLIP's pairs)."""
    return replace(spec, min_objects=1, max_objects=1, grid_share=0.0, small_share=0.0)


def world_clip_pair(rng: random.Random, spec: WorldSpec | None = None) -> tuple[Image.Image, str]:
    """One (image, text) pair for the vision tower's contrastive training: a single object placed
    anywhere on a wider-world canvas (any background, shade, distractors) and where it is."""
    scene = make_world_scene(rng, _lone(spec or WorldSpec()))
    if not scene.objects:  # no room was found: an empty canvas is a pair of its own
        return scene.image, NO_OBJECT
    obj = scene.objects[0]
    return scene.image, f"{obj.caption} at the {position_text(obj.box, scene.width, scene.height)}"


def world_focal_pair(rng: random.Random, spec: WorldSpec, fill: float) -> tuple[Image.Image, str]:
    """One (image, text) pair as the region encoder sees a box: the focal crop (``fill``: the box's
    share of the crop side, the model's ``region.focal_fill``) around a hand-drawn box on one object
    of a wider-world canvas, named by colour and shape (a crop shows no size or place)."""
    spec = _lone(spec)
    scene = make_world_scene(rng, spec)
    assert scene.objects, "a lone object always fits its canvas"
    obj = scene.objects[0]
    box = _jittered(obj.box, rng, spec.box_jitter, scene.width, scene.height)
    crop, _ = focal_crop(box, scene.width, scene.height, fill)
    return scene.image.crop(crop), f"a {obj.color} {obj.shape}"
