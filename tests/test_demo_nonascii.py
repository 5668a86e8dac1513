"""The non-ASCII demo's reviewer, measurement and report (the loop itself runs by hand: docs/training.md)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tools.ls.demo_nonascii import (
    BASE_METRICS,
    CAPTIONS,
    CONCEPT,
    LANGUAGES,
    caption_language,
    measure,
    missed_targets,
    reviewer_caption,
    scenes_with_concept,
    table,
)


def test_every_shape_gets_its_script_and_the_same_share():
    scenes = scenes_with_concept(8, seed=3)
    pink = [o for s in scenes for o in s.objects if o.color == CONCEPT]
    assert Counter(o.shape for o in pink) == dict.fromkeys(CAPTIONS, 2)
    for obj in (o for s in scenes for o in s.objects):
        lang = caption_language(obj)
        expected = CAPTIONS[obj.shape] if obj.color == CONCEPT else ("en", obj.caption)
        assert (lang, reviewer_caption(obj)) == expected


def test_measure_counts_every_region_and_names_the_wrong_captions(tiny_checkpoint: Path):
    scenes = scenes_with_concept(4, seed=5)
    figures = measure(tiny_checkpoint, "1.0.0", scenes, batch_images=1)
    langs = figures["languages"]
    assert sum(f["total"] for f in langs.values()) == sum(len(s.objects) for s in scenes)
    for f in langs.values():
        # A random model: its wrong captions are tallied, each counted once.
        assert sum(f["wrong_answers"].values()) <= f["total"] - f["right"]
        assert len(f["wrong_answers"]) <= 3
    job = {
        "parent_scores": {"base": dict.fromkeys(BASE_METRICS, 0.9)},
        "candidate": {"base": dict.fromkeys(BASE_METRICS, 0.85)},
        "gate": {"reasons": ["x"], "scripts": {}},
        "decision": "rejected",
    }
    text = table(figures, figures, job)
    for lang in LANGUAGES:
        if langs[lang]["wrong_answers"]:
            assert f"{lang} wrong captions after" in text
    missed = missed_targets(figures, job)
    assert any("dropped by 5.0 points" in m for m in missed)
