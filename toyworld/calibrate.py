"""Fit a model's answer-score calibration on the toy world and store it in its folder.

    python -m toyworld.calibrate --model model/default [--scenes 600] [--fit-images 40] [--world-share S]

1. Region-token statistics (:func:`model.calibration.fit_region_statistics`) from ``--scenes``
   scenes of the model's training distribution (seeds no evaluation uses): generator scenes and a
   ``--world-share`` of wider-world scenes (jittered boxes, empty ones; default: the share of the
   build's recipe), one mean per caption (``--one-mean``: a single mean, as the first calibrations).
2. A logistic map from each caption's features (mean token probability, the region's Mahalanobis
   distance) to "the caption is right", fitted on the stress conditions at ``--fit-seed`` (1): a
   split held out from the evaluation's seed 0 (``python -m toyworld.evaluate --suite stress``).
3. ``calibration.safetensors`` is written into the folder and its manifest renewed.

The calibration belongs to the weights it was fitted for: a model whose weights change (a
fine-tuned version) keeps its parent's until it is fitted again.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from model.calibration import (
    ScoreCalibration,
    answer_features,
    fit_platt,
    fit_region_statistics,
)
from model.geometry import boxes_tensor
from model.inference.describe import describe_regions
from model.inference.engine import InferenceEngine
from model.tasks import NO_OBJECT
from toyworld.scenes import SceneSpec, make_scene
from toyworld.stress import StressCase, conditions, scene_case
from toyworld.world import make_world_scene, world_index, world_turns

__all__ = ["fit_calibration", "main", "training_cases"]

STATISTICS_SEED = 5_551_000  # generator scenes for the region statistics, apart from every other seed


def _tokens(engine: InferenceEngine, cases: Sequence[StressCase]) -> list[torch.Tensor]:
    return engine.region_tokens(
        [c.image for c in cases], [boxes_tensor(c.boxes, c.image.width, c.image.height) for c in cases]
    )


def training_cases(count: int, world_share: float, seed: int = STATISTICS_SEED) -> list[StressCase]:
    """``count`` scenes like the training records' (a ``world_share`` of them, spread evenly, from
    the wider world with its jittered and empty boxes), each box with its caption."""
    if not 0.0 <= world_share <= 1.0:
        raise ValueError(f"world share must be in [0, 1], got {world_share}")
    rng = random.Random(seed)
    cases = []
    for k in range(count):
        if world_index(k, world_share):
            scene = make_world_scene(rng)
            regions, _ = world_turns(scene, rng, num_turns=0)
            if not regions:
                continue
            captions = [NO_OBJECT if r.obj is None else scene.objects[r.obj].caption for r in regions]
            cases.append(StressCase(scene.image, [r.box for r in regions], captions))
        else:
            scene = make_scene(rng, SceneSpec())
            cases.append(scene_case(scene.objects, scene.image))
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
) -> tuple[ScoreCalibration, dict]:
    """The calibration of ``engine``'s model (fitted on its raw scores) and fit figures.

    ``world_share``: of the statistics' scenes from the wider world (the model's training share);
    ``one_mean``: one mean for all region tokens instead of one per caption (captions with fewer
    than ``min_count`` regions get none)."""
    saved, engine.calibration = engine.calibration, None  # fit on raw scores
    try:
        cases = training_cases(scenes, world_share)
        tokens = torch.cat(
            [t for start in range(0, len(cases), 16) for t in _tokens(engine, cases[start : start + 16])]
        )
        labels = None if one_mean else [c for case in cases for c in case.captions]
        mean, precision = fit_region_statistics(tokens, shrinkage, labels, min_count)
        stats_only = ScoreCalibration(mean, precision, torch.zeros(0), torch.zeros(()))
        features, right = [], []
        for group in conditions(fit_images, fit_seed).values():
            for start in range(0, len(group), 8):
                chunk = group[start : start + 8]
                distances = [stats_only.distance(t) for t in _tokens(engine, chunk)]
                boxes = [boxes_tensor(c.boxes, c.image.width, c.image.height) for c in chunk]
                reports = describe_regions(
                    engine, [c.image for c in chunk], boxes, attributes=(), relations=False
                )
                for case, report, dist in zip(chunk, reports, distances):
                    for truth, region, d in zip(case.captions, report.regions, dist.tolist()):
                        assert region.caption is not None
                        features.append(answer_features(region.caption.score, d))
                        right.append(region.caption.text.strip() == truth)
        weights, bias = fit_platt(torch.tensor(features), torch.tensor(right))
    finally:
        engine.calibration = saved
    figures = {
        "statistics_tokens": len(tokens),
        "statistics_means": len(mean),
        "fit_answers": len(right),
        "fit_right": sum(right),
        "weights": [round(w, 4) for w in weights.tolist()],
        "bias": round(float(bias), 4),
    }
    return ScoreCalibration(mean, precision, weights, bias), figures


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
    args = ap.parse_args(argv)
    meta = read_metadata(args.model)
    share = (
        args.world_share if args.world_share is not None else meta.get("recipe", {}).get("world_share", 0.0)
    )
    engine = InferenceEngine(load_model(args.model), version=meta.get("version", "?"))
    calibration, figures = fit_calibration(
        engine, args.scenes, args.fit_images, args.fit_seed, args.shrinkage, share, args.one_mean
    )
    path = calibration.save(args.model)
    write_manifest(args.model)
    print(f"{path} written: {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
