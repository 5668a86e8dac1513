"""Does pooling a brush region's painted pixels (instead of its whole box) help the model?

    python -m tools.measure_brush_pooling [--model model/default] [--scenes 60] [--seed 9200]
        [--floor 0.6 ...]

Held-out toy scenes; for each scene its first medium or large object A is painted with a brush
(its visible pixels), so the brush's box is A's box.  Conditions: A alone, and A overlapped by an
intruder B of another colour centred on A's top-left corner and drawn over it, B's side
``--overlap`` times A's side (so part of B lies inside A's box).  Printed per condition: A's
caption exact match when the region token pools the whole box, and when it pools the painted
pixels with each ``--floor`` (weight of the box's bins outside the mask,
:attr:`model.config.RegionEncoderConfig.mask_floor`; 0 = the mask alone).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.checkpoint import DEFAULT_DIR, load_model, read_metadata
from model.geometry import boxes_tensor
from model.inference.engine import InferenceEngine
from model.tasks import CAPTION_QUESTION
from toyworld.scenes import (
    COLORS,
    HELD_OUT_COLORS,
    SceneObject,
    SceneSpec,
    draw_shape,
    make_scene,
    render_scene,
)

__all__ = ["main", "painted_mask"]


def painted_mask(obj: SceneObject, width: int, height: int) -> torch.Tensor:
    """The pixels ``obj`` paints on a ``width`` x ``height`` canvas, boolean ``(H, W)``."""
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw_shape(ImageDraw.Draw(canvas), obj.shape, obj.box, (255, 255, 255))
    return torch.from_numpy(np.asarray(canvas)[..., 0] > 0)


def _intruder(a: SceneObject, overlap: float, rng: random.Random) -> SceneObject:
    x0, y0, x1, _ = a.box
    half = (x1 - x0) * overlap / 2
    color = rng.choice([c for c in COLORS if c != a.color and c not in HELD_OUT_COLORS])
    shape = rng.choice(["square", "circle", "triangle"])
    return SceneObject(color, shape, "medium", (x0 - half, y0 - half, x0 + half, y0 + half))


def _caption(
    engine: InferenceEngine, image: Image.Image, box: Sequence[float], mask: torch.Tensor | None
) -> str:
    boxes = boxes_tensor([box], image.width, image.height)
    (ans,) = engine.answer([image], [boxes], [(0, CAPTION_QUESTION.format(a="<region1>"))], [[mask]])
    return ans.text.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_DIR))
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=9200)
    parser.add_argument("--overlap", type=float, nargs="+", default=[0.0, 0.6, 0.9, 1.2])
    parser.add_argument("--floor", type=float, nargs="+", default=[0.0, 0.6])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    engine = InferenceEngine(model, version=read_metadata(args.model).get("version", "?"))
    region_cfg = model.region_encoder.roi_align.cfg
    rng = random.Random(args.seed)
    spec = SceneSpec(min_side=192, max_side=224)
    scenes = []
    while len(scenes) < args.scenes:
        scene = make_scene(rng, spec)
        targets = [o for o in scene.objects if o.size != "small"]
        if targets:
            scenes.append((scene, targets[0]))
    rows = []
    for overlap in args.overlap:
        right = {"box": 0} | {f"mask floor {f}": 0 for f in args.floor}
        for scene, a in scenes:
            objects = list(scene.objects)
            mask = painted_mask(a, scene.width, scene.height)
            if overlap > 0:
                b = _intruder(a, overlap, rng)
                objects.append(b)
                mask &= ~painted_mask(b, scene.width, scene.height)
            grey = scene.image.getpixel((0, 0))[0]  # type: ignore[index]
            image = render_scene(scene.width, scene.height, grey, objects).image
            right["box"] += _caption(engine, image, a.box, None) == a.caption
            for floor in args.floor:
                region_cfg.mask_floor = floor  # the served value comes from the model's config
                right[f"mask floor {floor}"] += _caption(engine, image, a.box, mask) == a.caption
        rows.append({"overlap": overlap, **{k: round(v / len(scenes), 3) for k, v in right.items()}})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"regions": len(scenes), "seed": args.seed, "rows": rows}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
