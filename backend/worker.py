"""``python -m backend.worker``: the fine-tuning worker.

* removes staging folders left by killed jobs (run **one** training worker per model registry: the
  registry has one ``current`` pointer and jobs are meant to run one after another);
* every ``OUTBOX_POLL_SECONDS`` (and at start), in a thread that outlives Redis outages: fails or
  retries jobs whose worker died (:func:`backend.jobs.fail_dead_jobs`), then hands training
  requests stored while Redis was away to RQ (the outbox; this also enqueues follow-ups that
  arrived as a job was finishing);
* starts RQ's cron scheduler in a child process when ``RETRAIN_CRON`` or ``RETRAIN_INTERVAL`` is set;
* runs a :class:`TrainingWorker` on ``QUEUE_NAME`` (each job in a forked work horse, so
  ``JOB_TIMEOUT`` can kill it and a crash cannot take the worker down), and starts it again when
  RQ ends its work loop on a Redis error (RQ quits on any error outside its dequeue, e.g. when a
  Redis restart catches it finishing a job): the worker process, and so the outbox poll, stays up.

Liveness: the worker sends a job heartbeat every ``JOB_HEARTBEAT_SECONDS``; a job without one for
3 x ``JOB_HEARTBEAT_SECONDS`` is dead, and any live worker fails (or retries) it within one more
``OUTBOX_POLL_SECONDS``.  A work horse whose worker died stops by itself (:mod:`backend.lease`).

Options: ``--burst`` (exit when the queue is empty), ``--no-cron``, ``--cron-only``,
``--preannotate`` (run pre-annotation chunk jobs instead, :mod:`backend.preannotate`);
``--health worker|scheduler`` exits 0 when a worker (or cron scheduler) of this host is registered
in Redis (the docker-compose healthchecks).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from typing import Any

from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, Worker
from rq.cron import CronScheduler
from rq.executions import Execution
from rq.job import Job
from rq.worker import WorkerStatus

from backend.job_history import record_killed_horse
from backend.jobs import build_cron, fail_dead_jobs, flush_outbox, redis_connection, training_queue
from backend.lease import watch_parent
from backend.observability import JsonFormatter
from backend.registry import ModelRegistry, RegistryError
from backend.settings import Settings, get_settings
from backend.store import open_store

__all__ = [
    "FORK_GUARD",
    "PreannotateWorker",
    "TrainingWorker",
    "healthy",
    "json_logging",
    "main",
    "poll_once",
    "prepare",
    "run_cron",
    "run_preannotate_worker",
    "run_worker",
    "start_poll",
]

log = logging.getLogger("backend.worker")


def json_logging(level: str) -> None:
    """JSON lines on stderr for every logger of the process (RQ's and its cron scheduler's too: RQ
    adds no handler of its own when the root logger has one), as the backend writes them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def prepare(settings: Settings) -> dict:
    """Start-up housekeeping: clean staging, seed the registry, flush the outbox."""
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    removed = registry.clean_staging()
    try:
        current = registry.ensure_initialized()
    except RegistryError as exc:  # jobs will fail clearly until a model is there; keep serving the queue
        log.error("model registry not ready: %s", exc)
        current = None
    flushed = flush_outbox(settings, open_store(settings.data_dir), redis_connection(settings))
    log.info("worker ready: current=%s staging_removed=%d outbox=%s", current, removed, flushed)
    return {"current": current, "staging_removed": removed, "outbox": flushed}


# Work horses are forked from a process whose poll thread (:func:`poll_once`) works in SQLite and
# Redis.  A fork while that thread holds a lock (SQLite's own mutexes, an open connection) hands the
# horse that lock held forever: the retried job's horse waited on a futex and never trained.  So the
# poll and the fork never overlap.
FORK_GUARD = threading.Lock()


class TrainingWorker(Worker):
    """RQ's forking worker with the fine-tuning jobs' liveness rules (see the module doc).

    * job heartbeats every ``job_monitoring_interval`` (``JOB_HEARTBEAT_SECONDS``); a job's
      execution expires 2 intervals after the next one is due (RQ's own margin is 60 s);
    * a Redis error while watching the work horse is logged, not fatal (RQ would end its work loop
      and leave the horse unwatched);
    * the work horse watches this worker (:func:`backend.lease.watch_parent`);
    * :attr:`stop_requested` tells a requested stop (SIGTERM/SIGINT) from a loop that ended on an error;
    * a work horse is never forked while the poll thread is inside :func:`poll_once` (:data:`FORK_GUARD`).
    """

    stop_requested = False

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        interval = int(self.job_monitoring_interval)
        if job.timeout and job.timeout > 0:
            return max(1, int(min(job.timeout - working_time, interval))) + 2 * interval
        return 3 * interval

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        try:
            super().maintain_heartbeats(job, execution)
        except (RedisError, OSError) as exc:
            log.warning("job %s: heartbeat not sent, Redis unreachable: %s", job.id, exc)

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        with FORK_GUARD:
            super().fork_work_horse(job, queue)

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        if FORK_GUARD.locked():  # the horse's copy, held by its parent's fork: no thread here holds it
            FORK_GUARD.release()
        watch_parent(os.getppid())
        super().main_work_horse(job, queue)

    def request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        super().request_stop(signum, frame)


class PreannotateWorker(SimpleWorker):
    """RQ worker for pre-annotation chunk jobs (:mod:`backend.preannotate`): runs them in its own
    process, so the model stays loaded between jobs, and sends the job heartbeat from a thread every
    ``job_monitoring_interval``: a killed worker's chunk is abandoned after 3 intervals and retried
    by any live worker's poll."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return 3 * int(self.job_monitoring_interval)

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.job_monitoring_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except (RedisError, OSError) as exc:  # the next interval tries again
                    log.warning("job %s: heartbeat not sent, Redis unreachable: %s", job.id, exc)

        thread = threading.Thread(target=beat, name="job-heartbeat", daemon=True)
        thread.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            thread.join()
        self.set_state(WorkerStatus.IDLE)


def run_preannotate_worker(settings: Settings, burst: bool = False) -> None:
    """Run a :class:`PreannotateWorker` on ``PREANNOTATE_QUEUE``; every ``OUTBOX_POLL_SECONDS`` a
    thread fails or retries the chunks of dead workers (:func:`backend.jobs.fail_dead_jobs`)."""
    from backend.preannotate import preannotate_queue  # the model stack, only in this kind of worker

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(settings.outbox_poll_seconds):
            try:
                fail_dead_jobs(preannotate_queue(settings, redis_connection(settings, fast=True)))
            except Exception:  # never let housekeeping kill the worker
                log.exception("dead-job check failed")

    threading.Thread(target=poll, name="preannotate-poll", daemon=True).start()
    try:
        connection = redis_connection(settings)
        fail_dead_jobs(preannotate_queue(settings, connection))
        worker = PreannotateWorker(
            [preannotate_queue(settings, connection)], connection=connection,
            job_monitoring_interval=settings.job_heartbeat_seconds,
        )  # fmt: skip
        worker.work(burst=burst, logging_level=settings.log_level)
    finally:
        stop.set()


def poll_once(settings: Settings) -> None:
    """One round of the worker's poll: fail (or retry) dead jobs, then flush the outbox (never while
    a work horse is being forked, :data:`FORK_GUARD`)."""
    with FORK_GUARD:
        try:
            fail_dead_jobs(training_queue(settings, redis_connection(settings, fast=True)))
        except (RedisError, OSError) as exc:
            log.warning("dead-job check skipped, Redis unreachable: %s", exc)
        flush_outbox(settings, open_store(settings.data_dir))


def _poll(settings: Settings, stop: threading.Event) -> None:
    while not stop.wait(settings.outbox_poll_seconds):
        try:
            poll_once(settings)
        except Exception:  # never let housekeeping kill the worker
            log.exception("worker poll failed")


def start_poll(settings: Settings) -> threading.Event:
    """Run :func:`poll_once` every ``OUTBOX_POLL_SECONDS`` in a daemon thread; set the returned event
    to stop it."""
    stop = threading.Event()
    threading.Thread(target=_poll, args=(settings, stop), name="worker-poll", daemon=True).start()
    return stop


def run_worker(settings: Settings, burst: bool = False) -> None:
    """Run a :class:`TrainingWorker` until a stop is requested (or the queue is empty, ``burst``);
    a work loop that RQ ended on an error (Redis away) is started again, with a growing pause."""
    pause = 1.0
    stop = threading.Event()
    while True:
        worker = None
        try:
            connection = redis_connection(settings)
            worker = TrainingWorker(
                [training_queue(settings, connection)], connection=connection,
                job_monitoring_interval=settings.job_heartbeat_seconds,
                work_horse_killed_handler=record_killed_horse,
            )  # fmt: skip
            worker.work(burst=burst, logging_level=settings.log_level)
        except (RedisError, OSError) as exc:
            log.error("worker: Redis unreachable: %s", exc)
        if worker is not None and worker.horse_pid:
            worker.kill_horse()  # nobody would watch it; its job is failed or retried as dead
            worker.wait_for_horse()
        if burst or (worker is not None and worker.stop_requested):
            return
        log.warning("worker: RQ's work loop ended (Redis unreachable?); starting again in %.0f s", pause)
        for sig in (signal.SIGTERM, signal.SIGINT):  # RQ's handlers belong to the finished loop
            signal.signal(sig, lambda *_: stop.set())
        if stop.wait(pause):
            return
        pause = min(2 * pause, 30.0)


def run_cron(settings: Settings) -> None:
    """Run RQ's cron scheduler (blocking) for the retraining schedule."""
    cron = build_cron(settings, redis_connection(settings))
    if cron is None:
        log.info("no RETRAIN_CRON / RETRAIN_INTERVAL: no scheduled retraining")
        return
    cron.start()


def healthy(settings: Settings, role: str) -> bool:
    """Is a ``worker`` (on ``QUEUE_NAME``) or a cron ``scheduler`` of this host registered in Redis?"""
    connection = redis_connection(settings, fast=True)
    host = socket.gethostname()
    try:
        if role == "scheduler":
            return any(s.hostname == host for s in CronScheduler.all(connection))
        queue = training_queue(settings, connection)
        return any(w.hostname == host for w in Worker.all(connection=connection, queue=queue))
    except (RedisError, OSError) as exc:
        log.error("health check: Redis unreachable: %s", exc)
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    ap.add_argument("--no-cron", action="store_true", help="do not start the retraining scheduler")
    ap.add_argument("--cron-only", action="store_true", help="run only the retraining scheduler")
    ap.add_argument("--health", choices=["worker", "scheduler"], help="check registration and exit")
    ap.add_argument(
        "--preannotate", action="store_true", help="run pre-annotation chunk jobs (PREANNOTATE_QUEUE) instead"
    )
    args = ap.parse_args(argv)
    settings = get_settings()
    json_logging(settings.log_level)
    if args.health:
        return 0 if healthy(settings, args.health) else 1
    if args.preannotate:
        run_preannotate_worker(settings, burst=args.burst)
        return 0
    if args.cron_only:
        run_cron(settings)
        return 0
    prepare(settings)
    stop = start_poll(settings)
    cron_proc = None
    if not args.no_cron and not args.burst and (settings.retrain_cron or settings.retrain_interval):
        cron_proc = multiprocessing.get_context("fork").Process(
            target=run_cron, args=(settings,), name="retrain-cron", daemon=True
        )
        cron_proc.start()
    try:
        run_worker(settings, burst=args.burst)
    finally:
        stop.set()
        if cron_proc is not None:
            cron_proc.terminate()
            cron_proc.join(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
