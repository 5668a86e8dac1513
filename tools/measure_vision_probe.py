"""How plainly does a vision tower show shapes, condition by condition, before any region training?

    python -m tools.measure_vision_probe --vision model/default/vision.safetensors <other.safetensors> \
        [--config model/default] [--images 200 80] [--colors pink]

The region encoder reads every box from its focal crop (``region`` of ``--config``) and
pools the tower's feature maps there; stage 2 keeps the tower frozen, so what those maps do not
show, no later phase can read.  Per tower and stress condition (:mod:`toyworld.stress`): a ridge
read-out of the object's shape from its crop's RoI features (each ``region_layers`` map pooled to
2 x 2, concatenated), fitted on the first ``--images`` count of scenes (seed 5) and scored on the
second (seed 6).  Best of three ridge strengths (:func:`tools.measure_concept_probe.ridge_accuracy`).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from torchvision.ops import roi_align

from model.checkpoint import DEFAULT_DIR
from model.config import RegionEncoderConfig, load_model_config
from model.focal import focal_crops
from model.geometry import boxes_tensor
from model.tasks import NO_OBJECT, parse_caption
from model.vision import ImageProcessor, VisionTower
from tools.measure_concept_probe import ridge_accuracy
from toyworld.scenes import COLORS, SHAPES, SceneSpec
from toyworld.stress import CONDITIONS, StressCase, conditions

__all__ = ["crop_features", "main"]

PROBED = tuple(c for c in CONDITIONS if c != "no-object")  # conditions whose boxes hold a shape


def crop_features(
    tower: VisionTower,
    processor: ImageProcessor,
    cases: list[StressCase],
    region: RegionEncoderConfig,
    batch: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoI features ``(N, L * C * 4)`` of every object box's focal crop in ``cases`` (cut by
    :func:`model.focal.focal_crops`, as the engine cuts them under ``region``) and its shape index
    ``(N,)``."""
    pixels, inside, shapes = [], [], []
    for case in cases:
        parsed = [parse_caption(c) if c not in (None, NO_OBJECT) else None for c in case.captions]
        shape_of = {k: SHAPES.index(p["shape"]) for k, p in enumerate(parsed) if p}
        boxes = boxes_tensor(case.boxes, case.image.width, case.image.height)
        crops = focal_crops(case.image, boxes, region, processor.batch, shape_of) if shape_of else None
        if crops is not None:
            pixels.append(crops.pixels)
            inside.extend(crops.boxes.unsqueeze(1))  # one (1, 4) box per crop, in its crop's frame
            shapes.extend(shape_of[k] for k in crops.rows)
    width = len(tower.cfg.region_layers) * tower.width * 4
    rows_out = [torch.zeros(0, width)]  # nothing to pool when no box holds an object
    every = torch.cat(pixels) if pixels else torch.zeros(0)
    for start in range(0, len(inside), batch):
        levels = tower(every[start : start + batch]).levels
        boxes = inside[start : start + batch]
        # Boxes are normalised, so a map of side g takes spatial_scale g.
        pooled = [roi_align(lvl, boxes, 2, float(lvl.shape[-1]), 2, True).flatten(1) for lvl in levels]
        rows_out.append(torch.cat(pooled, 1))
    return torch.cat(rows_out), torch.tensor(shapes, dtype=torch.long)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision", type=Path, nargs="+", required=True, help="vision.safetensors files")
    ap.add_argument("--config", type=Path, default=DEFAULT_DIR, help="model folder or config name")
    ap.add_argument("--images", type=int, nargs=2, default=[200, 80], help="scenes fitted / scored")
    ap.add_argument("--colors", nargs="+", default=None, help=f"object colours (of {list(COLORS)})")
    ap.add_argument("--conditions", nargs="+", default=list(PROBED), choices=PROBED)
    args = ap.parse_args(argv)
    cfg = load_model_config(args.config)
    spec = SceneSpec(colors=tuple(args.colors)) if args.colors else SceneSpec()
    fit = conditions(args.images[0], 5, spec, args.conditions)
    held = conditions(args.images[1], 6, spec, args.conditions)
    print(f"{'vision tower':40s} " + " ".join(f"{c:>14s}" for c in args.conditions))
    for path in args.vision:
        vision = replace(cfg.vision, checkpoint=str(path.resolve()))
        tower, processor = VisionTower(vision), ImageProcessor(vision)
        scores = []
        for name in args.conditions:
            xtr, ytr = crop_features(tower, processor, fit[name], cfg.region)
            xte, yte = crop_features(tower, processor, held[name], cfg.region)
            scores.append(ridge_accuracy(xtr, ytr, xte, yte))
        print(f"{str(path)[-40:]:40s} " + " ".join(f"{s:14.3f}" for s in scores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
