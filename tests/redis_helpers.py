"""Helpers for the job tests: settings with their own Redis database (13, or ``TEST_REDIS_URL`` so
two checkouts can run their suites side by side), queue and key prefix."""

from __future__ import annotations

import os
import uuid
from dataclasses import fields, replace
from pathlib import Path

from backend.settings import Settings

TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/13"
CLOSED_REDIS_URL = "redis://127.0.0.1:1/13"  # nothing listens on port 1: "Redis is down"


def job_settings(tmp_path: Path, **overrides) -> Settings:
    """Settings for one test: its own data dir, registry dir, queue name and key prefix."""
    tag = uuid.uuid4().hex[:8]
    base = Settings(
        data_dir=tmp_path / "data",
        model_dir=tmp_path / "models",
        redis_url=TEST_REDIS_URL,
        queue_name=f"test-train-{tag}",
        key_prefix=f"test-{tag}",
        train_min_corrections=3,
    )
    return replace(base, **overrides)


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that make ``Settings.from_env()`` (e.g. in a worker) equal ``settings``."""
    env = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        env[Settings.env_name(f)] = str(value).lower() if isinstance(value, bool) else str(value)
    return {k: v for k, v in env.items() if v != ""}
