"""Continue the embedded default: switch its pooled-feature norm to "batch", then train stage 2
with the auxiliary per-box attribute loss (how the shipped ``model/default`` was made from the
build recorded in its parent folder; a fresh ``python -m toyworld.build_default`` does both from the
start).

    python toyworld/continue_default.py --init model/default --out /tmp/next --steps 1800 --threads 2

Why: the parent's LayerNorm on the pooled RoI features erased what differs between boxes (see
``model.config.RegionEncoderConfig.feature_norm``), so its region tokens carried the box position
only.  The new BatchNorm starts with the parent's (near-constant) output as its bias, so the
model's answers are unchanged at step 0 and the content is added on top.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from model.checkpoint import load_model, read_metadata, save_checkpoint
from model.config import TrainConfig
from model.geometry import boxes_tensor
from model.inference.engine import InferenceEngine
from model.mllm import RegionMLLM
from model.region_encoder import BoxBatchNorm
from model.training import TrainOptions, train
from toyworld.build_default import (
    DEFAULT_VERSION,
    eval_progress,
    evaluation_rates,
    load_recipe,
    loss_summary,
    training_records,
)
from toyworld.evaluate import evaluate
from toyworld.scenes import SceneSpec, make_scene, scene_rng

__all__ = ["main", "switch_to_batch_norm"]


@torch.no_grad()
def switch_to_batch_norm(model: RegionMLLM, scenes: int = 64) -> None:
    """Replace a LayerNorm ``feature_norm`` by :class:`BoxBatchNorm` whose bias is the LayerNorm's
    mean output and whose running statistics come from ``scenes`` synthetic scenes."""
    extractor = model.region_encoder.roi_align
    if model.cfg.region.feature_norm == "batch":
        return
    images = [make_scene(scene_rng(3, i), SceneSpec()) for i in range(scenes)]
    vision = model.encode_images(model.processor.batch([s.image for s in images]))
    boxes = [boxes_tensor([o.box for o in s.objects], s.width, s.height) for s in images]
    seen: list[torch.Tensor] = []
    hook = extractor.feature_norm.register_forward_hook(lambda _m, _i, out: seen.append(out))
    model.region_encoder(model.cast_levels(vision), boxes)
    hook.remove()
    norm = BoxBatchNorm(seen[0].shape[1], momentum=None).to(model.device)
    norm.bias.copy_(seen[0].mean(0))
    extractor.feature_norm = norm
    model.cfg.region.feature_norm = "batch"
    norm.train()  # momentum None: running statistics = plain average over this pass
    model.region_encoder(model.cast_levels(vision), boxes)
    norm.momentum = 0.1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", type=Path, default=Path("model/default"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=600)
    ap.add_argument("--eval-images", type=int, default=200)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    recipe = load_recipe()
    model = load_model(args.init)
    switch_to_batch_norm(model)
    cfg = TrainConfig.from_dict({**recipe.stage2.to_dict(), "steps": args.steps, "seed": 4})
    options = TrainOptions(
        max_turns=recipe.prompts_per_image,
        separate_turns=True,
        progress=eval_progress(model, "continue", args.eval_every) if args.eval_every else None,
    )
    hist = train(model, training_records(recipe), cfg, options)
    parent = read_metadata(args.init)
    figures = dict(parent.get("figures", {}))
    figures.pop("evaluation", None)
    figures["continue_loss"] = loss_summary(hist)
    figures["continue_seconds"] = round(time.monotonic() - started, 1)
    figures["evaluation"] = evaluation_rates(
        evaluate(InferenceEngine(model, DEFAULT_VERSION), images=args.eval_images, seed=0)
    )
    meta = {
        **{k: v for k, v in parent.items() if k not in ("figures", "created", "files")},
        "version": DEFAULT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": "toyworld/continue_default.py",
        "continued": {"from_created": parent.get("created"), "train": cfg.to_dict(), "feature_norm": "batch"},
        "figures": figures,
    }
    save_checkpoint(model, args.out, cfg, meta, vision_source=args.init / "vision.safetensors")
    print(json.dumps(figures["evaluation"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
