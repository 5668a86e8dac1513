"""Fit a model's answer-score calibration on the toy world and store it in its folder.

    python -m toyworld.calibrate --model model/default [--scenes 600] [--fit-images 40] [--world-share S]

1. Region-token statistics (:func:`model.calibration.fit_region_statistics`) from ``--scenes``
   scenes of the model's training distribution (seeds no evaluation uses): generator scenes and a
   ``--world-share`` of wider-world scenes (jittered boxes, empty ones; default: the share of the
   build's recipe), one mean per caption (``--one-mean``: a single mean, as the first calibrations).
2. An image probe (:func:`model.calibration.fit_image_probe`) telling the same scenes from
   pictures of unknown things (:func:`clutter_cases`; ``--no-image-probe``: none).
3. A logistic map from each caption's features (mean token probability, the region's Mahalanobis
   distance, the image's familiarity) to "the caption is right", fitted on the stress conditions
   plus as many clutter pictures as one condition has (no answer right) at ``--fit-seed`` (1): a
   split held out from the evaluation's seed 0 (``python -m toyworld.evaluate --suite stress``).
4. ``calibration.safetensors`` is written into the folder and its manifest renewed.

The calibration belongs to the weights it was fitted for: a model whose weights change (a
fine-tuned version) keeps its parent's until it is fitted again.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import ImageDraw, ImageFilter

from model.calibration import (
    ScoreCalibration,
    answer_features,
    fit_image_probe,
    fit_platt,
    fit_region_statistics,
)
from model.geometry import boxes_tensor
from model.inference.describe import describe_regions
from model.inference.engine import InferenceEngine
from model.tasks import NO_OBJECT
from toyworld.recipe import recipe_from_metadata
from toyworld.scenes import SceneSpec, make_scene
from toyworld.stress import StressCase, conditions, scene_case
from toyworld.world import WorldSpec, canvas, make_world_scene, world_index, world_turns

__all__ = ["clutter_cases", "fit_calibration", "main", "training_cases"]

STATISTICS_SEED = 5_551_000  # generator scenes for the region statistics, apart from every other seed
CLUTTER_SEED = 5_552_000  # the fit's pictures of unknown things, apart from every other seed


def _tokens(engine: InferenceEngine, cases: Sequence[StressCase]) -> list[torch.Tensor]:
    return engine.region_tokens(
        [c.image for c in cases], [boxes_tensor(c.boxes, c.image.width, c.image.height) for c in cases]
    )


def training_cases(
    count: int, world_share: float, seed: int = STATISTICS_SEED, world: WorldSpec | None = None
) -> list[StressCase]:
    """``count`` scenes like the training records' (a ``world_share`` of them, spread evenly, from
    the wider ``world`` with its jittered and empty boxes), each box with its caption."""
    if not 0.0 <= world_share <= 1.0:
        raise ValueError(f"world share must be in [0, 1], got {world_share}")
    rng = random.Random(seed)
    cases = []
    for k in range(count):
        if world_index(k, world_share):
            scene = make_world_scene(rng, world)
            regions, _ = world_turns(scene, rng, world, num_turns=0)
            if not regions:
                continue
            captions = [NO_OBJECT if r.obj is None else scene.objects[r.obj].caption for r in regions]
            cases.append(StressCase(scene.image, [r.box for r in regions], captions))
        else:
            scene = make_scene(rng, SceneSpec())
            cases.append(scene_case(scene.objects, scene.image))
    return cases


def clutter_cases(count: int, seed: int = CLUTTER_SEED) -> list[StressCase]:
    """``count`` pictures of things the world never draws, each with 2-6 object-sized boxes no
    caption is right for (truth None): a busy, blurred canvas of irregular polygons, strokes and
    blobs in any colour, at any aspect ratio.  Outlier exposure: the fit sees what an answer about
    something unknown looks like (far tokens, a far image), so pictures outside the world (a
    photo) are not scored like the world's own."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        w, h = rng.randint(160, 900), rng.randint(160, 900)
        image = canvas(rng, w, h, rng.choice(("plain", "gradient", "texture")))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(15, 120)):
            color = tuple(rng.randint(0, 255) for _ in range(3))
            r = min(w, h) * rng.uniform(0.02, 0.35)
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            kind = rng.random()
            if kind < 0.5:  # irregular polygon
                n = rng.randint(5, 11)
                pts = [
                    (cx + r * rng.uniform(0.3, 1) * math.cos(a), cy + r * rng.uniform(0.3, 1) * math.sin(a))
                    for a in sorted(rng.uniform(0, 2 * math.pi) for _ in range(n))
                ]
                draw.polygon(pts, fill=color)
            elif kind < 0.8:  # stroke
                pts = [(cx + rng.uniform(-r, r), cy + rng.uniform(-r, r)) for _ in range(rng.randint(2, 5))]
                draw.line(pts, fill=color, width=max(1, int(r * rng.uniform(0.05, 0.3))))
            else:  # oval blob
                draw.ellipse([cx - r, cy - r * rng.uniform(0.3, 0.7), cx + r, cy + r * 0.5], fill=color)
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2.5)))
        boxes = []
        for _ in range(rng.randint(2, 6)):
            bh = min(w, h) * rng.uniform(0.12, 0.45)
            bw = bh * rng.uniform(0.7, 1.3)
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            boxes.append((x0, y0, x0 + bw, y0 + bh))
        cases.append(StressCase(image, boxes, [None] * len(boxes)))
    return cases


def fit_calibration(
    engine: InferenceEngine,
    scenes: int = 600,
    fit_images: int = 40,
    fit_seed: int = 1,
    shrinkage: float = 0.02,
    world_share: float = 0.0,
    one_mean: bool = False,
    min_count: int = 5,
    image_probe: bool = True,
    world: WorldSpec | None = None,
) -> tuple[ScoreCalibration, dict]:
    """The calibration of ``engine``'s model (fitted on its raw scores) and fit figures.

    ``world_share``: of the statistics' scenes from the wider ``world`` (the model's training
    share and world: the recipe's);
    ``one_mean``: one mean for all region tokens instead of one per caption (captions with fewer
    than ``min_count`` regions get none); ``image_probe``: also fit a probe telling the training
    pictures from clutter (:func:`clutter_cases`) and let the score read an image's familiarity."""
    saved, engine.calibration = engine.calibration, None  # fit on raw scores
    try:
        cases = training_cases(scenes, world_share, world=world)
        chunks = [cases[start : start + 16] for start in range(0, len(cases), 16)]
        tokens = torch.cat([t for chunk in chunks for t in _tokens(engine, chunk)])
        labels = None if one_mean else [c for case in cases for c in case.captions]
        mean, precision = fit_region_statistics(tokens, shrinkage, labels, min_count)
        probe = None
        fit_groups = list(conditions(fit_images, fit_seed).values())
        if image_probe:
            familiar = torch.cat([engine.image_descriptors([c.image for c in chunk]) for chunk in chunks])
            clutter = [c.image for c in clutter_cases(scenes // 2)]
            unfamiliar = torch.cat(
                [
                    engine.image_descriptors(clutter[start : start + 16])
                    for start in range(0, len(clutter), 16)
                ]
            )
            probe = fit_image_probe(familiar, unfamiliar)
            fit_groups.append(clutter_cases(fit_images, CLUTTER_SEED + fit_seed))
        stats_only = ScoreCalibration(mean, precision, torch.zeros(0), torch.zeros(()), probe)
        features, right, seen = [], [], []
        for group in fit_groups:
            for start in range(0, len(group), 8):
                chunk = group[start : start + 8]
                images = [c.image for c in chunk]
                distances = [stats_only.distance(t) for t in _tokens(engine, chunk)]
                known = stats_only.familiarity(engine.image_descriptors(images)).tolist()
                seen.append(torch.tensor(known))
                boxes = [boxes_tensor(c.boxes, c.image.width, c.image.height) for c in chunk]
                reports = describe_regions(engine, images, boxes, attributes=(), relations=False)
                for case, report, dist, familiarity in zip(chunk, reports, distances, known):
                    for truth, region, d in zip(case.captions, report.regions, dist.tolist()):
                        assert region.caption is not None
                        f = answer_features(region.caption.score, d, familiarity if image_probe else None)
                        features.append(f)
                        right.append(region.caption.text.strip() == truth)
        weights, bias = fit_platt(torch.tensor(features), torch.tensor(right))
    finally:
        engine.calibration = saved
    figures = {
        "statistics_tokens": len(tokens),
        "statistics_means": len(mean),
        "image_probe": image_probe,
        "fit_answers": len(right),
        "fit_right": sum(right),
        "weights": [round(w, 4) for w in weights.tolist()],
        "bias": round(float(bias), 4),
    }
    if probe is not None:  # held out from the probe: the fit's conditions, then its clutter
        familiar = torch.cat(seen).exp() > 0.5
        split = len(familiar) - len(fit_groups[-1])
        figures["familiar_world"] = round(float(familiar[:split].float().mean()), 4)
        figures["familiar_clutter"] = round(float(familiar[split:].float().mean()), 4)
    return ScoreCalibration(mean, precision, weights, bias, probe), figures


def main(argv: Sequence[str] | None = None) -> int:
    from model.checkpoint import DEFAULT_DIR, load_model, read_metadata, write_manifest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR, help="checkpoint folder (written to)")
    ap.add_argument("--scenes", type=int, default=600, help="scenes for the region statistics")
    ap.add_argument("--fit-images", type=int, default=40, help="images per stress condition for the fit")
    ap.add_argument("--fit-seed", type=int, default=1)
    ap.add_argument("--shrinkage", type=float, default=0.02)
    ap.add_argument(
        "--world-share",
        type=float,
        default=None,
        help="of the statistics' scenes from the wider world (default: the build recipe's, else 0)",
    )
    ap.add_argument("--one-mean", action="store_true", help="one mean for all region tokens")
    ap.add_argument(
        "--no-image-probe",
        action="store_true",
        help="scores read region distances only, not the image's familiarity",
    )
    args = ap.parse_args(argv)
    meta = read_metadata(args.model)
    built = recipe_from_metadata(meta)  # what its training records drew
    if built is None and meta.get("recipe"):
        print(
            f"warning: {args.model}/version.json records a recipe this code cannot read; "
            "fitting on the grid world, which may not be the world this model was trained on",
            file=sys.stderr,
        )
    share = args.world_share if args.world_share is not None else (built[0].world_share if built else 0.0)
    world = built[0].world_spec() if built else WorldSpec()
    engine = InferenceEngine(load_model(args.model), version=meta.get("version", "?"))
    calibration, figures = fit_calibration(
        engine,
        args.scenes,
        args.fit_images,
        args.fit_seed,
        args.shrinkage,
        share,
        args.one_mean,
        image_probe=not args.no_image_probe,
        world=world,
    )
    path = calibration.save(args.model)
    write_manifest(args.model)
    print(f"{path} written: {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
