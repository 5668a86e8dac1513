"""``python -m backend.worker``: the fine-tuning worker.

* removes staging folders left by killed jobs (run **one** training worker per model registry: the
  registry has one ``current`` pointer and jobs are meant to run one after another);
* hands training requests stored while Redis was away to RQ (the outbox), at start and then every
  ``OUTBOX_POLL_SECONDS`` (this also enqueues follow-ups that arrived as a job was finishing);
* starts RQ's cron scheduler in a child process when ``RETRAIN_CRON`` or ``RETRAIN_INTERVAL`` is set;
* runs an RQ worker on ``QUEUE_NAME`` (each job in a forked work horse, so ``JOB_TIMEOUT`` can kill
  it and a crash cannot take the worker down).

Options: ``--burst`` (exit when the queue is empty), ``--no-cron``, ``--cron-only``;
``--health worker|scheduler`` exits 0 when a worker (or cron scheduler) of this host is registered
in Redis (the docker-compose healthchecks).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import socket
import sys
import threading

from redis.exceptions import RedisError
from rq import Worker
from rq.cron import CronScheduler

from backend.jobs import build_cron, flush_outbox, redis_connection, training_queue
from backend.observability import JsonFormatter
from backend.registry import ModelRegistry, RegistryError
from backend.settings import Settings, get_settings
from backend.store import open_store

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


def _pump(settings: Settings, stop: threading.Event) -> None:
    store = open_store(settings.data_dir)
    while not stop.wait(settings.outbox_poll_seconds):
        try:
            flush_outbox(settings, store)
        except Exception:  # never let housekeeping kill the worker
            log.exception("outbox flush failed")


def start_outbox_pump(settings: Settings) -> threading.Event:
    """Flush the outbox in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(target=_pump, args=(settings, stop), name="outbox-pump", daemon=True).start()
    return stop


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
    args = ap.parse_args(argv)
    settings = get_settings()
    json_logging(settings.log_level)
    if args.health:
        return 0 if healthy(settings, args.health) else 1
    if args.cron_only:
        run_cron(settings)
        return 0
    prepare(settings)
    stop = start_outbox_pump(settings)
    cron_proc = None
    if not args.no_cron and not args.burst and (settings.retrain_cron or settings.retrain_interval):
        cron_proc = multiprocessing.get_context("fork").Process(
            target=run_cron, args=(settings,), name="retrain-cron", daemon=True
        )
        cron_proc.start()
    connection = redis_connection(settings)
    worker = Worker([training_queue(settings, connection)], connection=connection)
    try:
        worker.work(burst=args.burst, logging_level=settings.log_level)
    finally:
        stop.set()
        if cron_proc is not None:
            cron_proc.terminate()
            cron_proc.join(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
