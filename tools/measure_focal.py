"""Does a focal encode make small boxes in large images readable, and at what cost elsewhere?

    python -m tools.measure_focal [--model model/default] [--images 60] [--seed 1]
        [--below 0 0.04 0.06 0.08] [--fill 0.08 0.12 0.16]

For every setting (``region.focal_below`` x ``region.focal_fill``; below 0 = off) the stress
conditions (:mod:`toyworld.stress`, ``--seed``) are scored through the engine: caption exact match
per condition and the time taken.  Choose on one seed, report on another.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from model.checkpoint import DEFAULT_DIR, load_model
from model.inference.engine import InferenceEngine
from toyworld.stress import conditions, score_cases

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--images", type=int, default=60, help="images per condition")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--below", type=float, nargs="+", default=[0.0, 0.04, 0.06, 0.08])
    ap.add_argument("--fill", type=float, nargs="+", default=[0.08, 0.12, 0.16])
    ap.add_argument("--conditions", nargs="+", default=None, help="stress conditions (default: all)")
    args = ap.parse_args(argv)
    model = load_model(args.model)
    cases = conditions(args.images, args.seed)
    if args.conditions:
        cases = {k: v for k, v in cases.items() if k in args.conditions}
    settings = [(0.0, args.fill[0])] * (0.0 in args.below)
    settings += [(b, f) for b in args.below if b > 0 for f in args.fill]
    for below, fill in settings:
        model.cfg.region.focal_below, model.cfg.region.focal_fill = below, fill
        engine = InferenceEngine(model, f"focal-{below}-{fill}")
        started = time.monotonic()
        rates = {name: round(score_cases(engine, c)["caption_exact_match"], 3) for name, c in cases.items()}
        seconds = round(time.monotonic() - started)
        print(json.dumps({"focal_below": below, "focal_fill": fill, **rates, "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
