"""The model in a serving process: loaded once, shared by threads, swapped when the registry moves.

:class:`ModelHolder` owns the :class:`model.inference.engine.InferenceEngine` of the registry's current
version.  Request threads call :meth:`ModelHolder.get`.  A watcher thread of the process
(:meth:`ModelHolder.start`) reads the registry pointer every ``MODEL_POLL_SECONDS``, whether requests
arrive or not; when it names another version the watcher loads it and then swaps one reference
(the *swap point*).  A request that takes the engine after the swap point is answered by the new
version (its results carry that ``model_version``), as are ``/health`` and ``/setup``; requests
already holding the old engine finish on it.  Nothing is dropped and no request waits for a reload
(only the very first load is waited for).  A holder that was never started (or whose watcher did
not survive a fork) falls back to polling from :meth:`ModelHolder.get`.

Before a version serves: its manifest and headers are verified and its memory estimated from the
config (nothing allocated); unless the registry records it as cleared, it is loaded and smoke-tested
in a child process first (:meth:`backend.registry.ModelRegistry.check_in_child`), so a version that
crashes or exhausts memory while loading kills the child, not this worker; then it is loaded here
and smoke-tested once more.  A refused version is recorded as bad in the registry and not tried
again; the worker keeps the version it serves, and a fresh worker falls back to the newest earlier
version that loads.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from backend.registry import CHECK_TIMEOUT, CURRENT, ModelRegistry, RegistryError
from backend.settings import Settings
from model.checkpoint import CheckpointError, check_memory, load_model, smoke_check, verify_checkpoint
from model.device import parse_dtype, pick_device
from model.inference.engine import InferenceEngine
from model.mllm import RegionMLLM

__all__ = ["Loader", "ModelHolder", "ModelUnavailable", "VersionRefused", "default_loader"]

log = logging.getLogger("backend.serving")

Loader = Callable[[Path, str], RegionMLLM]
MIN_POLL_SECONDS = 0.1  # the watcher's floor: MODEL_POLL_SECONDS=0 must not spin a core
EXIT_WAIT_SECONDS = 60.0

_holders: weakref.WeakSet[ModelHolder] = weakref.WeakSet()


@atexit.register
def _stop_holders() -> None:
    """A holder's daemon thread still inside torch while the interpreter tears torch down ends the
    process with C++ 'terminate called without an active exception' (exit 134): stop them first."""
    for holder in list(_holders):
        holder.stop(wait=EXIT_WAIT_SECONDS)


class ModelUnavailable(RuntimeError):
    """No model could be loaded (answered as 503)."""


class VersionRefused(RuntimeError):
    """A version that failed its checks (recorded as bad in the registry)."""


def default_loader(settings: Settings) -> Loader:
    def load(folder: Path, version: str) -> RegionMLLM:
        device = pick_device(settings.device)
        return load_model(folder, device=device, dtype=parse_dtype(settings.model_dtype, device))

    return load


class ModelHolder:
    """Thread-safe owner of the current engine (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry | None = None,
        loader: Loader | None = None,
        check_timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.check_timeout = check_timeout
        self.registry = registry or ModelRegistry(settings.model_dir, settings.default_model)
        self.loader = loader or default_loader(settings)
        self._current: tuple[InferenceEngine, str] | None = None
        self._load_lock = threading.Lock()  # one load at a time
        self._tried = False
        self._last_poll = 0.0
        self._loading: str | None = None
        self._failed: dict[str, float] = {}  # version -> time of a failure not recorded as bad
        self._error: str | None = None
        self.swaps = 0
        self.load_attempts: dict[str, int] = {}  # version -> times this worker tried to load it
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watcher_pid: int | None = None  # the process the watcher runs in (None: not started)
        self._watch_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        _holders.add(self)

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return thread

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Begin loading the current version in the background and start the watcher thread that
        follows the registry pointer (both return at once)."""
        self._spawn(self._initial_load, "model-load")
        self._start_watcher()

    def stop(self, wait: float = 0.0) -> None:
        """Stop the watcher thread (a load in progress finishes); ``wait``: seconds to wait for this
        holder's threads (watcher, loads) to end."""
        self._stop.set()
        deadline = time.monotonic() + wait
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def watching(self) -> bool:
        """Is this process's watcher thread running?"""
        watcher = self._watcher
        return watcher is not None and watcher.is_alive() and self._watcher_pid == os.getpid()

    def get(self) -> tuple[InferenceEngine, str]:
        """The current ``(engine, version)``; blocks only while the first load runs."""
        current = self._current
        if current is None:
            self._initial_load()  # waits for a load already running in the background
            current = self._current
            if current is None:
                self._follow()  # a later registry fix is picked up by a background load
                raise ModelUnavailable(f"no model could be loaded: {self._error}")
        self._follow()
        return current

    @property
    def loaded(self) -> bool:
        return self._current is not None

    @property
    def version(self) -> str:
        """Version of the loaded engine, or the registry's current one before the first load."""
        self._ensure_watcher()
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
        """Check the registry pointer (rate-limited) and load a new version in a background thread."""
        now = time.monotonic()
        if not force and now - self._last_poll < self.settings.model_poll_seconds:
            return
        self._last_poll = now
        wanted = self._wanted(now)
        if wanted is not None and self._loading is None:
            self._loading = wanted
            self._spawn(self._swap_to, "model-swap", wanted)

    def _wanted(self, now: float) -> str | None:
        """The registry's current version when this process should load it now: not the one
        serving, not recorded as bad, not a load that failed moments ago."""
        try:
            wanted = self.registry.current()
        except (RegistryError, OSError, ValueError) as exc:
            log.warning("registry pointer unreadable: %s", exc)
            return None
        current = self._current
        if current is not None and current[1] == wanted:
            return None
        try:
            bad = self.registry.bad_reason(wanted)
        except (RegistryError, OSError) as exc:
            log.warning("registry check record unreadable: %s", exc)
            return None
        if bad is not None:  # recorded as bad: never tried again until a check clears it
            self._error = f"version {wanted} refused: {bad}"
            return None
        failed_at = self._failed.get(wanted)
        if failed_at is not None and now - failed_at < max(30.0, 10 * self.settings.model_poll_seconds):
            return None
        return wanted

    # ------------------------------------------------------------------ watcher
    def _start_watcher(self) -> None:
        with self._watch_lock:
            if self.watching:
                return
            self._stop.clear()
            self._watcher_pid = os.getpid()
            self._watcher = self._spawn(self._watch, "model-watch")

    def _ensure_watcher(self) -> None:
        """Start the watcher again in a forked child (threads do not survive a fork)."""
        if self._watcher_pid is not None and self._watcher_pid != os.getpid():
            self._start_watcher()

    def _follow(self) -> None:
        """What a request does to follow the registry: nothing while the watcher runs."""
        self._ensure_watcher()
        if not self.watching:
            self.poll()

    def _watch(self) -> None:
        period = max(self.settings.model_poll_seconds, MIN_POLL_SECONDS)
        while not self._stop.wait(period):
            try:
                self._check_pointer()
            except Exception:  # the watcher must outlive any registry trouble
                log.exception("model watcher: registry check failed")

    def _check_pointer(self) -> None:
        """One watcher round: load and swap in (in this thread) a new current version."""
        if not self._tried or self._loading is not None:
            return  # the first load, or a load started by poll(), takes the current version
        now = time.monotonic()
        wanted = self._wanted(now)
        if wanted is None:
            return
        previous = self._current[1] if self._current else None
        log.info(
            "model version noticed",
            extra={
                "version": wanted,
                "serving": previous,
                "promoted_s_ago": self._pointer_age(),
                "pid": os.getpid(),
            },
        )
        self._loading = wanted
        self._swap_to(wanted)

    def _pointer_age(self) -> float | None:
        """Seconds since the registry pointer was written (for the log: how long a version took to
        be noticed)."""
        try:
            return round(time.time() - (self.registry.root / CURRENT).stat().st_mtime, 2)
        except OSError:
            return None

    def wait_for_version(self, version: str, timeout: float = 30.0) -> bool:
        """Poll until ``version`` is serving (for tests and tools)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._current is not None and self._current[1] == version:
                return True
            if not self.watching:
                self.poll(force=self._loading is None)
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------ loading
    def _validate(self, version: str) -> Path:
        """Checks before this worker allocates anything for ``version`` (see the module docstring);
        raises :class:`VersionRefused` after recording it as bad."""
        folder = self.registry.path(version)  # an invalid or unknown name: refused, not recorded
        bad = self.registry.bad_reason(version)
        if bad is not None:
            raise VersionRefused(f"version {version} refused: {bad}")
        try:
            verify_checkpoint(folder)
            check_memory(folder)
            if not self.registry.is_cleared(version):
                self.registry.check_in_child(version, timeout=self.check_timeout)
        except CheckpointError as exc:
            self._record_bad(version, str(exc))
            raise VersionRefused(f"version {version} refused: {exc}") from exc
        return folder

    def _record_bad(self, version: str, reason: str) -> None:
        if self.registry.bad_reason(version) is None:
            self.registry.record_check(version, False, reason, by="serving")
        log.error("model version refused", extra={"version": version, "reason": reason})

    def _build(self, version: str) -> InferenceEngine:
        self.load_attempts[version] = self.load_attempts.get(version, 0) + 1
        started = time.monotonic()
        folder = self._validate(version)
        try:
            model = self.loader(folder, version)
            smoke_check(model)
        except Exception as exc:  # whatever the load raised, this version does not serve
            reason = f"{type(exc).__name__}: {exc}"
            self._record_bad(version, reason)
            raise VersionRefused(f"version {version} refused: {reason}") from exc
        engine = InferenceEngine(
            model,
            version,
            cache_bytes=int(self.settings.feature_cache_mb * 2**20),
            max_new_tokens=self.settings.max_new_tokens,
        )
        log.info("model loaded", extra={"version": version, "seconds": round(time.monotonic() - started, 2)})
        return engine

    def _candidates(self, wanted: str) -> list[str]:
        """The current version, then earlier ones newest first, then the seed: what a fresh worker
        tries in turn."""
        names = [wanted, *reversed(self.registry.history())]
        try:
            names.append(self.registry.seed_version())
        except RegistryError:
            pass
        known = set(self.registry.version_names())
        return [v for i, v in enumerate(names) if v in known and v not in names[:i]]

    def _initial_load(self) -> None:
        with self._load_lock:
            if self._current is not None or self._tried:
                return
            try:
                self.registry.ensure_initialized()
                wanted = self.registry.current()
                refusals: list[str] = []
                for version in self._candidates(wanted):
                    try:
                        self._current = (self._build(version), version)
                        break
                    except (VersionRefused, RegistryError) as exc:
                        refusals.append(str(exc))
                if self._current is None:
                    self._error = "; ".join(refusals) or f"version {wanted} is not in the registry"
                elif self._current[1] != wanted:
                    self._error = refusals[0]
                    log.warning(
                        "serving an earlier version", extra={"version": self._current[1], "wanted": wanted}
                    )
                else:
                    self._error = None
            except (RegistryError, CheckpointError, OSError, ValueError, RuntimeError) as exc:
                self._error = f"{type(exc).__name__}: {exc}"
                log.exception("initial model load failed")
            finally:
                self._last_poll = time.monotonic()
                self._tried = True

    def _swap_to(self, version: str) -> None:
        started = time.monotonic()
        try:
            with self._load_lock:
                current = self._current
                if current is not None and current[1] == version:
                    return
                engine = self._build(version)
                old = current[1] if current else None
                self._current = (engine, version)  # the swap point: one reference assignment
                self._error = None
                self.swaps += 1
                self._failed.pop(version, None)
                log.info(
                    "model swapped",
                    extra={
                        "version": version,
                        "previous": old,
                        "seconds": round(time.monotonic() - started, 2),
                        "promoted_s_ago": self._pointer_age(),
                        "pid": os.getpid(),
                    },
                )
        except VersionRefused as exc:  # recorded as bad: poll() will not try it again
            self._error = str(exc)
        except Exception as exc:  # a bad version must never take the server down
            self._failed[version] = time.monotonic()
            self._error = f"{type(exc).__name__}: {exc}"
            log.exception("loading model version %s failed; keeping the current one", version)
        finally:
            self._loading = None
