"""Fine-tuning jobs on RQ: one pending job per project, durable requests, progress, schedules.

* Every project has one deterministic job id, ``<KEY_PREFIX>-finetune-<project>``.  :func:`request_training`
  (under a short Redis lock) leaves a queued job alone, so a burst of webhooks collapses into one
  job; a finished or failed job of that id is replaced by a fresh one; a *running* job is not
  disturbed: the request stays in the store's outbox, and the running job picks it up as a
  follow-up round when it finishes its current one (or the next flush enqueues it).
* Requests go through the store's outbox (SQLite): if Redis is down when a webhook arrives, the
  correction and the request are already on disk and :func:`flush_outbox` hands them to Redis
  later (next webhook, worker start and every ``OUTBOX_POLL_SECONDS`` in the worker, the schedule,
  or ``python -m backend.jobs flush``).
* Jobs get ``Retry(max=JOB_RETRIES)`` and ``job_timeout=JOB_TIMEOUT``; progress (phase, step,
  steps, loss, eta_s) is kept in ``job.meta`` via :func:`progress_reporter`, and each round ends
  with its outcome there (decision, accepted, reasons, version, label_studio).  Phase ``load``
  starts a round: the previous round's progress and outcome fields are dropped then, so a reader
  never sees round 1's step or decision next to round 2's phase.  ``python -m backend.jobs status``
  shows the meta and the rounds of a finished job.
* Dead jobs: a job whose worker stopped sending heartbeats (every ``JOB_HEARTBEAT_SECONDS``, see
  :mod:`backend.worker`) for 3 heartbeats is abandoned; :func:`fail_dead_jobs` (RQ's registry
  cleanup) retries it or, with no retries left, fails it.  Live workers run it every
  ``OUTBOX_POLL_SECONDS``; :func:`request_training` and :func:`job_status` run it too, so a reader
  never sees a dead job as ``started``.  Every failed attempt is recorded in the project's failure
  history (:mod:`backend.job_history`), which outlives the job's id being reused.
* Scheduled retraining uses RQ's own cron (``rq.cron.CronScheduler``): ``RETRAIN_CRON`` (cron
  expression, local time) or ``RETRAIN_INTERVAL`` (seconds) runs :func:`scheduled_retrain`, which
  requests training for every project with corrections newer than its last job.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import LockError, RedisError
from rq import Callback, Queue, Retry, get_current_job
from rq.cron import CronScheduler
from rq.exceptions import DuplicateJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty

from backend.job_history import archive_failed_job, failure_history, failures_key, record_failure
from backend.settings import Settings, get_settings
from backend.store import CorrectionStore, open_store

log = logging.getLogger(__name__)

JOB_FUNCTION = "backend.finetune.run_finetune_job"
PENDING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.CREATED}
CLEANUP_LOCK_SECONDS = 60
RESULT_TTL = 7 * 86_400  # keep a finished job's result and meta for a week (for /jobs views)
PROGRESS_FIELDS = ("step", "steps", "loss", "eta_s")
ROUND_FIELDS = (*PROGRESS_FIELDS, "decision", "accepted", "reasons", "version", "label_studio")
ROUND_START = "load"  # the first phase of every round (see the module doc)


def job_id(project_id: int, settings: Settings) -> str:
    """``<KEY_PREFIX>-finetune-<project>``: RQ's job keys are global to a Redis database, so two
    deployments sharing one (each with its own KEY_PREFIX and QUEUE_NAME) never share a job id."""
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", settings.key_prefix)
    if prefix != settings.key_prefix:  # "roi:a" and "roi_a" must not meet either
        prefix += "-" + hashlib.sha1(settings.key_prefix.encode()).hexdigest()[:8]
    return f"{prefix}-finetune-{project_id}"


LEGACY_JOB_ID = "finetune-{project}"  # the id before KEY_PREFIX was part of it: still honoured


_clients: dict[tuple[str, bool], Redis] = {}


def redis_connection(settings: Settings, fast: bool = False) -> Redis:
    """Redis client for ``REDIS_URL`` (one connection pool per URL and kind, reused).  ``fast``: short
    timeouts for the webhook path, which must answer within Label Studio's 1 s even when Redis is
    unreachable; the other kind has no read timeout (workers block on the queue)."""
    key = (settings.redis_url, fast)
    client = _clients.get(key)
    if client is None:
        if fast:
            client = Redis.from_url(settings.redis_url, socket_connect_timeout=0.3, socket_timeout=0.5)
        else:
            client = Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
        _clients[key] = client
    return client


def training_queue(settings: Settings, connection: Redis) -> Queue:
    return Queue(settings.queue_name, connection=connection)


def fail_dead_jobs(queue: Queue) -> bool:
    """RQ's abandoned-job recovery for the queue: a started job whose heartbeat expired is retried
    (retries left) or failed, and its ``on_failure`` callback records the failure.  Returns False
    when another process is cleaning the queue right now."""
    # RQ's maintenance key: one cleaner at a time (two would both retry a dead job, which would then
    # run twice); our hold is short, so a killed holder delays the next round by a minute at most.
    if not queue.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=CLEANUP_LOCK_SECONDS):
        return False
    try:
        # TimerDeathPenalty: the callback's time limit works off the main thread (the worker's poll).
        StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty).cleanup()
    finally:
        queue.release_maintenance_lock()
    return True


def _forget_expired_executions(job: Job) -> None:
    """Drop the job's executions whose hash expired: RQ lists one for 60 s after that (a job found
    abandoned), and ``Job.delete`` raises ValueError on it."""
    registry = job.execution_registry
    for execution_id in registry.get_execution_ids():
        if not job.connection.exists(Execution(execution_id, job.id, job.connection).key):
            job.connection.zrem(registry.key, execution_id)


@dataclass
class Outcome:
    """``state``: ``enqueued`` (new job), ``queued`` (collapsed into the pending job) or
    ``running`` (a job is running; the request waits in the outbox for its follow-up round)."""

    state: str
    job_id: str


def request_training(project_id: int, settings: Settings, connection: Redis, reason: str = "") -> Outcome:
    """Make sure a fine-tuning job for the project will run (see module doc).  Raises RedisError."""
    jid = job_id(project_id, settings)
    queue = training_queue(settings, connection)
    lock = connection.lock(f"{settings.key_prefix}:lock:{jid}", timeout=10, blocking_timeout=5)
    if not lock.acquire():
        raise LockError(f"could not lock {jid}")
    try:
        fail_dead_jobs(queue)
        legacy = _legacy_job(project_id, settings, connection)
        legacy_status = legacy.get_status(refresh=False) if legacy is not None else None
        if legacy is not None and legacy_status in (*PENDING, JobStatus.STARTED):
            return Outcome("running" if legacy_status == JobStatus.STARTED else "queued", legacy.id)
        job = queue.fetch_job(jid)
        status = job.get_status(refresh=False) if job is not None else None
        if status in PENDING:
            return Outcome("queued", jid)
        if status == JobStatus.STARTED:
            return Outcome("running", jid)
        if job is not None:
            if status in (JobStatus.FAILED, JobStatus.STOPPED):
                archive_failed_job(job, connection)
            _forget_expired_executions(job)
            job.delete()  # finished/failed/stopped: the id is reused for the next run
        try:
            queue.enqueue(
                JOB_FUNCTION,
                kwargs={"project_id": project_id, "reason": reason},
                job_id=jid,
                unique=True,
                job_timeout=settings.job_timeout,
                retry=Retry(max=settings.job_retries) if settings.job_retries else None,
                result_ttl=RESULT_TTL,
                failure_ttl=RESULT_TTL,
                on_failure=Callback(record_failure),
                description=f"fine-tune project {project_id} ({reason or 'requested'})",
                meta={
                    "project": project_id,
                    "reason": reason,
                    "phase": "queued",
                    "requested": time.time(),
                    "failure_log": failures_key(settings, project_id),
                },
            )
        except DuplicateJobError:
            return Outcome("queued", jid)
        log.info("enqueued %s (%s)", jid, reason)
        return Outcome("enqueued", jid)
    finally:
        try:
            lock.release()
        except LockError:
            pass  # expired while we worked: harmless, the enqueue itself is atomic


def flush_outbox(
    settings: Settings, store: CorrectionStore | None = None, connection: Redis | None = None
) -> dict[int, str]:
    """Hand every pending request of the outbox to Redis.  Returns ``{project: state}`` where state
    is an :class:`Outcome` state or ``error: ...``; never raises for Redis trouble (requests stay)."""
    store = store or open_store(settings.data_dir)
    rows = store.pending_requests()
    if not rows:
        return {}
    connection = connection or redis_connection(settings, fast=True)
    done: dict[int, str] = {}
    for row in rows:
        try:
            outcome = request_training(row.project_id, settings, connection, row.reason)
        except (RedisError, OSError) as exc:
            store.note_attempt(row.project_id, f"{type(exc).__name__}: {exc}")
            log.warning("training request for project %s kept in the outbox: %s", row.project_id, exc)
            done[row.project_id] = f"error: {exc}"
            continue
        if outcome.state != "running":
            store.resolve_request(row.project_id, row.requested_at)
        done[row.project_id] = outcome.state
    return done


def _save_meta(job: Job | None, meta: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    if job is None:
        return
    for key in drop:
        job.meta.pop(key, None)
    job.meta.update(meta)
    try:
        job.save_meta()
    except RedisError as exc:  # progress is for readers; a Redis blip must not end the training
        log.warning("job %s: progress not saved: %s", job.id, exc)


def progress_reporter(
    phase: str = "train", extra: dict[str, Any] | None = None, guard: Callable[[], None] | None = None
) -> Callable[[dict], None]:
    """A ``model.training.train`` progress callback that saves ``job.meta`` (and logs).  ``guard``
    runs first: it raises to stop the training (a run that lost its lease)."""
    job = get_current_job()

    def report(entry: dict) -> None:
        if guard is not None:
            guard()
        meta = {"phase": phase, **(extra or {})}
        meta.update({k: entry[k] for k in ("step", "steps", "loss", "eta_s") if k in entry})
        log.info("progress", extra=meta)
        _save_meta(job, meta)

    return report


def set_phase(phase: str, **fields: Any) -> None:
    """Record the job's current phase (``load``, ``train``, ``evaluate``, ``commit``, ``done``) in
    meta; ``load`` starts a round and drops the previous round's fields."""
    log.info("phase", extra={"phase": phase, **fields})
    _save_meta(get_current_job(), {"phase": phase, **fields}, ROUND_FIELDS if phase == ROUND_START else ())


def _fetch(jid: str, connection: Redis) -> Job | None:
    try:
        return Job.fetch(jid, connection=connection)
    except Exception:  # NoSuchJobError, or a job hash an older version wrote
        return None


def _legacy_job(project_id: int, settings: Settings, connection: Redis) -> Job | None:
    """The project's job under the id it had before KEY_PREFIX was part of it, when it is of this
    deployment's queue (an upgrade may leave one queued or running)."""
    job = _fetch(LEGACY_JOB_ID.format(project=project_id), connection)
    return job if job is not None and job.origin == settings.queue_name else None


def job_status(project_id: int, settings: Settings, connection: Redis) -> dict[str, Any] | None:
    """Status and progress of the project's job and its failure history, newest first (``None``:
    neither is known).  Dead jobs are failed first, so ``started`` means a live run."""
    fail_dead_jobs(training_queue(settings, connection))
    failures = failure_history(project_id, settings, connection)
    job = _fetch(job_id(project_id, settings), connection) or _legacy_job(project_id, settings, connection)
    if job is None:
        return {"id": None, "status": None, "meta": {}, "failures": failures} if failures else None
    status = job.get_status().value
    return {
        "id": job.id,
        "status": status,
        "meta": job.get_meta(refresh=False),
        "rounds": _rounds(job) if status == JobStatus.FINISHED.value else [],
        "failures": failures,
    }


def _rounds(job: Job) -> list[dict[str, Any]]:
    """The rounds a finished job returned (version, decision, parent, gate with its reasons, data)."""
    try:
        result = job.return_value()
    except Exception:  # a result an older version wrote, or one that expired
        return []
    return list(result.get("rounds", [])) if isinstance(result, dict) else []


def queue_figures(settings: Settings) -> dict[str, int | None]:
    """Queued and running fine-tuning jobs (``None`` when Redis cannot be reached: a metrics scrape
    must not fail or wait on it) and training requests waiting in the outbox."""
    figures: dict[str, int | None] = {"queued": None, "running": None}
    try:
        queue = training_queue(settings, redis_connection(settings, fast=True))
        figures = {"queued": queue.count, "running": queue.started_job_registry.count}
    except (RedisError, OSError):
        pass
    figures["outbox"] = len(open_store(settings.data_dir).pending_requests())
    return figures


# ---------------------------------------------------------------------- scheduled retraining
def scheduled_retrain(min_corrections: int = 1) -> dict[int, str]:
    """Cron job: request training for every project with at least ``min_corrections`` corrections
    newer than its last job, then flush (runs on a worker)."""
    settings = get_settings()
    store = open_store(settings.data_dir)
    for project in store.projects():
        new = store.new_corrections(project)
        if new >= min_corrections:
            store.request_training(project, f"schedule: {new} new corrections")
    return flush_outbox(settings, store, redis_connection(settings))


def build_cron(settings: Settings, connection: Redis) -> CronScheduler | None:
    """A CronScheduler for ``RETRAIN_CRON`` / ``RETRAIN_INTERVAL`` (``None`` when both are off)."""
    if not settings.retrain_cron and not settings.retrain_interval:
        return None
    if settings.retrain_cron and settings.retrain_interval:
        raise ValueError("set RETRAIN_CRON or RETRAIN_INTERVAL, not both")
    cron = CronScheduler(connection=connection, logging_level=settings.log_level)
    cron.register(
        scheduled_retrain,
        queue_name=settings.queue_name,
        cron=settings.retrain_cron or None,
        interval=settings.retrain_interval or None,
        job_timeout=300,
        name=f"{settings.key_prefix}-scheduled-retrain",
    )
    return cron


def preannotate_cli(args: argparse.Namespace, settings: Settings) -> int:
    """``python -m backend.jobs preannotate``: enqueue the chunk jobs, then follow them with a tqdm
    bar (unless ``--detach``); exit 1 when a task failed or a chunk job did not finish."""
    from backend import preannotate  # the model stack, only for this command
    from backend.label_studio import LabelStudioError

    selection = preannotate.Selection(
        tasks=tuple(int(t) for t in args.tasks.split(",") if t.strip()) if args.tasks else (),
        view=args.view,
    )
    connection = redis_connection(settings)
    try:
        status = preannotate.start_run(
            settings, connection, args.project, selection, args.chunk, selection.tasks or None
        )
    except LabelStudioError as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps({k: status[k] for k in ("run", "project", "selection", "total", "jobs")}))
    if args.detach or not status["total"]:
        return 0
    queue = preannotate.preannotate_queue(settings, connection)
    status = preannotate.follow_run(
        settings, connection, status["run"], before_poll=lambda: fail_dead_jobs(queue)
    )
    print(json.dumps(status, indent=2))
    finished = status["jobs"].get(JobStatus.FINISHED.value) == sum(status["jobs"].values())
    return 0 if finished and not status["failed"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fine-tuning jobs: flush the outbox, request, status")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("flush", help="hand pending training requests to Redis")
    tr = sub.add_parser("train", help="request a fine-tuning job for a project")
    tr.add_argument("project", type=int)
    st = sub.add_parser(
        "status", help="show a project's jobs (fine-tuning, latest pre-annotation) and store counters"
    )
    st.add_argument("project", type=int)
    st.add_argument("--run", help="a pre-annotation run id (default: the project's latest)")
    pa = sub.add_parser("preannotate", help="pre-annotate a project's tasks as RQ chunk jobs")
    pa.add_argument("--project", type=int, required=True)
    which = pa.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every task of the project (the default)")
    which.add_argument("--tasks", help="comma-separated task ids")
    which.add_argument("--view", type=int, help="the tasks of a Data Manager view (tab) id")
    pa.add_argument("--chunk", type=int, help="tasks per job (default PREANNOTATE_CHUNK_TASKS)")
    pa.add_argument("--detach", action="store_true", help="enqueue and exit (no progress bar)")
    args = ap.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level)
    if args.cmd == "preannotate":
        return preannotate_cli(args, settings)
    store = open_store(settings.data_dir)
    if args.cmd == "train":
        store.request_training(args.project, "cli")
    if args.cmd in ("flush", "train"):
        print(json.dumps(flush_outbox(settings, store, redis_connection(settings)), indent=2))
    else:
        from backend.preannotate import latest_run, run_status

        connection = redis_connection(settings)
        status = job_status(args.project, settings, connection)
        run = args.run or latest_run(settings, connection, args.project)
        report = {"job": status, "preannotate": run_status(settings, connection, run) if run else None}
        report["store"] = store.project_status(args.project)
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
