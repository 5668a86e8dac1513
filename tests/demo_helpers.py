"""Running a demo of ``tools/ls`` as a user would, for the slow demo tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.redis_helpers import TEST_REDIS_URL

REPO = Path(__file__).resolve().parent.parent


def run_demo(
    module: str, args: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``python -m <module> <args> --work <tmp>/work --json <tmp>/demo.json`` on the test Redis
    database; returns the JSON it wrote.  Fails with the demo's output when it exits non-zero."""
    out = tmp_path / "demo.json"
    env = {**os.environ, "REDIS_URL": TEST_REDIS_URL, "LOG_LEVEL": "WARNING", **(env or {})}
    # Its own process group: if the demo overruns, its RQ worker must not train on as an orphan.
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args, "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    print(stdout)
    return json.loads(out.read_text())
