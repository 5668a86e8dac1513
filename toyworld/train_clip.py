"""Contrastive pre-training of the small open_clip vision tower on synthetic image-text pairs.

Uses open_clip's own model, tokenizer and ``ClipLoss``.  Each image holds one shape; its text
names size, colour, shape and position (third of the image), so the patch features learn what the
region encoder later reads.  A ``world_share`` of the pairs comes from the wider world
(:func:`toyworld.world.world_clip_pair`: any canvas and background), the rest from the grid; a
``focal_share`` shows world objects as the region encoder's focal crops show them (named by colour
and shape only).  The result is saved as a vision-only safetensors file (``visual.*`` keys).
"""

from __future__ import annotations

import random
from pathlib import Path

import open_clip
import torch
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from model.config import VisionConfig
from model.tasks import position_text
from model.vision import ImageProcessor, build_clip, resolve_preprocessing
from toyworld.scenes import SceneSpec, make_scene
from toyworld.world import WorldSpec, world_clip_pair, world_focal_pair

__all__ = ["CLIP_WORLD", "clip_pair", "train_clip"]

# The wider world's pairs stay on canvases of at most 448 px: the tower sees 112 px, and larger
# canvases only cost drawing time.
CLIP_WORLD = WorldSpec(max_side=448)


def clip_pair(rng: random.Random, spec: SceneSpec) -> tuple[Image.Image, str]:
    """One (PIL image, text) pair of the grid generator: a single object and where it is."""
    one = SceneSpec(colors=spec.colors, shapes=spec.shapes, sizes=spec.sizes, min_objects=1, max_objects=1)
    scene = make_scene(rng, one)
    obj = scene.objects[0]
    return scene.image, f"{obj.caption} at the {position_text(obj.box, scene.width, scene.height)}"


def _pair(
    rng: random.Random,
    spec: SceneSpec,
    world: WorldSpec,
    world_share: float,
    focal_share: float,
    fill: float | None,
) -> tuple[Image.Image, str]:
    # No draw for the crop choice when it is off, so older recipes keep their pairs.
    if focal_share and rng.random() < focal_share:
        assert fill is not None, "checked by train_clip"
        return world_focal_pair(rng, world, fill)
    return world_clip_pair(rng, world) if rng.random() < world_share else clip_pair(rng, spec)


def train_clip(
    cfg: VisionConfig,
    out_file: str | Path,
    steps: int = 600,
    batch_size: int = 96,
    lr: float = 1e-3,
    seed: int = 0,
    spec: SceneSpec | None = None,
    world_share: float = 0.0,
    world: WorldSpec = CLIP_WORLD,
    focal_share: float = 0.0,
    focal_fill: float | None = None,
) -> list[float]:
    """Train ``cfg.open_clip_model`` from scratch; write its vision weights to ``out_file``.

    ``world_share``: the share of each batch drawn from the wider ``world`` (the rest: ``spec``'s grid).
    ``focal_share``: the share shown as the region encoder's focal crops of ``world`` objects
    (:func:`toyworld.world.world_focal_pair`, crop fill ``focal_fill``: the model config's
    ``region.focal_fill``, required with crops), drawn before the others.  Their texts take 24
    values, so a batch repeats them; ClipLoss counts the repeats as negatives, a floor on its loss.
    Returns the loss of every step."""
    if focal_share and focal_fill is None:
        raise ValueError("CLIP pairs shown as focal crops need the model's region.focal_fill")
    torch.manual_seed(seed)
    spec = spec or SceneSpec()
    model = build_clip(cfg.open_clip_model)
    tokenizer = open_clip.get_tokenizer(cfg.open_clip_model)
    resolve_preprocessing(cfg, model.visual, cfg.open_clip_model)  # size/mean/std from the tower
    processor = ImageProcessor(cfg)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    losses = []
    model.train()
    for _ in (bar := tqdm(range(steps), desc="clip")):
        pairs = [_pair(rng, spec, world, world_share, focal_share, focal_fill) for _ in range(batch_size)]
        images = processor.batch([p[0] for p in pairs])
        texts = tokenizer([p[1] for p in pairs])
        img, txt, scale = model(images, texts)
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    state = {f"visual.{k}": v.detach().contiguous() for k, v in model.visual.state_dict().items()}
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_file), metadata={"format": "pt"})
    return losses
