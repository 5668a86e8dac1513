"""Failure records of fine-tuning jobs: a Redis list per project that outlives the jobs.

RQ keeps one job per id and every run of a project reuses ``<KEY_PREFIX>-finetune-<project>``, so a
failed job's own record (its hash, its FailedJobRegistry entry) goes when the next run is
enqueued.  Every failed attempt is therefore also pushed to ``<KEY_PREFIX>:failures:<project>``
(newest first, the last :data:`HISTORY_LENGTH` kept, no expiry), from whichever place sees it:

* the job's ``on_failure`` callback (:func:`record_failure`): an exception in the work horse
  (timeout, lost lease, bad data...) and a job RQ finds abandoned (worker and horse dead);
* the worker's ``work_horse_killed_handler`` (:func:`record_killed_horse`): a horse killed under a
  live worker (the kernel's OOM killer, ``kill -9``);
* :func:`archive_failed_job`, right before ``request_training`` replaces a failed job.

One attempt is recorded once (by job id and start time).  A record::

    {"job", "project", "at" (epoch s), "started" (ISO time or null), "kind" (exception, abandoned,
     killed), "error", "phase", "step", "steps", "worker", "retries_left"}
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from types import TracebackType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import AbandonedJobError
from rq.job import Job

from backend.settings import Settings, get_settings

__all__ = [
    "HISTORY_LENGTH",
    "archive_failed_job",
    "failure_history",
    "failures_key",
    "record_failure",
    "record_killed_horse",
]

log = logging.getLogger(__name__)

HISTORY_LENGTH = 50
MAX_ERROR_CHARS = 2000
_DEDUP_WINDOW = 10  # an attempt is looked up among this many newest records before it is added


def failures_key(settings: Settings, project_id: int) -> str:
    return f"{settings.key_prefix}:failures:{project_id}"


def failure_history(project_id: int, settings: Settings, connection: Redis, limit: int = 10) -> list[dict]:
    """The project's newest failure records first."""
    rows = connection.lrange(failures_key(settings, project_id), 0, limit - 1)
    return [json.loads(r) for r in rows]


def _key_of(job: Job) -> str | None:
    meta = job.get_meta(refresh=False)
    if meta.get("failure_log"):
        return str(meta["failure_log"])
    if "project" in meta:  # a job enqueued before failure logs were named in its meta
        return failures_key(get_settings(), int(meta["project"]))
    return None


def _record(job: Job, connection: Redis, kind: str, error: str) -> None:
    try:
        job.get_meta(refresh=True)  # the phase and step the work horse reported last
    except RedisError:
        pass
    key = _key_of(job)
    if key is None:
        return
    meta = job.get_meta(refresh=False)
    raw = connection.hget(job.key, "started_at")  # as the horse stored it: the attempt's identity
    started = raw.decode() if raw else None
    record = {
        "job": job.id, "project": meta.get("project"), "at": round(time.time(), 3), "started": started,
        "kind": kind, "error": error[:MAX_ERROR_CHARS], "phase": meta.get("phase"), "step": meta.get("step"),
        "steps": meta.get("steps"), "worker": job.worker_name, "retries_left": job.retries_left,
    }  # fmt: skip
    for row in connection.lrange(key, 0, _DEDUP_WINDOW - 1):
        seen = json.loads(row)
        if seen.get("job") == job.id and seen.get("started") == started:
            return
    with connection.pipeline() as pipe:
        pipe.lpush(key, json.dumps(record, default=str))
        pipe.ltrim(key, 0, HISTORY_LENGTH - 1)
        pipe.execute()
    log.warning("job %s failed (%s): %s", job.id, kind, record["error"])


def record_failure(
    job: Job,
    connection: Redis,
    exc_type: type[BaseException],
    exc_value: BaseException,
    traceback: TracebackType | None,
) -> None:
    """RQ ``on_failure`` callback of every fine-tuning job (work horse, or RQ's abandoned-job cleanup)."""
    if issubclass(exc_type, AbandonedJobError):
        _record(
            job,
            connection,
            "abandoned",
            "AbandonedJobError: no heartbeat from its worker (worker and horse gone)",
        )
    else:
        _record(job, connection, "exception", f"{exc_type.__name__}: {exc_value}")


def record_killed_horse(job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
    """RQ ``work_horse_killed_handler``: the worker saw its work horse die without an answer."""
    if os.WIFSIGNALED(ret_val):
        sig = os.WTERMSIG(ret_val)
        try:
            how = f"killed by {signal.Signals(sig).name}"
        except ValueError:
            how = f"killed by signal {sig}"
    else:
        how = f"exited with status {os.WEXITSTATUS(ret_val)}"
    try:
        _record(job, job.connection, "killed", f"work horse {retpid} {how}")
    except RedisError as exc:
        log.error("job %s: work horse %s; failure not recorded: %s", job.id, how, exc)


def archive_failed_job(job: Job, connection: Redis) -> None:
    """Record a failed job's last failure (if nobody did) before its id is reused."""
    result = job.latest_result()
    lines = (result.exc_string or "").strip().splitlines() if result is not None else []
    _record(job, connection, "failed", lines[-1] if lines else "failed (no record of why)")
