"""The model in a serving process: loaded once, shared by threads, swapped when the registry moves.

:class:`ModelHolder` owns the :class:`model.inference.engine.InferenceEngine` of the registry's current
version.  Request threads call :meth:`ModelHolder.get`; at most every ``MODEL_POLL_SECONDS`` that
call also reads the registry pointer, and when it names another version a background thread loads
it and then swaps one reference.  Requests already holding the old engine finish on it; nothing is
dropped and no request waits for a reload (only the very first load is waited for).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend.registry import ModelRegistry, RegistryError
from backend.settings import Settings
from model.checkpoint import CheckpointError, load_model
from model.device import pick_device
from model.inference.engine import InferenceEngine
from model.mllm import RegionMLLM

log = logging.getLogger("backend.serving")

Loader = Callable[[Path, str], RegionMLLM]


class ModelUnavailable(RuntimeError):
    """No model could be loaded (answered as 503)."""


def default_loader(settings: Settings) -> Loader:
    def load(folder: Path, version: str) -> RegionMLLM:
        return load_model(folder, device=pick_device(settings.device))

    return load


class ModelHolder:
    """Thread-safe owner of the current engine (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry | None = None,
        loader: Loader | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings.model_dir, settings.default_model)
        self.loader = loader or default_loader(settings)
        self._current: tuple[InferenceEngine, str] | None = None
        self._load_lock = threading.Lock()  # one load at a time
        self._tried = False
        self._last_poll = 0.0
        self._loading: str | None = None
        self._failed: dict[str, float] = {}  # version -> time of the last failed load
        self._error: str | None = None
        self.swaps = 0

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Begin loading the current version in the background (returns at once)."""
        threading.Thread(target=self._initial_load, name="model-load", daemon=True).start()

    def get(self) -> tuple[InferenceEngine, str]:
        """The current ``(engine, version)``; blocks only while the first load runs."""
        current = self._current
        if current is None:
            self._initial_load()  # waits for a load already running in the background
            current = self._current
            if current is None:
                self.poll()  # a later registry fix is picked up by a background load
                raise ModelUnavailable(f"no model could be loaded: {self._error}")
        self.poll()
        return current

    @property
    def loaded(self) -> bool:
        return self._current is not None

    @property
    def version(self) -> str:
        """Version of the loaded engine, or the registry's current one before the first load."""
        current = self._current
        if current is not None:
            return current[1]
        try:
            return self.registry.current()
        except (RegistryError, OSError, ValueError) as exc:
            return f"unavailable ({exc})"

    @property
    def error(self) -> str | None:
        return self._error

    def engine_if_loaded(self) -> InferenceEngine | None:
        current = self._current
        return current[0] if current else None

    def poll(self, force: bool = False) -> None:
        """Check the registry pointer (rate-limited) and load a new version in the background."""
        now = time.monotonic()
        if not force and now - self._last_poll < self.settings.model_poll_seconds:
            return
        self._last_poll = now
        try:
            wanted = self.registry.current()
        except (RegistryError, OSError, ValueError) as exc:
            log.warning("registry pointer unreadable: %s", exc)
            return
        current = self._current
        if current is not None and current[1] == wanted:
            return
        failed_at = self._failed.get(wanted)
        if failed_at is not None and now - failed_at < max(30.0, 10 * self.settings.model_poll_seconds):
            return
        if self._loading is None:
            self._loading = wanted
            threading.Thread(target=self._swap_to, args=(wanted,), name="model-swap", daemon=True).start()

    def wait_for_version(self, version: str, timeout: float = 30.0) -> bool:
        """Poll until ``version`` is serving (for tests and tools)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._current is not None and self._current[1] == version:
                return True
            self.poll(force=self._loading is None)
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------ loading
    def _build(self, version: str) -> InferenceEngine:
        folder = self.registry.path(version)
        started = time.monotonic()
        model = self.loader(folder, version)
        engine = InferenceEngine(
            model,
            version,
            cache_bytes=int(self.settings.feature_cache_mb * 2**20),
            max_new_tokens=self.settings.max_new_tokens,
        )
        log.info("model loaded", extra={"version": version, "seconds": round(time.monotonic() - started, 2)})
        return engine

    def _initial_load(self) -> None:
        with self._load_lock:
            if self._current is not None or self._tried:
                return
            try:
                self.registry.ensure_initialized()
                version = self.registry.current()
                self._current = (self._build(version), version)
                self._error = None
            except (RegistryError, CheckpointError, OSError, ValueError, RuntimeError) as exc:
                self._error = f"{type(exc).__name__}: {exc}"
                log.exception("initial model load failed")
            finally:
                self._last_poll = time.monotonic()
                self._tried = True

    def _swap_to(self, version: str) -> None:
        try:
            with self._load_lock:
                current = self._current
                if current is not None and current[1] == version:
                    return
                engine = self._build(version)
                old = current[1] if current else None
                self._current = (engine, version)  # one reference assignment: atomic for readers
                self._error = None
                self.swaps += 1
                self._failed.pop(version, None)
                log.info("model swapped", extra={"version": version, "previous": old})
        except Exception as exc:  # a bad version must never take the server down
            self._failed[version] = time.monotonic()
            self._error = f"{type(exc).__name__}: {exc}"
            log.exception("loading model version %s failed; keeping the current one", version)
        finally:
            self._loading = None
