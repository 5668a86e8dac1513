"""Pre-annotating a project through a real Label Studio 1.23.2 (issue 18): 200 uploaded-image tasks
with boxes, ``python -m backend.jobs preannotate`` enqueues the chunk jobs, one
``python -m backend.worker --preannotate`` is killed (its whole process group, SIGKILL) halfway,
a second worker finds the killed chunk abandoned, retries it and finishes the run.  At the end
every task has exactly one prediction, of the served version, with non-empty results.  With
``PREANNOTATE_ON_IMPORT``, Label Studio's own ``TASKS_CREATED`` delivery starts a run over the
imported tasks.

Run: ``bash scripts/setup_label_studio.sh && .venv/bin/pytest -m e2e tests/test_e2e_preannotate.py``
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from rq.job import Job

from backend.jobs import redis_connection
from backend.preannotate import latest_run, run_status
from model.inference.image_input import encode_image
from tests.redis_helpers import job_settings, settings_env
from tools.ls.harness import LS_TOKEN, LabelStudio, start_backend, start_label_studio
from toyworld.scenes import SceneSpec, make_scene

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
pytest_plugins = ["tests.redis_fixtures"]  # fixture: redis_db

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "model" / "default"
TASKS = 200
IMAGES = 10
CHUNK = 20
SEED = 1_800_000


def start_worker(settings, log: Path) -> subprocess.Popen:
    env = {**os.environ, **settings_env(settings), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "backend.worker", "--preannotate"], env=env, cwd=REPO,
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
    )  # fmt: skip


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(check, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} not reached in {timeout} s")


@pytest.fixture(scope="module")
def ls_server(tmp_path_factory):
    server = start_label_studio(tmp_path_factory.mktemp("ls-preannotate") / "ls")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(request) -> Path:
    return (
        DEFAULT_MODEL
        if (DEFAULT_MODEL / "version.json").exists()
        else request.getfixturevalue("tiny_checkpoint")
    )


def test_killed_worker_resumed_one_prediction_per_task(tmp_path, redis_db, ls_server, model):
    workers: list[subprocess.Popen] = []
    try:
        ls = LabelStudio(ls_server.url)
        project = ls.create_project(
            "pre-annotate e2e", (REPO / "label_config" / "region_caption.xml").read_text()
        )
        rng = random.Random(SEED)
        scenes = [make_scene(rng, SceneSpec(min_objects=2, max_objects=4)) for _ in range(IMAGES)]
        uploaded = ls.upload_images(
            project, [(f"scene-{i}.png", encode_image(s.image)) for i, s in enumerate(scenes)]
        )
        images = [uploaded[f"scene-{i}.png"]["data"]["image"] for i in range(IMAGES)]
        for task in uploaded.values():  # the upload made tasks without boxes; only the imported ones count
            ls.call("DELETE", f"/api/tasks/{task['id']}/")
        data = [
            {"image": images[i % IMAGES], "boxes": [list(o.box) for o in scenes[i % IMAGES].objects]}
            for i in range(TASKS)
        ]
        tasks = ls.import_tasks(project, data)
        assert len(tasks) == TASKS

        settings = job_settings(
            tmp_path, default_model=model, label_studio_url=ls_server.url, label_studio_api_key=LS_TOKEN,
            job_heartbeat_seconds=1, outbox_poll_seconds=1.0, job_retries=3, preannotate_chunk_tasks=CHUNK,
        )  # fmt: skip
        settings = replace(settings, preannotate_queue=f"{settings.queue_name}-pa")
        env = {**os.environ, **settings_env(settings)}
        command = ["preannotate", "--project", str(project), "--all", "--detach"]
        cli = subprocess.run(
            [sys.executable, "-m", "backend.jobs", *command],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr[-3000:]
        run = json.loads(cli.stdout.strip().splitlines()[-1])["run"]
        connection = redis_connection(settings)
        assert run_status(settings, connection, run)["total"] == TASKS

        first = start_worker(settings, tmp_path / "worker-1.log")
        workers.append(first)
        wait_for(lambda: run_status(settings, connection, run)["done"] >= TASKS // 2, 600, "half the tasks")
        started = connection.zrange(f"rq:wip:{settings.preannotate_queue}", 0, -1)
        os.killpg(first.pid, signal.SIGKILL)  # the worker and anything it started, mid-chunk
        first.wait(timeout=10)
        halfway = run_status(settings, connection, run)
        assert halfway["done"] < TASKS and not halfway["finished"]

        second = start_worker(settings, tmp_path / "worker-2.log")
        workers.append(second)
        status = wait_for(
            lambda: (s := run_status(settings, connection, run))["finished"] and s,
            600,
            "the run's end",
            poll=0.5,
        )
        assert status["jobs"] == {"finished": TASKS // CHUNK}, status
        assert status["done"] == TASKS and status["failed"] == 0, status

        jobs = Job.fetch_many(json.loads(connection.hget(f"{settings.key_prefix}:preannotate:{run}", "jobs")),
                              connection=connection)  # fmt: skip
        retried = [
            job.id for job in jobs if job.retries_left is not None and job.retries_left < settings.job_retries
        ]
        assert started and retried, (
            f"the killed worker's chunk was retried (started {started}, retried {retried})"
        )

        predictions = ls.call("GET", f"/api/predictions?project={project}")
        per_task = Counter(p["task"] for p in predictions)
        assert set(per_task) == {t["id"] for t in tasks}
        assert set(per_task.values()) == {1}, "exactly one prediction per task"
        version = {p["model_version"] for p in predictions}
        assert len(version) == 1 and all(p["result"] for p in predictions)
        assert ls.call("GET", f"/api/projects/{project}/model-versions") == {version.pop(): TASKS}
    finally:
        for proc in workers:
            stop(proc)


def test_tasks_created_webhook_preannotates_imported_tasks(tmp_path, redis_db, ls_server, model):
    """PREANNOTATE_ON_IMPORT: Label Studio's own TASKS_CREATED delivery to the connected backend's
    /webhook starts a run over exactly the imported tasks; a worker writes one prediction each."""
    settings = job_settings(
        tmp_path, default_model=model, label_studio_url=ls_server.url, label_studio_api_key=LS_TOKEN,
        job_heartbeat_seconds=1, outbox_poll_seconds=1.0, preannotate_on_import=True,
    )  # fmt: skip
    settings = replace(settings, preannotate_queue=f"{settings.queue_name}-pa")
    wanted = ("REDIS_URL", "QUEUE_NAME", "KEY_PREFIX", "PREANNOTATE_QUEUE", "PREANNOTATE_ON_IMPORT")
    backend = start_backend(
        tmp_path / "backend", ls_server.url, model,
        extra_env={k: v for k, v in settings_env(settings).items() if k in wanted},
    )  # fmt: skip
    worker = None
    try:
        ls = LabelStudio(ls_server.url)
        project = ls.create_project("import e2e", (REPO / "label_config" / "region_caption.xml").read_text())
        scene = make_scene(random.Random(SEED + 1), SceneSpec(min_objects=2, max_objects=3))
        (upload,) = ls.upload_images(project, [("scene.png", encode_image(scene.image))]).values()
        ls.connect_backend(project, backend.url)  # Label Studio adds the backend's /webhook for every action
        connection = redis_connection(settings)
        assert latest_run(settings, connection, project) is None, "the connection itself starts nothing"
        boxes = [list(o.box) for o in scene.objects]
        tasks = ls.import_tasks(project, [{"image": upload["data"]["image"], "boxes": boxes}] * 5)
        imported = {t["id"] for t in tasks} - {upload["id"]}
        run = wait_for(lambda: latest_run(settings, connection, project), 60, "a run from TASKS_CREATED")
        assert run_status(settings, connection, run)["total"] == len(imported) == 5
        worker = start_worker(settings, tmp_path / "worker.log")
        status = wait_for(
            lambda: (s := run_status(settings, connection, run))["finished"] and s,
            300,
            "the run's end",
            poll=0.5,
        )
        assert status["predicted"] == 5 and status["failed"] == 0, status
        per_task = Counter(p["task"] for p in ls.call("GET", f"/api/predictions?project={project}"))
        assert per_task == dict.fromkeys(imported, 1)
    finally:
        if worker is not None:
            stop(worker)
        backend.stop()
