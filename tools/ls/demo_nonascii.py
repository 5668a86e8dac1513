"""Non-ASCII corrections, end to end: captions in Chinese, Arabic, emoji and combining marks are
taught through the webhook and one real fine-tuning job (issue 15, item 5).

    python -m tools.ls.demo_nonascii [--regions 48] [--eval-regions 80] [--work DIR] [--json FILE] [--check]

The embedded default model was trained on English captions of shapes without any pink one.  The
demo

1. seeds a fresh model registry (in ``--work``) from ``--model`` and measures it on *held-out*
   scenes (a seed never used for corrections) holding pink objects: caption exact match per
   caption language, and every answer (captions, attributes, relations) checked for malformed text
   (:func:`backend.finetune.gate.malformed_reason`: U+FFFD, control characters, relation words in a
   caption or attribute answer);
2. plays a reviewer who annotates scenes with pink objects: the caption of a pink object is written
   in one script per shape (:data:`CAPTIONS`: Chinese, Arabic, emoji, decomposed Vietnamese with
   combining marks), every other object keeps its English caption; each scene is an
   ``ANNOTATION_CREATED`` webhook POSTed to the real backend app, the last one reaches
   ``TRAIN_MIN_CORRECTIONS`` and a fine-tuning job is enqueued on Redis;
3. runs a real worker (``python -m backend.worker --burst``) that fine-tunes, gates and commits the
   candidate (promoted if the gate passes);
4. measures the job's candidate version on the same held-out scenes and prints the table.

Targets: every caption language >= 80 % exact match after, 0 malformed answers, and the gate's base
figures (toy-world scenes, ``GATE_EVAL_IMAGES``) down by at most 2 points.  ``--check`` exits 1
when a target is missed.  Recipe settings (``TRAIN_STEPS``, ``TRAIN_LR``, ``REPLAY_FRACTION``,
``TRAIN_MAX_TURNS``...) come from the environment like the worker's.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model.tasks import relation_text
from tools.ls.demo_loop import (
    demo_parser,
    finish,
    post_annotations,
    run_worker,
    seed_registry,
    use_work_folder,
)
from tools.ls.payloads import SCENE_LABEL_CONFIG, annotation_payload, scene_result, timestamp
from toyworld.scenes import SHAPES, SIZE_FRACTIONS, Scene, SceneObject, SceneSpec, make_scene

__all__ = [
    "BASE_METRICS",
    "CAPTIONS",
    "CONCEPT",
    "CORRECTION_SEED",
    "EVAL_SEED",
    "LANGUAGES",
    "caption_language",
    "correction_payload",
    "main",
    "measure",
    "missed_targets",
    "reviewer_caption",
    "run_demo",
    "scenes_with_concept",
    "table",
]

CONCEPT = "pink"
# A pink object's caption, one script per shape so the caption is a function of what is drawn.
CAPTIONS: dict[str, tuple[str, str]] = {
    "circle": ("zh", "粉色圆形"),  # "pink circle"
    "square": ("ar", "\u0645\u0631\u0628\u0639 \u0648\u0631\u062f\u064a"),  # Arabic "pink square" (RTL)
    "triangle": ("emoji", "\U0001fa77\U0001f53a"),  # pink heart, red triangle: no letters at all
    # Vietnamese "pink diamond" decomposed (NFD): base letters followed by combining marks.
    "diamond": ("combining", "hi\u0300nh thoi ho\u0302\u0300ng"),
}
LANGUAGES = (*(lang for lang, _ in CAPTIONS.values()), "en")  # "en": the other objects' captions
BASE_METRICS = ("caption_exact_match", "attribute_accuracy", "relation_accuracy")
CORRECTION_SEED = 515_151  # scenes the reviewer corrects (far from training and evaluation seeds)
EVAL_SEED = 626_262  # held-out scenes: never corrected, never trained on
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- reviewer simulation
def reviewer_caption(obj: SceneObject) -> str:
    """The caption the reviewer writes: a pink object's in its shape's script, others in English."""
    return CAPTIONS[obj.shape][1] if obj.color == CONCEPT else obj.caption


def caption_language(obj: SceneObject) -> str:
    """Which of :data:`LANGUAGES` ``obj``'s reviewer caption is in."""
    return CAPTIONS[obj.shape][0] if obj.color == CONCEPT else "en"


def scenes_with_concept(regions: int, seed: int, per_scene: int = 2) -> list[Scene]:
    """Scenes holding ``regions`` pink objects in total, ``per_scene`` each; every shape (so every
    caption script) gets the same share, in shuffled order so that no shape always shares its image
    with another; the other objects are random, never pink."""
    rng = random.Random(seed)
    shapes = [SHAPES[k % len(SHAPES)] for k in range(regions)]
    rng.shuffle(shapes)
    scenes = []
    for start in range(0, regions, per_scene):
        forced = [
            (CONCEPT, shape, rng.choice(list(SIZE_FRACTIONS))) for shape in shapes[start : start + per_scene]
        ]
        scenes.append(make_scene(rng, SceneSpec(), forced=forced))
    return scenes


def correction_payload(
    scene: Scene, annotation_id: int, image: str, updated_at: str, project_id: int, task_id: int
) -> dict[str, Any]:
    """The ``ANNOTATION_CREATED`` webhook body of a reviewer's annotation of ``scene`` whose caption
    TextAreas hold :func:`reviewer_caption` (boxes, choices and relations as ``scene_result``)."""
    result = scene_result(scene)
    for item in result:
        if item.get("from_name") == "caption":
            obj = scene.objects[int(item["id"][1:])]  # scene_result's region ids: r0, r1, ...
            item["value"]["text"] = [reviewer_caption(obj)]
    return annotation_payload(annotation_id, result, updated_at, project_id, task_id, image,
                              label_config=SCENE_LABEL_CONFIG)  # fmt: skip


# ---------------------------------------------------------------------- measuring
def measure(folder: Path, version: str, scenes: Sequence[Scene], batch_images: int = 8) -> dict[str, Any]:
    """Answers of a checkpoint folder (fresh engine) to every question the backend asks about the
    objects of ``scenes`` (caption, colour/shape/size, relations).

    Returns per caption language ``{"right", "total", "exact_match", "wrong_answers"}`` (exact string
    equality with :func:`reviewer_caption`; its three most frequent wrong captions, counted),
    attribute and relation accuracy, and the malformed answers
    (:func:`backend.finetune.gate.malformed_reason`) with up to 5 examples."""
    from backend.finetune.gate import malformed_reason
    from model.checkpoint import load_model
    from model.geometry import boxes_tensor
    from model.inference.describe import ATTRIBUTES, describe_regions, relation_pairs
    from model.inference.engine import InferenceEngine

    engine = InferenceEngine(load_model(folder), version=version)
    right = dict.fromkeys(LANGUAGES, 0)
    total = dict.fromkeys(LANGUAGES, 0)
    wrong: dict[str, Counter[str]] = {lang: Counter() for lang in LANGUAGES}
    attr_right = attr_total = rel_right = rel_total = answers = 0
    malformed: list[dict[str, str]] = []
    replacement = 0
    for start in range(0, len(scenes), batch_images):
        chunk = scenes[start : start + batch_images]
        boxes = [boxes_tensor([o.box for o in s.objects], s.width, s.height) for s in chunk]
        reports = describe_regions(engine, [s.image for s in chunk], boxes)
        for scene, report in zip(chunk, reports):
            checked: list[tuple[str, str, str]] = []  # (kind, answer, reference)
            for obj, region in zip(scene.objects, report.regions):
                lang, reference = caption_language(obj), reviewer_caption(obj)
                total[lang] += 1
                right[lang] += int(region.caption.text == reference)
                if region.caption.text != reference:
                    wrong[lang][region.caption.text] += 1
                checked.append(("caption", region.caption.text, reference))
                for name in ATTRIBUTES:  # an object called empty has none: each counts as wrong
                    ans = region.attributes.get(name)
                    attr_total += 1
                    attr_right += int(ans is not None and ans.text == getattr(obj, name))
                    if ans is not None:
                        checked.append(("attribute", ans.text, getattr(obj, name)))
            said = {(rel.source, rel.target): rel.answer.text for rel in report.relations}
            for i, j in relation_pairs(len(scene.objects)):
                a, b = scene.objects[i], scene.objects[j]
                reference = relation_text(a.box, b.box, scene.width, scene.height)
                rel_total += 1
                rel_right += int(said.get((i, j)) == reference)  # dropped with an empty box: wrong
                if (i, j) in said:
                    checked.append(("relation", said[(i, j)], reference))
            for kind, answer, reference in checked:
                answers += 1
                replacement += "\ufffd" in answer
                reason = malformed_reason(kind, answer, reference)
                if reason is not None:
                    malformed.append({"kind": kind, "answer": answer, "reason": reason})
    return {
        "languages": {
            lang: {
                "right": right[lang],
                "total": total[lang],
                "exact_match": right[lang] / total[lang] if total[lang] else float("nan"),
                "wrong_answers": dict(wrong[lang].most_common(3)),
            }
            for lang in LANGUAGES
        },  # fmt: skip
        "attribute_accuracy": attr_right / attr_total,
        "relation_accuracy": rel_right / rel_total if rel_total else float("nan"),
        "answers": answers,
        "replacement_characters": replacement,
        "malformed": len(malformed),
        "malformed_examples": malformed[:5],
    }


def table(before: dict[str, Any], after: dict[str, Any], job: dict[str, Any]) -> str:
    """Before/after figures on the held-out scenes, and the gate's figures of the job's round
    ``job`` (:func:`run_demo`'s summary): base set and held-out corrections per script."""
    lines = [f"{'held-out scenes':34s} {'before':>8s} {'after':>8s} {'change':>9s}"]
    for lang in LANGUAGES:
        b, a = before["languages"][lang], after["languages"][lang]
        label = f"caption exact match, {lang} ({a['total']})"
        change = 100 * (a["exact_match"] - b["exact_match"])
        lines.append(f"{label:34s} {b['exact_match']:8.1%} {a['exact_match']:8.1%} {change:+8.1f}pt")
    for key in ("attribute_accuracy", "relation_accuracy"):
        b, a = before[key], after[key]
        lines.append(f"{key:34s} {b:8.1%} {a:8.1%} {100 * (a - b):+8.1f}pt")
    for lang in LANGUAGES:
        if after["languages"][lang]["wrong_answers"]:
            lines.append(f"  {lang} wrong captions after: {after['languages'][lang]['wrong_answers']}")
    lines.append(f"{'malformed answers (of all)':34s} {before['malformed']:8d} {after['malformed']:8d}"
                 f"   of {after['answers']}")  # fmt: skip
    parent, cand = job["parent_scores"]["base"], job["candidate"]["base"]
    lines.append(f"{'gate base set (toy scenes)':34s} {'parent':>8s} {'candid.':>8s}")
    for key in BASE_METRICS:
        lines.append(
            f"{key:34s} {parent[key]:8.1%} {cand[key]:8.1%} {100 * (cand[key] - parent[key]):+8.1f}pt"
        )
    lines.append(
        f"{'gate held-out corrections, script':34s} {'parent':>8s} {'candid.':>8s} {'questions':>9s}"
    )
    for script, f in job["gate"].get("scripts", {}).items():
        lines.append(f"{script:34s} {f['parent']:8.1%} {f['candidate']:8.1%} {f['questions']:9d}")
    lines.append(f"gate: decision {job['decision']}, reasons {job['gate']['reasons']}, "
                 f"malformed {job['gate'].get('malformed')}")  # fmt: skip
    return "\n".join(lines)


def missed_targets(
    after: dict[str, Any], job: dict[str, Any], concept_min: float = 0.80, max_drop: float = 0.02
) -> list[str]:
    """The targets the candidate misses (module doc); empty when all are met."""
    missed = [
        f"{lang} caption exact match {f['exact_match']:.3f} < {concept_min}"
        for lang, f in after["languages"].items()
        if not f["exact_match"] >= concept_min
    ]
    if after["malformed"] or after["replacement_characters"]:
        missed.append(f"{after['malformed']} malformed answers: {after['malformed_examples']}")
    parent, cand = job["parent_scores"]["base"], job["candidate"]["base"]
    for key in BASE_METRICS:
        if cand[key] < parent[key] - max_drop - 1e-9:
            missed.append(f"base {key} dropped by {100 * (parent[key] - cand[key]):.1f} points")
    return missed


# ---------------------------------------------------------------------- the loop
def run_demo(
    work: Path,
    model: Path,
    regions: int = 48,
    eval_regions: int = 80,
    project_id: int = 1,
    env: dict[str, str] | None = None,
    log: Callable[[str], Any] = print,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Run the whole loop in ``work``; returns (before, after, the job's round summary with the
    parent's and candidate's scores)."""
    images_dir = use_work_folder(work, model, "nonascii", env)
    from backend.app import create_app

    scenes = scenes_with_concept(regions, CORRECTION_SEED)
    held_out = scenes_with_concept(eval_regions, EVAL_SEED)
    n_regions = sum(len(s.objects) for s in scenes)
    settings, registry, parent = seed_registry(scenes)

    t0 = time.monotonic()
    before = measure(registry.path(parent), parent, held_out)
    log(f"measured {parent} on {len(held_out)} held-out scenes in {time.monotonic() - t0:.0f}s")

    app = create_app(settings)
    client = app.test_client()

    def payload(scene: Scene, i: int, image: str) -> dict[str, Any]:
        return correction_payload(scene, 7000 + i, image, timestamp(i), project_id, 11000 + i)

    codes, body = post_annotations(client, scenes, images_dir, payload)
    app.extensions["roi"]["holder"].stop()  # the app's model is not needed any more
    per_lang = {
        lang: sum(caption_language(o) == lang for s in scenes for o in s.objects) for lang in LANGUAGES
    }
    log(f"posted {len(scenes)} annotations ({n_regions} regions, captions per language {per_lang}): "
        f"HTTP {sorted(set(codes))}; last answer {json.dumps(body['result']['jobs'])}")  # fmt: skip
    if set(codes) != {201}:
        raise RuntimeError(f"webhook answered {sorted(set(codes))}: {body}")

    t1 = time.monotonic()
    job = run_worker(settings, project_id, log)
    (round_,) = job.return_value()["rounds"]
    log(f"job finished in {time.monotonic() - t1:.0f}s: {round_['decision']} {round_['gate']['reasons']}")
    version = round_["version"]
    metrics = json.loads((registry.path(version) / "metrics.json").read_text())
    summary = {
        **round_,
        "parent_scores": metrics["parent_scores"],
        "candidate": metrics["candidate"],
        "train": metrics.get("train"),
        "current": registry.current(),
        "job_seconds": round(time.monotonic() - t1, 1),
    }
    t2 = time.monotonic()
    after = measure(registry.path(version), version, held_out)
    log(f"measured {version} in {time.monotonic() - t2:.0f}s")
    return before, after, summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = demo_parser(__doc__, regions=48)
    ap.add_argument("--eval-regions", type=int, default=80, help="pink regions in the held-out scenes")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nonascii-demo-") as tmp:
        before, after, job = run_demo(args.work or Path(tmp), args.model, args.regions, args.eval_regions)
    out = {"before": before, "after": after, "job": job}
    return finish(table(before, after, job), missed_targets(after, job), t0, args, out)


if __name__ == "__main__":
    raise SystemExit(main())
