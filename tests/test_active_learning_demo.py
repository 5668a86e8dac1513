"""The active-learning demo, end to end on the embedded default model (reduced evaluation sets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.checkpoint import DEFAULT_DIR
from tests.demo_helpers import run_demo

pytest_plugins = ["tests.redis_fixtures"]  # fixture: redis_db


@pytest.mark.slow
def test_demo_teaches_the_held_out_colour(tmp_path: Path, redis_db):
    if not (DEFAULT_DIR / "config.json").is_file():
        pytest.skip("the embedded default model (model/default) has not been built")
    # Same recipe as the defaults in backend.settings; smaller evaluation sets to stay fast.
    result = run_demo(
        "tools.ls.demo_active_learning", ["--regions", "50", "--eval-images", "60"], tmp_path,
        {"GATE_EVAL_IMAGES": "40"},
    )  # fmt: skip
    before, after = result["before"], result["after"]
    (round_,) = result["job"]["rounds"]
    assert round_["decision"] == "promoted", round_["gate"]
    # The default never saw pink: near zero before, at least 80 % after.
    assert before["pink_caption"] < 0.2 and before["pink_color"] < 0.2
    assert after["pink_caption"] >= 0.8 and after["pink_color"] >= 0.8
    # Everything else drops by at most 2 points.
    for key in ("rest_caption", "rest_attribute", "rest_relation"):
        assert after[key] >= before[key] - 0.02, (key, before[key], after[key])
