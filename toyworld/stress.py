"""Stress suite: the embedded default's figures on scenes its generator never drew.

    python -m toyworld.evaluate --suite stress [--model DIR] [--images 60] [--seed 0] [--json] [--check]

Each condition changes one thing about the generator's held-out scenes (:func:`conditions`):

==================  =========================================================================
generator           the generator's own scenes (3x3 grid, grey canvas, three sizes, 2-4 objects)
off-grid            the same objects placed anywhere (no overlap), relations scored too
crowded             5-8 objects placed anywhere
jitter              boxes drawn loosely: every edge moved by up to +-10 % of the box side
white / dark        the generator's layouts on a white / a dark canvas
textured            on a coloured canvas with a gradient, a texture (toyworld.world.TEXTURES), noise
zoom4               the image (and its boxes) scaled x4
small-in-large      1,000-1,500 px canvases, objects of 1.5-3 % of the shorter side ("small")
no-object           a box on empty background: the right answer is :data:`NO_OBJECT`
photos              photos shipped with matplotlib (no truth: their mean score is reported)
==================  =========================================================================

Per condition: caption exact match (and relation accuracy where scored) through the same engine
the backend uses; over the mix of all conditions but photos: the AUROC of "low caption score =
wrong" and the expected calibration error of the caption score (10 equal-width bins).  Scenes come
from seeds no training run uses (:data:`toyworld.evaluate.EVAL_SEED_OFFSET`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from model.geometry import box_center, boxes_tensor, pixels_to_normalized
from model.inference.describe import describe_regions, relation_pairs
from model.inference.engine import InferenceEngine
from model.tasks import NO_OBJECT, POSITION_MARGIN, parse_caption, relation_labels
from toyworld.scenes import SIZE_FRACTIONS, SceneObject, SceneSpec, make_scene
from toyworld.world import TEXTURES, canvas, draw_objects

__all__ = [
    "CONDITIONS",
    "NO_OBJECT",
    "STRESS_TARGETS",
    "StressCase",
    "auroc",
    "conditions",
    "expected_calibration_error",
    "format_stress",
    "missed_stress_targets",
    "photo_cases",
    "run_stress",
    "scene_case",
    "score_cases",
    "wrong_words",
]

CONDITIONS = (
    "generator",
    "off-grid",
    "crowded",
    "jitter",
    "white",
    "dark",
    "textured",
    "zoom4",
    "small-in-large",
    "no-object",
)
STRESS_SEED_OFFSET = 8_311_000  # apart from toyworld.evaluate's and every training seed
# An off-grid pair is scored only if no centre distance lies this close to POSITION_MARGIN (a
# hand-drawn box could put it on either side).
RELATION_CLEARANCE = 0.04


@dataclass
class StressCase:
    """One image and its boxes (pixels xyxy) with the caption each should get (None: unknown)."""

    image: Image.Image
    boxes: list[tuple[float, float, float, float]]
    captions: list[str | None]
    relations: bool = False  # score relations between this image's boxes
    objects: list[SceneObject] = field(default_factory=list)  # the drawn objects (relation truth)


# ---------------------------------------------------------------------- layout
def _free_layout(
    rng: random.Random, w: int, h: int, count: int, spec: SceneSpec, sides: Callable[[], tuple[str, float]]
) -> list[SceneObject] | None:
    """``count`` non-overlapping objects anywhere on the canvas (a gap of 2 % of the shorter side),
    each of ``sides()`` (size word, side in pixels); None if they do not fit."""
    gap = 0.02 * min(w, h)
    objects: list[SceneObject] = []
    for _ in range(count):
        size, side = sides()
        for _ in range(200):
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(
                box[0] > o.box[2] + gap
                or o.box[0] > box[2] + gap
                or box[1] > o.box[3] + gap
                or o.box[1] > box[3] + gap
                for o in objects
            ):
                break
        else:
            return None
        objects.append(SceneObject(rng.choice(list(spec.colors)), rng.choice(list(spec.shapes)), size, box))
    return objects


def _class_side(rng: random.Random, spec: SceneSpec, short: int) -> Callable[[], tuple[str, float]]:
    def pick() -> tuple[str, float]:
        size = rng.choice(list(spec.sizes))
        return size, short * (SIZE_FRACTIONS[size] + rng.uniform(-0.01, 0.01))

    return pick


# ---------------------------------------------------------------------- conditions
def scene_case(objects: list[SceneObject], image: Image.Image, relations: bool = False) -> StressCase:
    """The case of ``objects`` drawn on ``image``: their boxes, each with its caption."""
    return StressCase(image, [o.box for o in objects], [o.caption for o in objects], relations, objects)


def _generator(rng: random.Random, spec: SceneSpec) -> StressCase:
    scene = make_scene(rng, spec)
    return scene_case(scene.objects, scene.image, relations=True)


def _free(rng: random.Random, spec: SceneSpec, counts: tuple[int, int], relations: bool) -> StressCase:
    while True:
        w = rng.randint(spec.min_side, spec.max_side)
        h = rng.randint(max(spec.min_side, int(w / 1.6)), min(spec.max_side, int(w * 1.6)))
        objects = _free_layout(rng, w, h, rng.randint(*counts), spec, _class_side(rng, spec, min(w, h)))
        if objects is not None:
            return scene_case(objects, draw_objects(canvas(rng, w, h, "grey"), objects), relations)


def _jitter(rng: random.Random, spec: SceneSpec) -> StressCase:
    case = _generator(rng, spec)
    w, h = case.image.size
    loose = []
    for x0, y0, x1, y1 in case.boxes:
        dx, dy = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
        box = (
            x0 + rng.uniform(-dx, dx),
            y0 + rng.uniform(-dy, dy),
            x1 + rng.uniform(-dx, dx),
            y1 + rng.uniform(-dy, dy),
        )
        loose.append((max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3])))
    return StressCase(case.image, loose, case.captions)


def _background(kind: str) -> Callable[[random.Random, SceneSpec], StressCase]:
    def make(rng: random.Random, spec: SceneSpec) -> StressCase:
        scene = make_scene(rng, spec)
        background = canvas(rng, scene.width, scene.height, kind, TEXTURES)
        return scene_case(scene.objects, draw_objects(background, scene.objects))

    return make


def _zoom4(rng: random.Random, spec: SceneSpec) -> StressCase:
    scene = make_scene(rng, spec)
    image = scene.image.resize((scene.width * 4, scene.height * 4), Image.Resampling.BICUBIC)
    boxes = [(x0 * 4, y0 * 4, x1 * 4, y1 * 4) for x0, y0, x1, y1 in (o.box for o in scene.objects)]
    return StressCase(image, boxes, [o.caption for o in scene.objects])


def _small_in_large(rng: random.Random, spec: SceneSpec) -> StressCase:
    while True:
        w = rng.randint(1000, 1500)
        h = rng.randint(int(w / 1.6), min(1500, int(w * 1.6)))
        short = min(w, h)
        objects = _free_layout(
            rng, w, h, rng.randint(3, 6), spec, lambda s=short: ("small", s * rng.uniform(0.015, 0.03))
        )
        if objects is not None:
            return scene_case(objects, draw_objects(canvas(rng, w, h, "grey"), objects))


def _no_object(rng: random.Random, spec: SceneSpec) -> StressCase:
    """A generator scene with one extra box on empty background (object-sized, touching none)."""
    while True:
        scene = make_scene(rng, spec)
        w, h = scene.width, scene.height
        side = min(w, h) * SIZE_FRACTIONS[rng.choice(list(spec.sizes))]
        for _ in range(100):
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(
                box[0] >= o.box[2] or o.box[0] >= box[2] or box[1] >= o.box[3] or o.box[1] >= box[3]
                for o in scene.objects
            ):
                return StressCase(scene.image, [box], [NO_OBJECT])


MAKERS: dict[str, Callable[[random.Random, SceneSpec], StressCase]] = {
    "generator": _generator,
    "off-grid": lambda rng, spec: _free(rng, spec, (spec.min_objects, spec.max_objects), True),
    "crowded": lambda rng, spec: _free(rng, spec, (5, 8), False),
    "jitter": _jitter,
    "white": _background("white"),
    "dark": _background("dark"),
    "textured": _background("texture"),
    "zoom4": _zoom4,
    "small-in-large": _small_in_large,
    "no-object": _no_object,
}
assert tuple(MAKERS) == CONDITIONS


def conditions(
    count: int, seed: int = 0, spec: SceneSpec | None = None, names: Sequence[str] = CONDITIONS
) -> dict[str, list[StressCase]]:
    """``count`` cases per condition of ``names``, in :data:`CONDITIONS` order, deterministic per
    ``seed`` (a condition's cases do not depend on the others', so a subset draws the same ones)."""
    if isinstance(names, str) or set(names) - set(CONDITIONS):
        raise ValueError(f"conditions must be a list of {list(CONDITIONS)}, got {names!r}")
    spec = spec or SceneSpec()
    out = {}
    for k, name in enumerate(CONDITIONS):
        if name not in names:
            continue
        rng = random.Random(STRESS_SEED_OFFSET + seed * 1_000_003 + k * 10_007)
        out[name] = [MAKERS[name](rng, spec) for _ in range(count)]
    return out


def photo_cases(boxes_per_photo: int = 20, seed: int = 0) -> list[StressCase]:
    """Photos shipped with matplotlib (its sample data), each with random object-sized boxes."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    rng = random.Random(STRESS_SEED_OFFSET - 1 + seed)
    cases = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        path = folder / name
        if not path.is_file():
            continue
        image = Image.open(path).convert("RGB")
        w, h = image.size
        boxes = []
        for _ in range(boxes_per_photo):
            side = min(w, h) * rng.uniform(0.15, 0.4)
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            boxes.append((x0, y0, x0 + side, y0 + side))
        cases.append(StressCase(image, boxes, [None] * len(boxes)))
    return cases


# ---------------------------------------------------------------------- metrics
def auroc(scores: Sequence[float], right: Sequence[bool]) -> float:
    """Probability that a wrong answer scores below a right one (ties count half): the AUROC of
    "low score = wrong"; NaN without both kinds."""
    wrong = [s for s, ok in zip(scores, right) if not ok]
    good = [s for s, ok in zip(scores, right) if ok]
    if not wrong or not good:
        return float("nan")
    pairs = sum((w < g) + 0.5 * (w == g) for w in wrong for g in good)
    return pairs / (len(wrong) * len(good))


def expected_calibration_error(scores: Sequence[float], right: Sequence[bool], bins: int = 10) -> float:
    """Mean |accuracy - mean score| over equal-width score bins, weighted by the bins' counts."""
    if not scores:
        return float("nan")
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [(s, ok) for s, ok in zip(scores, right) if lo <= s < hi or (b == bins - 1 and s == 1.0)]
        if members:
            acc = sum(ok for _, ok in members) / len(members)
            conf = sum(s for s, _ in members) / len(members)
            total += len(members) * abs(acc - conf)
    return total / len(scores)


def _unambiguous(a: SceneObject, b: SceneObject, w: int, h: int) -> bool:
    (ax, ay), (bx, by) = (box_center(pixels_to_normalized(o.box, w, h)) for o in (a, b))
    return all(abs(abs(d) - POSITION_MARGIN) > RELATION_CLEARANCE for d in (ax - bx, ay - by))


def wrong_words(truth: str, answer: str) -> list[str]:
    """What a wrong caption got wrong: the attribute words (``size``, ``color``, ``shape``) that
    differ from ``truth``'s, or ``no object`` / ``other`` when either is not a shape caption."""
    answer = answer.strip()
    if answer == NO_OBJECT or truth == NO_OBJECT:
        return [NO_OBJECT if answer == NO_OBJECT else "other"]
    want, said = parse_caption(truth), parse_caption(answer)
    if want is None or said is None:
        return ["other"]
    return [k for k in want if want[k] != said[k]] or ["other"]


def score_cases(engine: InferenceEngine, cases: Sequence[StressCase], batch: int = 8) -> dict:
    """Caption exact match, mean score and ``_pairs`` (score, right) of ``cases``' regions, plus
    the relation accuracy of the cases that score relations."""
    captions: list[tuple[float, bool]] = []
    wrong: Counter[str] = Counter()
    relations = [0, 0]
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        boxes = [boxes_tensor(c.boxes, c.image.width, c.image.height) for c in chunk]
        reports = describe_regions(
            engine, [c.image for c in chunk], boxes, attributes=(), relations=any(c.relations for c in chunk)
        )
        for case, report in zip(chunk, reports):
            for truth, region in zip(case.captions, report.regions):
                assert region.caption is not None
                captions.append((region.caption.score, region.caption.text.strip() == truth))
                if truth is not None and not captions[-1][1]:
                    wrong.update(wrong_words(truth, region.caption.text))
            if not case.relations:
                continue
            w, h = case.image.size
            said = {(r.source, r.target): r.labels for r in report.relations}
            for i, j in relation_pairs(len(case.objects)):
                a, b = case.objects[i], case.objects[j]
                if _unambiguous(a, b, w, h):  # a pair dropped as empty counts as wrong
                    relations[0] += said.get((i, j)) == relation_labels(a.box, b.box, w, h)
                    relations[1] += 1
    result: dict = {
        "regions": len(captions),
        "caption_exact_match": sum(ok for _, ok in captions) / max(1, len(captions)),
        "mean_score": sum(s for s, _ in captions) / max(1, len(captions)),
        "wrong_words": dict(wrong),
        "_pairs": captions,
    }
    if relations[1]:
        result["relation_accuracy"] = relations[0] / relations[1]
        result["relation_pairs"] = relations[1]
    return result


# Issue 17's targets: caption exact match per condition (generator >= 0.98), off-grid relations,
# and the scores (AUROC of "low score = wrong" over every condition, ECE, mean score on photos).
STRESS_TARGETS: dict[str, float] = {
    "caption_exact_match": 0.95,
    "generator": 0.98,
    "off-grid relations": 0.90,
    "auroc": 0.90,
    "ece": 0.05,
    "photos": 0.30,
}


def missed_stress_targets(result: dict[str, Any]) -> list[str]:
    """What a :func:`run_stress` result misses of :data:`STRESS_TARGETS` (each with its figure)."""
    t, missed = STRESS_TARGETS, []
    for name, f in result["conditions"].items():
        want = t["generator"] if name == "generator" else t["caption_exact_match"]
        if not f["caption_exact_match"] >= want:
            missed.append(f"{name} captions {f['caption_exact_match']:.3f} < {want}")
    rel = result["conditions"].get("off-grid", {}).get("relation_accuracy")
    if rel is not None and not rel >= t["off-grid relations"]:
        missed.append(f"off-grid relations {rel:.3f} < {t['off-grid relations']}")
    s = result["scores"]
    if not s["auroc_low_score_wrong"] >= t["auroc"]:
        missed.append(f"AUROC {s['auroc_low_score_wrong']:.3f} < {t['auroc']}")
    if not s["ece"] <= t["ece"]:
        missed.append(f"ECE {s['ece']:.3f} > {t['ece']}")
    if not result["photos"]["mean_score"] <= t["photos"]:
        missed.append(f"photos mean score {result['photos']['mean_score']:.3f} > {t['photos']}")
    return missed


def run_stress(engine: InferenceEngine, count: int = 60, seed: int = 0) -> dict:
    """Every condition's figures, the scores' AUROC / ECE over all of them, the photos' mean score."""
    table = {}
    mix: list[tuple[float, bool]] = []
    for name, cases in conditions(count, seed).items():
        figures = score_cases(engine, cases)
        mix += figures.pop("_pairs")
        table[name] = figures
    photos = score_cases(engine, photo_cases(seed=seed))
    photos.pop("_pairs")
    scores, right = [s for s, _ in mix], [ok for _, ok in mix]
    return {
        "conditions": table,
        "photos": {"regions": photos["regions"], "mean_score": photos["mean_score"]},
        "scores": {
            "auroc_low_score_wrong": auroc(scores, right),
            "ece": expected_calibration_error(scores, right),
            "mean_score_right": _mean([s for s, ok in mix if ok]),
            "mean_score_wrong": _mean([s for s, ok in mix if not ok]),
        },
        "images_per_condition": count,
        "seed": seed,
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def format_stress(result: dict) -> str:
    """The stress table as Markdown (what docs/benchmarks.md quotes)."""
    lines = [
        "| condition | regions | caption exact | wrong words | relation accuracy (pairs) | mean score |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, f in result["conditions"].items():
        rel = f"{f['relation_accuracy']:.3f} ({f['relation_pairs']})" if "relation_accuracy" in f else "-"
        words = ", ".join(f"{k} {n}" for k, n in Counter(f["wrong_words"]).most_common()) or "-"
        exact, score = f"{f['caption_exact_match']:.3f}", f"{f['mean_score']:.3f}"
        lines.append(f"| {name} | {f['regions']} | {exact} | {words} | {rel} | {score} |")
    p = result["photos"]
    lines.append(f"| photos | {p['regions']} | - | - | - | {p['mean_score']:.3f} |")
    s = result["scores"]
    lines.append("")
    lines.append(
        f"AUROC (low score = wrong) {s['auroc_low_score_wrong']:.3f}, ECE {s['ece']:.3f}, mean score right "
        f"{s['mean_score_right']:.3f} / wrong {s['mean_score_wrong']:.3f}"
    )
    return "\n".join(lines)
