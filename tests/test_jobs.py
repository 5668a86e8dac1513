"""RQ jobs on a real Redis: bursts collapse, Redis outages lose nothing, follow-ups, schedule, e2e."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from rq import Queue, SimpleWorker
from rq.job import JobStatus

from backend.jobs import build_cron, flush_outbox, job_id, request_training
from backend.store import open_store
from backend.webhooks import handle_webhook
from tests.redis_helpers import CLOSED_REDIS_URL, TEST_REDIS_URL, job_settings
from tools.ls.payloads import annotation_payload, region_items, start_training_payload, timestamp

pytest_plugins = ["tests.redis_fixtures"]  # fixtures: redis_db, use_settings


def _correction(aid: int, project: int = 1) -> dict:
    items = region_items("r1", (10, 10, 40, 40), 100, 100, "a small pink circle", ["pink"])
    items += region_items("r2", (60, 60, 90, 90), 100, 100, "a small red square", ["red"])
    return annotation_payload(aid, items, timestamp(aid), project_id=project)


def test_concurrent_burst_collapses_into_one_job(tmp_path: Path, redis_db):
    settings = job_settings(tmp_path)
    outcomes: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: outcomes.append(request_training(3, settings, redis_db, "burst").state)
        )
        for _ in range(40)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(outcomes)) == ["enqueued", "queued"] and outcomes.count("enqueued") == 1
    assert Queue(settings.queue_name, connection=redis_db).job_ids == [job_id(3, settings)]


def test_two_deployments_sharing_a_redis_db_each_get_their_job(tmp_path: Path, redis_db):
    """RQ's job keys are global to the database: with the same id, the second deployment's request
    was answered "queued" and no job reached its queue (its outbox row then resolved: lost)."""
    a = job_settings(tmp_path / "a")
    b = job_settings(tmp_path / "b")
    assert request_training(1, a, redis_db).state == "enqueued"
    assert request_training(1, b, redis_db).state == "enqueued"
    for s in (a, b):
        assert Queue(s.queue_name, connection=redis_db).job_ids == [job_id(1, s)]
    assert job_id(1, a) != job_id(1, b)
    assert job_id(1, replace(a, key_prefix="roi:a")) != job_id(1, replace(a, key_prefix="roi_a"))


def test_a_job_queued_under_the_old_id_is_still_the_projects_job(tmp_path: Path, redis_db):
    """Upgrading with a job queued as ``finetune-<project>``: no second job, and status shows it."""
    from backend.jobs import JOB_FUNCTION, job_status, training_queue

    settings = job_settings(tmp_path)
    queue = training_queue(settings, redis_db)
    old = queue.enqueue(JOB_FUNCTION, kwargs={"project_id": 2, "reason": "upgrade"}, job_id="finetune-2")
    try:
        outcome = request_training(2, settings, redis_db)
        assert (outcome.state, outcome.job_id) == ("queued", "finetune-2") and queue.job_ids == ["finetune-2"]
        assert job_status(2, settings, redis_db)["id"] == "finetune-2"
    finally:
        old.delete()  # the old id is global to the database


def test_webhook_burst_enqueues_one_job_per_project(tmp_path: Path, redis_db):
    settings = job_settings(tmp_path, train_min_corrections=4)
    states = []
    for aid in range(1, 31):
        code, body = handle_webhook(_correction(aid, project=1 + aid % 2), settings)
        assert code == 201
        states += list(body["result"]["jobs"].values())
    assert states.count("enqueued") == 2 and set(states) == {"enqueued", "queued"}
    queue = Queue(settings.queue_name, connection=redis_db)
    assert sorted(queue.job_ids) == [job_id(1, settings), job_id(2, settings)]


def test_redis_down_keeps_corrections_and_enqueues_once_back(tmp_path: Path, redis_db):
    down = job_settings(tmp_path, redis_url=CLOSED_REDIS_URL, train_min_corrections=4)
    up = replace(down, redis_url=TEST_REDIS_URL)
    for aid in range(1, 6):
        code, body = handle_webhook(_correction(aid), down)
        assert code == 201 and body["result"]["stored"] == "created"
    assert body["result"]["jobs"][1].startswith("error")
    store = open_store(down.data_dir)
    assert len(store.annotations()) == 5
    (row,) = store.pending_requests()
    assert row.project_id == 1 and row.attempts >= 3 and "Connection" in row.last_error
    queue = Queue(up.queue_name, connection=redis_db)
    assert queue.count == 0

    # Redis is back: the next webhook (of any project) hands the stored request over.
    code, body = handle_webhook(_correction(99, project=2), up)
    assert code == 201 and body["result"]["jobs"] == {1: "enqueued"}
    assert queue.job_ids == [job_id(1, up)] and store.pending_requests() == []
    assert flush_outbox(up, store, redis_db) == {}  # nothing left: enqueued exactly once
    assert queue.job_ids == [job_id(1, up)]


def test_flush_enqueues_after_outage_without_new_webhooks(tmp_path: Path, redis_db):
    down = job_settings(tmp_path, redis_url=CLOSED_REDIS_URL)
    assert handle_webhook(start_training_payload(5), down)[0] == 201
    up = replace(down, redis_url=TEST_REDIS_URL)
    assert flush_outbox(up) == {5: "enqueued"}  # what the worker does at start and periodically
    assert flush_outbox(up) == {}
    assert Queue(up.queue_name, connection=redis_db).job_ids == [job_id(5, up)]


def test_request_while_running_waits_for_a_follow_up(tmp_path: Path, redis_db):
    settings = job_settings(tmp_path)
    store = open_store(settings.data_dir)
    assert request_training(4, settings, redis_db).state == "enqueued"
    queue = Queue(settings.queue_name, connection=redis_db)
    job = queue.fetch_job(job_id(4, settings))
    queue.remove(job)
    job.set_status(JobStatus.STARTED)  # as a worker does when it takes the job
    store.request_training(4, "START_TRAINING")
    assert flush_outbox(settings, store, redis_db) == {4: "running"}
    assert [r.project_id for r in store.pending_requests()] == [4]  # kept: the running job's follow-up
    assert queue.count == 0
    job.set_status(JobStatus.FINISHED)  # the job ended before taking the follow-up
    assert flush_outbox(settings, store, redis_db) == {4: "enqueued"}
    assert queue.job_ids == [job_id(4, settings)] and store.pending_requests() == []
    assert queue.fetch_job(job_id(4, settings)).get_status() == JobStatus.QUEUED


def test_scheduled_retrain_uses_rq_cron(tmp_path: Path, redis_db, use_settings):
    settings = job_settings(tmp_path, retrain_interval=3600, train_min_corrections=10**6)
    settings = replace(settings, train_trigger="threshold,manual,schedule")  # RETRAIN_INTERVAL needs it
    use_settings(settings)
    assert build_cron(replace(settings, retrain_interval=0), redis_db) is None
    with pytest.raises(ValueError, match="not both"):
        build_cron(replace(settings, retrain_cron="0 3 * * *"), redis_db)
    assert build_cron(replace(settings, retrain_interval=0, retrain_cron="0 3 * * *"), redis_db) is not None
    handle_webhook(_correction(1, project=6), settings)
    queue = Queue(settings.queue_name, connection=redis_db)
    assert queue.count == 0  # below the threshold: only the schedule will train it

    cron = build_cron(settings, redis_db)
    (entry,) = cron.get_jobs()
    assert entry.interval == 3600 and entry.func_name == "backend.jobs.scheduled_retrain"
    assert len(cron.enqueue_jobs()) == 1 and len(cron.enqueue_jobs()) == 0  # not due again for an hour
    SimpleWorker([queue], connection=redis_db).work(burst=True, max_jobs=1)  # runs scheduled_retrain
    assert queue.job_ids == [job_id(6, settings)]
    assert open_store(settings.data_dir).pending_requests() == []


@pytest.mark.slow
def test_webhook_to_served_version_end_to_end(tmp_path: Path, tiny_checkpoint: Path, redis_db, use_settings):
    """webhook -> durable store -> job on Redis -> worker -> new version -> the app serves it."""
    from backend.app import create_app
    from tools.ls.demo_active_learning import correction_scenes
    from tools.ls.payloads import SCENE_LABEL_CONFIG, scene_payload

    images = tmp_path / "images"
    images.mkdir()
    settings = job_settings(
        tmp_path, default_model=tiny_checkpoint, local_files_root=str(images), train_steps=6,
        train_batch_size=4, train_max_turns=2, gate_eval_images=3, heldout_min_records=4,
        promote_tolerance=1.0, train_min_corrections=12,
    )  # fmt: skip
    use_settings(settings)
    app = create_app(settings)
    client = app.test_client()
    holder = app.extensions["roi"]["holder"]
    assert holder.wait_for_version("1.0.0", timeout=60)
    answers = []
    for i, scene in enumerate(correction_scenes(12)):
        scene.image.save(images / f"s{i}.png")
        payload = scene_payload(
            scene, 10 + i, f"/data/local-files/?d=s{i}.png", timestamp(i), 1, task_id=20 + i
        )
        resp = client.post("/webhook", json=payload)
        assert resp.status_code == 201, resp.get_json()
        answers.append(resp.get_json()["result"]["jobs"])
    assert {"1": "enqueued"} in answers  # JSON object keys are strings
    queue = Queue(settings.queue_name, connection=redis_db)
    assert queue.job_ids == [job_id(1, settings)]
    SimpleWorker([queue], connection=redis_db).work(burst=True)
    job = queue.fetch_job(job_id(1, settings))
    assert job.get_status() == JobStatus.FINISHED
    (round_,) = job.return_value()["rounds"]
    assert round_["decision"] == "promoted" and round_["version"] == "1.1.0"
    assert holder.wait_for_version("1.1.0", timeout=60)
    setup = client.post("/setup", json={"project": "1.0", "schema": SCENE_LABEL_CONFIG})
    assert setup.get_json()["model_version"] == "1.1.0"


def test_a_work_horse_is_never_forked_while_the_poll_thread_works(monkeypatch):
    """A horse forked while the worker's poll thread is inside SQLite inherited its lock held and
    hung on a futex (test_job_crashes' orphan test, once in CI).  The poll and the fork exclude
    each other; the horse's inherited copy of the guard is released."""
    import backend.worker as w

    inside, release, order, held = threading.Event(), threading.Event(), [], []

    def slow_flush(settings, store):
        held.append(w.FORK_GUARD.locked())
        inside.set()
        release.wait(30)
        order.append("poll done")

    monkeypatch.setattr(w, "fail_dead_jobs", lambda queue: None)
    monkeypatch.setattr(w, "training_queue", lambda settings, connection: None)
    monkeypatch.setattr(w, "redis_connection", lambda settings, fast=False: None)
    monkeypatch.setattr(w, "open_store", lambda data_dir: None)
    monkeypatch.setattr(w, "flush_outbox", slow_flush)
    monkeypatch.setattr(w.Worker, "fork_work_horse", lambda self, job, queue: order.append("fork"))
    poll = threading.Thread(target=w.poll_once, args=(SimpleNamespace(data_dir="unused"),))
    poll.start()
    assert inside.wait(30)
    worker = w.TrainingWorker.__new__(w.TrainingWorker)  # no Redis needed: the fork itself is patched
    forker = threading.Thread(target=worker.fork_work_horse, args=(None, None))
    forker.start()
    release.set()
    poll.join(30)
    forker.join(30)
    assert held == [True] and order == ["poll done", "fork"] and not w.FORK_GUARD.locked()

    w.FORK_GUARD.acquire()  # what the horse finds: its parent's fork held the guard
    monkeypatch.setattr(w, "watch_parent", lambda pid: None)
    monkeypatch.setattr(w.Worker, "main_work_horse", lambda self, job, queue: order.append("horse"))
    worker.main_work_horse(None, None)
    assert order[-1] == "horse" and not w.FORK_GUARD.locked()
