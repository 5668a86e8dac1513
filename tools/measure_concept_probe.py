"""How much of a new colour's shapes can a model's region tokens tell apart at all?

    python -m tools.measure_concept_probe [--model model/default ...] [--train 48 96 200 400]

The non-ASCII demo (:mod:`tools.ls.demo_nonascii`) teaches one caption per shape of pink objects,
a colour the default never saw; its captions can only be right as often as the region tokens the
LM reads separate those shapes.  Per model: a ridge read-out of the shape from region tokens
``(D,)``, fitted on the pink regions of the demo's correction scenes (``--train`` sizes; the first
is the demo's own scenes) and scored on its held-out pink regions (the demo's evaluation scenes),
beside the same read-out for the other colours and one fitted on the other colours and scored on
pink (does a shape read-out learnt elsewhere transfer).  Best of three ridge strengths each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model.checkpoint import DEFAULT_DIR, load_model
from model.geometry import boxes_tensor
from model.inference.engine import InferenceEngine
from toyworld.scenes import SHAPES, Scene

__all__ = ["main", "ridge_accuracy"]

STRENGTHS = (0.01, 0.1, 1.0)


def tokens_by_shape(engine: InferenceEngine, scenes: list[Scene], concept: str, of_concept: bool):
    """Region tokens ``(N, D)`` and shape indices ``(N,)`` of the objects of (or not of) ``concept``."""
    xs, ys = [], []
    for scene in scenes:
        boxes = boxes_tensor([o.box for o in scene.objects], scene.width, scene.height)
        for obj, token in zip(scene.objects, engine.region_tokens([scene.image], [boxes])[0]):
            if (obj.color == concept) == of_concept:
                xs.append(token.float())
                ys.append(SHAPES.index(obj.shape))
    return torch.stack(xs), torch.tensor(ys)


def ridge_accuracy(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor) -> float:
    """Best held-out accuracy over :data:`STRENGTHS` of a one-vs-all ridge on standardised tokens."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    targets = torch.nn.functional.one_hot(ytr, len(SHAPES)).float()
    best = 0.0
    for lam in STRENGTHS:
        w = torch.linalg.solve(a.T @ a + lam * len(a) * torch.eye(a.shape[1]), a.T @ targets)
        best = max(best, float(((b @ w).argmax(1) == yte).float().mean()))
    return best


def main(argv: list[str] | None = None) -> int:
    from tools.ls.demo_nonascii import CONCEPT, CORRECTION_SEED, EVAL_SEED, scenes_with_concept

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, nargs="+", default=[DEFAULT_DIR])
    ap.add_argument("--train", type=int, nargs="+", default=[48, 96, 200, 400], help="pink regions fitted")
    ap.add_argument("--eval-regions", type=int, default=80)
    args = ap.parse_args(argv)
    held_out = scenes_with_concept(args.eval_regions, EVAL_SEED)
    print(f"{'model':40s} {'fitted on':>24s} {'pink shapes, held out':>22s}")
    for folder in args.model:
        engine = InferenceEngine(load_model(folder))
        xte, yte = tokens_by_shape(engine, held_out, CONCEPT, True)
        ote, oye = tokens_by_shape(engine, held_out, CONCEPT, False)
        for k, n in enumerate(args.train):
            fit = scenes_with_concept(n, CORRECTION_SEED + k)  # k = 0: the demo's own correction scenes
            xtr, ytr = tokens_by_shape(engine, fit, CONCEPT, True)
            score = ridge_accuracy(xtr, ytr, xte, yte)
            print(f"{str(folder)[-40:]:40s} {f'{len(ytr)} pink regions':>24s} {score:22.3f}")
            if k == 0:
                otr, oyr = tokens_by_shape(engine, fit, CONCEPT, False)
                other = ridge_accuracy(otr, oyr, ote, oye)
                moved = ridge_accuracy(otr, oyr, xte, yte)
                fitted = f"{len(oyr)} other regions"
                print(f"{'':40s} {fitted:>24s} {moved:22.3f}   (other colours held out: {other:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
