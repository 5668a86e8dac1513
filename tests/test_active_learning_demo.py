"""The active-learning demo, end to end on the embedded default model (reduced evaluation sets)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
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
    # Its own process group: if the demo overruns, its RQ worker must not train on as an orphan.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.ls.demo_active_learning", "--regions", "50", "--eval-images", "60",
         "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    print(stdout)
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
