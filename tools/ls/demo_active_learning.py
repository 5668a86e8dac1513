"""Active-learning loop, end to end: a concept the default model never saw is taught by corrections.

    python -m tools.ls.demo_active_learning [--regions 50] [--eval-images 100] [--work DIR]

The embedded default model was trained without any pink object.  The demo

1. seeds a fresh model registry (in ``--work``) from ``--model`` and measures it: pink scenes
   (``SceneSpec(colors=["pink"])``: caption exact match, colour accuracy) and the rest (default
   scenes: caption exact match, attribute accuracy, relation accuracy);
2. renders scenes that contain pink objects and plays a reviewer: each scene becomes a Label Studio
   ``ANNOTATION_CREATED`` webhook (rectangles in percent, per-region caption TextArea, attribute
   Choices, relations) POSTed to the real backend app (``backend.app.create_app``), which stores it;
   the last one reaches ``TRAIN_MIN_CORRECTIONS`` and a fine-tuning job is enqueued on Redis;
3. runs a real worker (``python -m backend.worker --burst``) that fine-tunes, gates and promotes a
   new version, and waits for the app to serve it;
4. measures a fresh engine loaded from the registry and prints the before/after table.

Targets: pink from near 0 to >= 80 %; every other figure drops by at most 2 points.  ``--check``
exits 1 when a target is missed.  Recipe settings (``TRAIN_STEPS``, ``TRAIN_LR``,
``REPLAY_FRACTION``, ``TRAIN_MAX_TURNS``...) come from the environment like the worker's.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.ls.demo_loop import (
    demo_parser,
    finish,
    post_annotations,
    run_worker,
    seed_registry,
    use_work_folder,
)
from tools.ls.payloads import SCENE_LABEL_CONFIG, scene_payload, timestamp
from toyworld.scenes import SHAPES, SIZE_FRACTIONS, Scene, SceneSpec, make_scene

CONCEPT = "pink"
CORRECTION_SEED = 424_242  # scenes the reviewer corrects (far from training and evaluation seeds)


# ---------------------------------------------------------------------- reviewer simulation
def correction_scenes(regions: int, per_scene: int = 2, seed: int = CORRECTION_SEED) -> list[Scene]:
    """Scenes holding ``regions`` pink objects in total (``per_scene`` each; other objects random)."""
    rng = random.Random(seed)
    scenes = []
    left = regions
    while left > 0:
        k = min(per_scene, left)
        forced = [(CONCEPT, rng.choice(SHAPES), rng.choice(list(SIZE_FRACTIONS))) for _ in range(k)]
        scenes.append(make_scene(rng, SceneSpec(), forced=forced))
        left -= k
    return scenes


# ---------------------------------------------------------------------- measuring
@dataclass
class Figures:
    pink_caption: float
    pink_color: float
    rest_caption: float
    rest_attribute: float
    rest_relation: float


ROWS = [
    ("pink_caption", "pink: caption exact match"),
    ("pink_color", "pink: colour accuracy"),
    ("rest_caption", "rest: caption exact match"),
    ("rest_attribute", "rest: attribute accuracy"),
    ("rest_relation", "rest: relation accuracy"),
]


def measure(folder: Path, version: str, images: int, seed: int = 1) -> Figures:
    """Score a checkpoint folder on pink scenes and on default scenes (fresh engine)."""
    from model.checkpoint import load_model
    from model.inference.engine import InferenceEngine
    from toyworld.evaluate import eval_scenes, score_scenes

    engine = InferenceEngine(load_model(folder), version=version)
    pink = score_scenes(engine, eval_scenes(seed, images, SceneSpec(colors=[CONCEPT])), relations=False)
    rest = score_scenes(engine, eval_scenes(seed, images, SceneSpec()))
    return Figures(
        pink["caption_exact_match"],
        pink["color_accuracy"],
        rest["caption_exact_match"],
        rest["attribute_accuracy"],
        rest["relation_accuracy"],
    )


def table(before: Figures, after: Figures) -> str:
    lines = [f"{'metric':30s} {'before':>8s} {'after':>8s} {'change':>9s}"]
    for key, label in ROWS:
        b, a = getattr(before, key), getattr(after, key)
        lines.append(f"{label:30s} {b:8.1%} {a:8.1%} {100 * (a - b):+8.1f}pt")
    return "\n".join(lines)


def missed_targets(
    before: Figures, after: Figures, concept_min: float = 0.80, max_drop: float = 0.02
) -> list[str]:
    missed = [f"{k} {getattr(after, k):.3f} < {concept_min}" for k in ("pink_caption", "pink_color")
              if getattr(after, k) < concept_min]  # fmt: skip
    for key in ("rest_caption", "rest_attribute", "rest_relation"):
        drop = getattr(before, key) - getattr(after, key)
        if drop > max_drop + 1e-9:
            missed.append(f"{key} dropped by {100 * drop:.1f} points (> {100 * max_drop:.0f})")
    return missed


# ---------------------------------------------------------------------- the loop
def run_demo(
    work: Path,
    model: Path,
    regions: int = 50,
    eval_images: int = 100,
    project_id: int = 1,
    env: dict[str, str] | None = None,
    log=print,
) -> tuple[Figures, Figures, dict]:
    """Run the whole loop in ``work``; returns (before, after, job summary)."""
    images_dir = use_work_folder(work, model, "demo", env)
    from backend.app import create_app

    scenes = correction_scenes(regions)
    n_regions = sum(len(s.objects) for s in scenes)
    settings, registry, parent = seed_registry(scenes)

    t0 = time.monotonic()
    before = measure(registry.path(parent), parent, eval_images)
    log(f"measured {parent} in {time.monotonic() - t0:.0f}s")

    app = create_app(settings)
    client = app.test_client()

    def payload(scene: Scene, i: int, image: str) -> dict:
        return scene_payload(scene, 5000 + i, image, timestamp(i), project_id, task_id=9000 + i)

    codes, body = post_annotations(client, scenes, images_dir, payload)
    log(f"posted {len(scenes)} annotations ({n_regions} regions, "
        f"{sum(len([o for o in s.objects if o.color == CONCEPT]) for s in scenes)} pink): "
        f"HTTP {sorted(set(codes))}; last answer {json.dumps(body['result']['jobs'])}")  # fmt: skip

    t1 = time.monotonic()
    job = run_worker(settings, project_id, log)
    summary = job.return_value()
    log(f"job finished in {time.monotonic() - t1:.0f}s: {json.dumps(summary['rounds'][-1]['gate'])}")

    holder = app.extensions["roi"]["holder"]
    new_version = registry.current()
    served = holder.wait_for_version(new_version, timeout=120)
    setup_body = {"project": f"{project_id}.0", "schema": SCENE_LABEL_CONFIG}
    setup = client.post("/setup", json=setup_body).get_json()
    log(f"registry current: {new_version}; app serving it: {served}; /setup model_version={setup}")
    after = measure(registry.path(new_version), new_version, eval_images)
    return before, after, summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = demo_parser(__doc__, regions=50)
    ap.add_argument("--eval-images", type=int, default=100, help="evaluation scenes per set")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="al-demo-") as tmp:
        before, after, summary = run_demo(args.work or Path(tmp), args.model, args.regions, args.eval_images)
    out = {"before": before.__dict__, "after": after.__dict__, "job": summary}
    return finish(table(before, after), missed_targets(before, after), t0, args, out)


if __name__ == "__main__":
    raise SystemExit(main())
