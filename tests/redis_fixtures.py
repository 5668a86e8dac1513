"""Real-Redis fixtures (``pytest_plugins = ["tests.redis_fixtures"]``): database 13, emptied
before and after each test; ``use_settings`` for code that reads ``get_settings()``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis import Redis

from backend.settings import Settings, get_settings
from tests.redis_helpers import TEST_REDIS_URL, settings_env


@pytest.fixture()
def redis_db() -> Iterator[Redis]:
    conn = Redis.from_url(TEST_REDIS_URL)
    try:
        conn.ping()
    except Exception as exc:  # pragma: no cover - CI starts Redis
        pytest.skip(f"Redis not reachable at {TEST_REDIS_URL}: {exc}")
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()


@pytest.fixture()
def use_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """``use_settings(s)``: make ``get_settings()`` (read by jobs in this process) return ``s``."""

    def use(settings: Settings) -> None:
        for name, value in settings_env(settings).items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()
