"""Worker crashes, on real Redis and real RQ worker processes killed with SIGKILL.

* Only one run of a project's job trains at a time (a Redis lease the run renews), and a run that
  no longer holds the lease never commits; a work horse orphaned by its worker's death stops.
* A job whose worker and work horse died is failed within a bound, and its failure record
  survives a re-enqueue (``python -m backend.jobs train``).
* A crash leaves the project's training watermark where it was.
* The worker drains the outbox after a Redis outage without waiting for the next webhook.

Every worker runs as ``python -m backend.worker`` in a session of its own, so a test can kill the
worker's process group (RQ moves the work horse to a group of its own: it survives as an orphan)
or the whole session (worker and horse).  Each test has its own ``redis-server`` (append-only file,
so it can be stopped and started like a real deployment's); without that binary the tests use
database 12 of the shared Redis and the outage test is skipped.  Tests wait for states (job status
and meta, processes, Redis, the store) with generous deadlines, never for fixed times.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.job import Job

from backend.jobs import job_id, job_status
from backend.jobs import main as jobs_main
from backend.registry import ModelRegistry
from backend.settings import Settings
from backend.store import open_store
from backend.webhooks import handle_webhook
from tests.redis_helpers import job_settings, settings_env
from tools.ls.demo_active_learning import correction_scenes
from tools.ls.payloads import scene_payload, start_training_payload

pytest_plugins = ["tests.redis_fixtures"]  # fixture: use_settings

REPO = Path(__file__).resolve().parent.parent
SHARED_FALLBACK_URL = "redis://127.0.0.1:6379/12"  # only when redis-server cannot be started here
HEARTBEAT = 1  # JOB_HEARTBEAT_SECONDS of these tests: a job silent for 3 s is dead
# TRAIN_STEPS of a run that gets killed: under 40 steps progress is reported after every step (a
# lost lease is noticed at the next one); 39 steps outlast each test's wait after the first report.
LONG_RUN = 39
# TRAIN_STEPS of the run whose worker is killed while a second worker starts: on a quiet machine 39
# steps (about 1 s) ended before the second worker was up, so this run is far longer than any wait.
ORPHAN_RUN = 3000
STARTUP = 600.0  # deadline for a worker to start and reach training on a busy machine, seconds
# A bound plus room for a machine shared with other jobs (a thread may wait seconds for a core).
SLACK = 30.0

T = TypeVar("T")


# ---------------------------------------------------------------------- Redis
@dataclass
class PrivateRedis:
    url: str
    conn: Redis
    folder: Path | None  # the private server's directory (None: shared Redis, cannot be stopped)
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.folder is not None
        port = self.url.rsplit(":", 1)[1].split("/")[0]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", port, "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for(lambda: _pings(self.conn), "redis-server answers", 60)

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file and exits, like a restarted server."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(60)
        self.proc = None


def _pings(conn: Redis) -> bool:
    try:
        return bool(conn.ping())
    except RedisError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def test_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        conn = Redis.from_url(SHARED_FALLBACK_URL)
        if not _pings(conn):
            pytest.skip("neither redis-server nor Redis at 127.0.0.1:6379")
        conn.flushdb()
        yield PrivateRedis(SHARED_FALLBACK_URL, conn, None)
        conn.flushdb()
        return
    folder = tmp_path / "redis"
    folder.mkdir()
    url = f"redis://127.0.0.1:{_free_port()}/0"
    server = PrivateRedis(url, Redis.from_url(url), folder)
    server.start()
    yield server
    if server.proc is not None:
        server.stop()


# ---------------------------------------------------------------------- workers
def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a worker started with ``start_new_session`` and its horse)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
                pids.append(int(entry.name))
    return pids


def _kill_session(sid: int) -> None:
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Workers:
    """``python -m backend.worker`` processes, each in its own session; all killed at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, settings: Settings, name: str, **env: Any) -> subprocess.Popen:
        log = (self.folder / f"worker-{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend.worker", "--no-cron"],
            cwd=REPO,
            env={**os.environ, **settings_env(settings), **{k: str(v) for k, v in env.items()}},
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"worker-{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- worker {n}:\n{self.log(n)[-3000:]}" for n in self.procs)

    def kill_all(self) -> None:
        for proc in self.procs.values():
            _kill_session(proc.pid)
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


@pytest.fixture()
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    yield pool
    pool.kill_all()


def _wait_for(
    check: Callable[[], T], what: str, timeout: float, alive: tuple[subprocess.Popen, ...] = (), logs=None
) -> T:
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds or as soon as
    one of the ``alive`` processes has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        for proc in alive:
            if proc.poll() is not None:
                pytest.fail(f"{what}: worker {proc.pid} exited ({proc.returncode})\n{logs() if logs else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {timeout:.0f} s\n{logs() if logs else ''}")
        time.sleep(0.2)


def _registered(conn: Redis, settings: Settings, proc: subprocess.Popen) -> bool:
    queue = Queue(settings.queue_name, connection=conn)
    return any(w.pid == proc.pid for w in Worker.all(connection=conn, queue=queue))


# ---------------------------------------------------------------------- data and jobs
def _settings(tmp_path: Path, checkpoint: Path, redis: PrivateRedis, **kw: Any) -> Settings:
    return job_settings(
        tmp_path, redis_url=redis.url, default_model=checkpoint, local_files_root=str(tmp_path / "images"),
        train_steps=8, train_batch_size=4, train_max_turns=2, gate_eval_images=3, heldout_min_records=4,
        promote_tolerance=1.0, train_min_corrections=10**6, job_heartbeat_seconds=HEARTBEAT,
        outbox_poll_seconds=0.5, **kw,
    )  # fmt: skip


def _post_corrections(
    settings: Settings, project: int, regions: int = 8, first_id: int = 100
) -> tuple[int, dict[str, Any]]:
    """Reviewer corrections through the webhook; returns the number of corrected regions and the
    last webhook's result."""
    images = Path(settings.local_files_root)
    images.mkdir(parents=True, exist_ok=True)
    total, result = 0, {}
    for i, scene in enumerate(correction_scenes(regions)):
        aid = first_id + i
        scene.image.save(images / f"s{aid}.png")
        payload = scene_payload(
            scene, aid, f"/data/local-files/?d=s{aid}.png", f"2025-06-01T12:00:{i:02d}Z", project
        )
        code, body = handle_webhook(payload, settings)
        assert code == 201, body
        total, result = total + body["result"]["regions"], body["result"]
    return total, result


def _request(settings: Settings, project: int) -> None:
    code, body = handle_webhook(start_training_payload(project), settings)
    assert code == 201 and body["result"]["jobs"] == {project: "enqueued"}, body


def _training_step(job: Job) -> int:
    """The last reported training step (0 until the first progress report of the training loop)."""
    if _status(job) == "failed":
        pytest.fail(f"job {job.id} failed: {job.latest_result().exc_string}")
    meta = job.get_meta(refresh=True)
    return int(meta.get("step") or 0) if meta.get("phase") == "train" else 0


def _start_long_run(
    settings: Settings,
    redis: PrivateRedis,
    workers: Workers,
    project: int,
    name: str = "a",
    steps: int = LONG_RUN,
) -> tuple[subprocess.Popen, Job]:
    """A worker running a long job of ``project``, waited for until its training loop reported."""
    _request(settings, project)
    proc = workers.start(settings, name, TRAIN_STEPS=steps)
    job = Job.fetch(job_id(project, settings), connection=redis.conn)
    _wait_for(lambda: _training_step(job), "training under way", STARTUP, (proc,), workers.logs)
    return proc, job


def _status(job: Job) -> str:
    return job.get_status(refresh=True).value  # the raw RQ status: reading it cleans nothing up


# ---------------------------------------------------------------------- one run at a time
@pytest.mark.slow
def test_orphaned_work_horse_stops_before_commit_and_the_job_runs_once(
    tmp_path: Path, tiny_checkpoint: Path, test_redis: PrivateRedis, workers: Workers, use_settings
):
    """The worker's process group is killed mid-training.  The work horse (its own process group)
    must stop without committing instead of training on as an orphan; another worker then runs the
    abandoned job once: one new version, one final status."""
    settings = _settings(tmp_path, tiny_checkpoint, test_redis, job_retries=1)
    use_settings(settings)
    project = 3
    _post_corrections(settings, project)
    a, job = _start_long_run(settings, test_redis, workers, project, steps=ORPHAN_RUN)
    b = workers.start(settings, "b")  # a short run (TRAIN_STEPS=8) when it gets the job
    _wait_for(
        lambda: _registered(test_redis.conn, settings, b), "second worker up", STARTUP, (b,), workers.logs
    )

    assert _status(job) == "started" and job.get_meta(refresh=True).get("phase") == "train"  # mid-training
    os.killpg(a.pid, signal.SIGKILL)  # the worker's group only: RQ put its horse in another
    a.wait(30)
    assert _session_pids(a.pid), "the work horse should have outlived its worker's process group"
    killed = time.monotonic()
    _wait_for(lambda: not _session_pids(a.pid), "orphaned work horse exits", 3 * HEARTBEAT + SLACK)
    orphan_seconds = time.monotonic() - killed
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    assert registry.version_names() == ["1.0.0"], "the orphan committed a version"

    _wait_for(lambda: _status(job) == "finished", "abandoned job rerun by the other worker", STARTUP, (b,),
              workers.logs)  # fmt: skip
    assert registry.version_names() == ["1.0.0", "1.1.0"]
    meta = job.get_meta(refresh=True)
    assert meta["phase"] == "done" and meta["version"] == "1.1.0" and meta["steps"] == settings.train_steps
    assert json.loads((registry.path("1.1.0") / "version.json").read_text())["parent"] == "1.0.0"
    (failure,) = job_status(project, settings, test_redis.conn)["failures"]
    assert failure["job"] == job.id and failure["kind"] == "abandoned" and "Abandoned" in failure["error"]
    # The killed attempt's record (its ORPHAN_RUN steps, not the rerun's), at the phase the orphan last
    # reported: training, or on a fast machine already past it, stopped at the commit's lease check.
    assert failure["steps"] == ORPHAN_RUN and failure["phase"] in ("train", "evaluate-candidate", "commit")
    assert open_store(settings.data_dir).new_corrections(project) == 0  # committed: watermark moved
    print(f"orphaned horse exited {orphan_seconds:.1f} s after its worker was killed")


@pytest.mark.slow
def test_second_run_never_trains_while_another_run_holds_the_lease(
    tmp_path: Path, tiny_checkpoint: Path, test_redis: PrivateRedis, workers: Workers, use_settings
):
    from backend.lease import TrainingLease

    settings = _settings(tmp_path, tiny_checkpoint, test_redis, job_retries=0)
    use_settings(settings)
    project = 4
    _post_corrections(settings, project)
    other = TrainingLease(test_redis.conn, settings, project)  # another live run of this project
    other.acquire(wait=0)
    other.start_renewing()
    try:
        _request(settings, project)
        proc = workers.start(settings, "a")
        job = Job.fetch(job_id(project, settings), connection=test_redis.conn)
        _wait_for(lambda: _status(job) == "failed", "run refused", STARTUP, (proc,), workers.logs)
        assert other.held()
    finally:
        other.release()
    meta = job.get_meta(refresh=True)
    assert meta["phase"] == "queued" and "step" not in meta  # it never loaded, let alone trained
    (failure,) = job_status(project, settings, test_redis.conn)["failures"]
    assert "LeaseError" in failure["error"] and "held by another run" in failure["error"]
    assert ModelRegistry(settings.model_dir, settings.default_model).version_names() == ["1.0.0"]


@pytest.mark.slow
def test_run_that_lost_its_lease_stops_without_committing(
    tmp_path: Path, tiny_checkpoint: Path, test_redis: PrivateRedis, workers: Workers, use_settings
):
    """The lease is taken over mid-training (it expired while the run stalled and another run took
    it): the run stops at its next heartbeat, commits nothing and leaves no staging folder."""
    from backend.lease import lease_key

    settings = _settings(tmp_path, tiny_checkpoint, test_redis, job_retries=0)
    use_settings(settings)
    project = 5
    _post_corrections(settings, project)
    # Far longer than the heartbeat that notices the loss: 39 steps (about 1 s) sometimes ended first.
    proc, job = _start_long_run(settings, test_redis, workers, project, steps=ORPHAN_RUN)
    assert test_redis.conn.set(lease_key(settings, project), b"another-run", xx=True, ex=600)
    _wait_for(lambda: _status(job) == "failed", "run stopped", 3 * HEARTBEAT + SLACK, (proc,), workers.logs)
    (failure,) = job_status(project, settings, test_redis.conn)["failures"]
    assert "LeaseError" in failure["error"] and failure["phase"] == "train"
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    assert registry.version_names() == ["1.0.0"] and not list(registry.staging_dir.iterdir())
    assert test_redis.conn.get(lease_key(settings, project)) == b"another-run"  # not released by the loser


def test_commit_checks_the_lease_right_before_writing(
    tmp_path: Path, tiny_checkpoint: Path, test_redis: PrivateRedis
):
    from backend.finetune.commit import commit_version
    from backend.lease import LeaseError, TrainingLease
    from model.checkpoint import load_model
    from model.config import TrainConfig

    settings = _settings(tmp_path, tiny_checkpoint, test_redis)
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    registry.ensure_initialized()
    model = load_model(registry.path("1.0.0"))
    lease = TrainingLease(test_redis.conn, settings, 6)
    lease.acquire(wait=0)
    summary = {
        "project": 6, "parent": "1.0.0", "data": {}, "gate": {"accepted": True, "reasons": []},
        "candidate": {"base": {}, "corrections": {"accuracy": 0.5}},
        "parent_scores": {"corrections": {"accuracy": 0.4}},
    }  # fmt: skip
    args = (
        registry,
        model,
        TrainConfig(stage=2, steps=1),
        summary,
        [{"step": 1, "loss": 1.0}],
        [],
        time.monotonic(),
    )
    test_redis.conn.set(lease.key, b"another-run", xx=True, keepttl=True)
    with pytest.raises(LeaseError, match="not held"):
        commit_version(*args, guard=lease.check)
    assert registry.version_names() == ["1.0.0"] and not list(registry.staging_dir.iterdir())
    test_redis.conn.set(lease.key, lease.token, xx=True, keepttl=True)
    assert not lease.held()  # a run that once lost its lease stays stopped
    test_redis.conn.delete(lease.key)
    fresh = TrainingLease(test_redis.conn, settings, 6)
    fresh.acquire(wait=0)
    assert commit_version(*args, guard=fresh.check) == "1.1.0"


# ---------------------------------------------------------------------- dead jobs, failure records
@pytest.mark.slow
def test_dead_job_fails_within_bound_and_its_failure_survives_reenqueue(
    tmp_path: Path, tiny_checkpoint: Path, test_redis: PrivateRedis, workers: Workers, use_settings, capsys
):
    """``kill -9`` of worker and horse, no retries left: a live worker fails the job within
    3 x JOB_HEARTBEAT_SECONDS + OUTBOX_POLL_SECONDS of its last heartbeat; ``jobs train`` then
    enqueues a new run and the failure record stays."""
    settings = _settings(tmp_path, tiny_checkpoint, test_redis, job_retries=0)
    use_settings(settings)
    project = 7
    _post_corrections(settings, project)
    a, job = _start_long_run(settings, test_redis, workers, project)
    b = workers.start(settings, "b")  # idle: watches for dead jobs
    _wait_for(
        lambda: _registered(test_redis.conn, settings, b), "second worker up", STARTUP, (b,), workers.logs
    )
    step = _training_step(job)

    _kill_session(a.pid)  # worker and work horse
    a.wait(30)
    killed = time.monotonic()
    bound = 3 * settings.job_heartbeat_seconds + settings.outbox_poll_seconds
    _wait_for(lambda: _status(job) == "failed", "dead job failed", bound + SLACK, (b,), workers.logs)
    dead_seconds = time.monotonic() - killed
    assert "AbandonedJobError" in job.latest_result().exc_string

    assert jobs_main(["train", str(project)]) == 0
    assert json.loads(capsys.readouterr().out) == {str(project): "enqueued"}
    status = job_status(project, settings, test_redis.conn)
    (failure,) = status["failures"]
    assert failure["job"] == job.id and failure["phase"] == "train" and failure["step"] >= step
    assert "AbandonedJobError" in failure["error"] and failure["at"] > 0
    assert status["status"] in ("queued", "started", "finished")  # the new run
    print(f"dead job failed {dead_seconds:.1f} s after kill -9 (bound {bound:.1f} s + heartbeat age)")


# ---------------------------------------------------------------------- training watermark
def test_watermark_moves_only_when_a_version_is_committed(tmp_path: Path):
    from backend.corrections import Region

    store = open_store(tmp_path / "data")
    regions = [
        Region("a", (1, 1, 20, 20), caption="a pink circle"),
        Region("b", (30, 30, 60, 60), caption="x"),
    ]
    store.apply_annotation(1, 1, "2025-06-01T12:00:00Z", "i", 100, 80, regions)
    _, snap = store.begin_training(1, claim_seconds=0.0)  # a run that died at once: its claim lapsed
    assert store.new_corrections(1) == 2 and not store.project_status(1)["trained_seq"]
    _, snap = store.begin_training(1, claim_seconds=60.0)
    assert store.new_corrections(1) == 0  # claimed by the running job
    assert store.renew_claim(1, snap, 0.0) and store.new_corrections(1) == 2  # not renewed: lapsed
    assert store.renew_claim(1, snap, 60.0) and store.new_corrections(1) == 0
    store.finish_training(1, snap, None, "no-data", trained=False)  # nothing committed
    assert store.new_corrections(1) == 2 and not store.project_status(1)["trained_seq"]
    _, snap = store.begin_training(1)
    store.apply_annotation(1, 2, "2025-06-01T12:00:01Z", "i", 100, 80, regions[:1])
    store.finish_training(1, snap, "1.1.0", "rejected", trained=True)  # committed, gate said no
    assert store.project_status(1)["trained_seq"] == snap and store.new_corrections(1) == 1
    assert not store.renew_claim(1, snap, 60.0)  # the finished run's claim is gone


@pytest.mark.slow
def test_crash_leaves_the_training_watermark_and_later_corrections_trigger(
    tmp_path: Path, tiny_checkpoint: Path, test_redis: PrivateRedis, workers: Workers, use_settings
):
    settings = _settings(tmp_path, tiny_checkpoint, test_redis, job_retries=0)
    use_settings(settings)
    project = 8
    store = open_store(settings.data_dir)
    corrected, _ = _post_corrections(settings, project)
    assert store.new_corrections(project) == corrected
    a, job = _start_long_run(settings, test_redis, workers, project)
    assert store.new_corrections(project) == 0  # taken by the running job
    _kill_session(a.pid)
    a.wait(30)
    # The run's claim on its snapshot lapses with its lease; the watermark itself never moved.
    _wait_for(lambda: store.new_corrections(project) == corrected, "corrections count as new again",
              3 * HEARTBEAT + SLACK)  # fmt: skip
    assert not store.project_status(project).get("trained_seq")
    threshold = replace(settings, train_min_corrections=corrected + 1)
    more, result = _post_corrections(threshold, project, regions=2, first_id=500)
    assert store.new_corrections(project) == corrected + more
    assert result["training_requested"] and result["jobs"][project] in ("enqueued", "running"), result


# ---------------------------------------------------------------------- outbox after an outage
@pytest.mark.slow
def test_worker_drains_the_outbox_when_redis_returns(
    tmp_path: Path, tiny_checkpoint: Path, test_redis: PrivateRedis, workers: Workers, use_settings
):
    """Redis goes away while the worker is busy with a training job; a training request stored
    meanwhile is enqueued by the worker's own poll once Redis is back (no webhook needed)."""
    if test_redis.folder is None:
        pytest.skip("needs a private redis-server to stop and start")
    settings = _settings(tmp_path, tiny_checkpoint, test_redis, job_retries=0)
    use_settings(settings)
    _post_corrections(settings, 9)
    proc, _ = _start_long_run(settings, test_redis, workers, 9)

    test_redis.stop()
    code, body = handle_webhook(start_training_payload(10), settings)  # stored, Redis unreachable
    assert code == 201 and body["result"]["jobs"][10].startswith("error"), body
    store = open_store(settings.data_dir)
    # The worker meets the outage when it next sends the job's heartbeat (RQ ended its loop there).
    _wait_for(lambda: proc.poll() is not None or "heartbeat not sent" in workers.log("a"),
              "worker met the outage", STARTUP)  # fmt: skip
    test_redis.start()
    back = time.monotonic()
    drain_bound = 10 * settings.outbox_poll_seconds + SLACK
    _wait_for(lambda: not store.pending_requests(), "outbox drained", drain_bound, (proc,), workers.logs)
    drained_seconds = time.monotonic() - back
    assert (
        Job.fetch(job_id(10, settings), connection=test_redis.conn).get_meta(refresh=False)["project"] == 10
    )
    assert proc.poll() is None
    print(f"outbox drained {drained_seconds:.1f} s after Redis came back")
