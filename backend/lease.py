"""The training lease: only one run of a project's fine-tuning job trains at a time.

A run takes ``<KEY_PREFIX>:train-lease:<project>`` (a redis-py ``Lock``: a random token with a TTL of
3 x ``JOB_HEARTBEAT_SECONDS``) before it loads anything, renews it every ``JOB_HEARTBEAT_SECONDS``
from a daemon thread, and confirms it right before committing a version.  A run whose lease is gone
(taken over, or not confirmed for a whole TTL because the run stalled or Redis was unreachable)
stops at its next progress report and never commits; a second run of the same project waits one TTL
for the lease and then fails with :class:`LeaseError` instead of training alongside.

A work horse whose worker died is an orphan: RQ puts each horse in a process group of its own, so
killing the worker's group leaves the horse running, and RQ's recovery hands the job to another
worker.  A horse started by :class:`backend.worker.TrainingWorker` calls :func:`watch_parent`; its
lease thread then gives the lease back and ends the process as soon as the worker is gone, before
it can commit or write the job's status over the next run's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType

from redis import Redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from backend.settings import Settings

__all__ = ["ORPHAN_EXIT_CODE", "LeaseError", "TrainingLease", "lease_key", "watch_parent"]

log = logging.getLogger(__name__)

ORPHAN_EXIT_CODE = 75  # EX_TEMPFAIL: the job itself did not fail; its worker died
_parent_pid: int | None = None


class LeaseError(RuntimeError):
    """The run does not hold its project's training lease (or could not take it)."""


def lease_key(settings: Settings, project_id: int) -> str:
    return f"{settings.key_prefix}:train-lease:{project_id}"


def watch_parent(pid: int) -> None:
    """In a work horse, right after the fork: leases renewed in this process end it once the
    worker ``pid`` is no longer its parent."""
    global _parent_pid
    _parent_pid = pid


class TrainingLease:
    """One run's hold on a project's training lease (a context manager: take, renew, give back).

    ``ttl`` is 3 x ``JOB_HEARTBEAT_SECONDS``; :meth:`on_renew` callbacks run after each renewal
    (the store's claim on the run's snapshot follows the lease)."""

    def __init__(self, connection: Redis, settings: Settings, project_id: int) -> None:
        self.project_id = project_id
        self.interval = float(settings.job_heartbeat_seconds)
        self.ttl = 3.0 * self.interval
        self.key = lease_key(settings, project_id)
        # thread_local=False: the renewal thread must see the token the job's thread took.
        self._lock = connection.lock(
            self.key, timeout=self.ttl, sleep=min(0.2, self.interval), thread_local=False
        )
        self._lost: str | None = None
        self._confirmed = 0.0
        self._renewed: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> bytes | None:
        return self._lock.local.token

    # ------------------------------------------------------------------ taking and giving back
    def acquire(self, wait: float | None = None) -> None:
        """Take the lease, waiting up to ``wait`` seconds (default: one TTL and one heartbeat, so a
        killed run's lease has expired).  Raises :class:`LeaseError`."""
        wait = self.ttl + self.interval if wait is None else wait
        try:
            taken = self._lock.acquire(blocking=wait > 0, blocking_timeout=wait if wait > 0 else None)
        except RedisError as exc:
            raise LeaseError(f"training lease {self.key}: Redis unreachable: {exc}") from exc
        if not taken:
            raise LeaseError(f"training lease {self.key} is held by another run (waited {wait:.0f} s)")
        self._confirmed = time.monotonic()
        log.info("training lease %s taken (ttl %.0f s)", self.key, self.ttl)

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="training-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and give the lease back if this run still holds it (never someone else's)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.interval + 5)
        try:
            self._lock.release()
        except (LockError, RedisError):
            pass  # not ours any more, or Redis away: it expires by itself

    def __enter__(self) -> TrainingLease:
        self.acquire()
        self.start_renewing()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    # ------------------------------------------------------------------ checks
    def on_renew(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` after every renewal; returns a function that removes it."""
        self._renewed.append(callback)
        return lambda: self._renewed.remove(callback)

    def ensure(self) -> None:
        """Cheap check for progress reports (no Redis call): raise if the lease was found lost."""
        if self._lost is not None:
            raise LeaseError(f"training lease {self.key} lost: {self._lost}")

    def check(self) -> None:
        """Confirm with Redis that this run still holds the lease (right before a commit)."""
        self.ensure()
        try:
            owned = self._lock.owned()
        except RedisError as exc:
            raise LeaseError(f"training lease {self.key} cannot be confirmed: {exc}") from exc
        if not owned:
            self._lose("not held by this run any more")
            self.ensure()

    def held(self) -> bool:
        try:
            self.check()
        except LeaseError:
            return False
        return True

    # ------------------------------------------------------------------ renewal
    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            log.error("training lease %s lost: %s", self.key, why)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.interval):
            if _parent_pid is not None and os.getppid() != _parent_pid:
                self._orphaned()
            if self._lost is None:
                self._renew()

    def _renew(self) -> None:
        try:
            self._lock.reacquire()  # TTL back to full, only if the token is still ours
        except LockNotOwnedError:
            self._lose("taken over or expired")
            return
        except (LockError, RedisError) as exc:
            if time.monotonic() - self._confirmed > self.ttl:
                self._lose(f"not confirmed for {self.ttl:.0f} s ({exc})")
            return
        self._confirmed = time.monotonic()
        for callback in list(self._renewed):
            try:
                callback()
            except Exception:  # a bookkeeping failure must not stop the renewals
                log.exception("training lease %s: renewal callback failed", self.key)

    def _orphaned(self) -> None:
        log.error(
            "work horse %d: worker %s is gone; giving training lease %s back and exiting",
            os.getpid(), _parent_pid, self.key,
        )  # fmt: skip
        try:
            self._lock.release()
        except (LockError, RedisError):
            pass
        logging.shutdown()
        os._exit(ORPHAN_EXIT_CODE)  # no commit, no RQ bookkeeping: the live workers own the job now
