"""The active-learning demo, end to end on the embedded default model (reduced evaluation sets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_helpers import TEST_REDIS_URL

pytest_plugins = ["tests.redis_fixtures"]  # fixture: redis_db

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "model" / "default"


@pytest.mark.slow
def test_demo_teaches_the_held_out_colour(tmp_path: Path, redis_db):
    if not (DEFAULT / "config.json").is_file():
        pytest.skip("the embedded default model (model/default) has not been built")
    out = tmp_path / "demo.json"
    # Same recipe as the defaults in backend.settings; smaller evaluation sets to stay fast.
    env = {**os.environ, "REDIS_URL": TEST_REDIS_URL, "GATE_EVAL_IMAGES": "40", "LOG_LEVEL": "WARNING"}
    proc = subprocess.run(
        [sys.executable, "-m", "tools.ls.demo_active_learning", "--regions", "50", "--eval-images", "60",
         "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    result = json.loads(out.read_text())
    before, after = result["before"], result["after"]
    (round_,) = result["job"]["rounds"]
    assert round_["decision"] == "promoted", round_["gate"]
    # The default never saw pink: near zero before, at least 80 % after.
    assert before["pink_caption"] < 0.2 and before["pink_color"] < 0.2
    assert after["pink_caption"] >= 0.8 and after["pink_color"] >= 0.8
    # Everything else drops by at most 2 points.
    for key in ("rest_caption", "rest_attribute", "rest_relation"):
        assert after[key] >= before[key] - 0.02, (key, before[key], after[key])
