"""The non-ASCII demo (issue 15, item 5): its reviewer, measurement and report on a tiny model, and
the whole loop on the embedded default (slow)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from model.checkpoint import DEFAULT_DIR
from tests.demo_helpers import run_demo
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

pytest_plugins = ["tests.redis_fixtures"]  # fixture: redis_db


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


@pytest.mark.slow
def test_corrections_in_four_scripts_are_learnt_without_breaking_anything(tmp_path: Path, redis_db):
    if not (DEFAULT_DIR / "config.json").is_file():
        pytest.skip("the embedded default model (model/default) has not been built")
    # The recipe of docs/training.md: 16 corrections per script, the new tokens' rows lifted.
    env = {"TRAIN_LR": "1e-3", "TRAIN_FOCUS_TURNS": "3", "TRAIN_LIFT_NEW_TOKENS": "1"}
    env["GATE_EVAL_IMAGES"] = "40"
    result = run_demo("tools.ls.demo_nonascii", ["--regions", "64", "--eval-regions", "80"], tmp_path, env)
    before, after, job = result["before"], result["after"], result["job"]
    for lang in LANGUAGES:
        f = after["languages"][lang]
        assert f["total"] >= 20 and f["exact_match"] >= 0.8, (lang, f)
        if lang != "en":  # a script the default never wrote
            assert before["languages"][lang]["exact_match"] == 0.0
    assert after["malformed"] == 0 and after["replacement_characters"] == 0, after["malformed_examples"]
    assert job["train"]["lifted_tokens"] > 0
    parent, candidate = job["parent_scores"]["base"], job["candidate"]["base"]
    for key in BASE_METRICS:
        assert candidate[key] >= parent[key] - 0.02, (key, parent[key], candidate[key])
    assert result["missed"] == []
