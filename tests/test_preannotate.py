"""Pre-annotation chunk jobs (backend.preannotate) against real Redis and a fake Label Studio API on
loopback: skipping tasks already predicted, per-task failures recorded without aborting a chunk, a
retried chunk writing nothing twice, the TASKS_CREATED webhook, the HTTP endpoint."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image
from rq.job import Job

from backend import preannotate
from backend.jobs import redis_connection
from backend.preannotate import Selection, preannotate_queue, run_status, start_run
from backend.webhooks import handle_webhook
from backend.worker import PreannotateWorker
from tests.redis_helpers import job_settings, settings_env

pytest_plugins = ["tests.redis_fixtures"]  # fixtures: redis_db, use_settings

REPO = Path(__file__).resolve().parents[1]
CONFIG = (REPO / "label_config" / "region_caption.xml").read_text()
TOKEN = "0123456789abcdef0123456789abcdef01234567"


def png_url(color: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class FakeLabelStudio:
    """The four calls pre-annotation makes, on 127.0.0.1 (project, task pages, task query, bulk
    prediction import); ``fail_after_write``: answer 500 to that many writes *after* storing them
    (a worker that dies between Label Studio's commit and its own record)."""

    def __init__(self, project: int, tasks: list[dict]) -> None:
        self.project = project
        self.tasks = {t["id"]: {**t, "project": project, "predictions": t.get("predictions", []),
                                "annotations": [], "drafts": []} for t in tasks}  # fmt: skip
        self.writes: list[list[dict]] = []
        self.fail_after_write = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def answer(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    return self.answer(401, {"detail": "no token"})
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == f"/api/projects/{fake.project}":
                    return self.answer(200, {"id": fake.project, "label_config": CONFIG})
                if url.path == "/api/tasks" and q.get("project") == str(fake.project):
                    with fake.lock:
                        rows = [json.loads(json.dumps(t)) for _, t in sorted(fake.tasks.items())]
                    if "query" in q:
                        included = set(json.loads(q["query"])["selectedItems"]["included"])
                        rows = [t for t in rows if t["id"] in included]
                    size, page = int(q["page_size"]), int(q["page"])
                    return self.answer(
                        200, {"total": len(rows), "tasks": rows[(page - 1) * size : page * size]}
                    )
                return self.answer(404, {"detail": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if urlsplit(self.path).path != f"/api/projects/{fake.project}/import/predictions":
                    return self.answer(404, {"detail": "not found"})
                with fake.lock:
                    fake.writes.append(body)
                    for row in body:
                        fake.tasks[row["task"]]["predictions"].append(row)
                    fail = fake.fail_after_write > 0
                    fake.fail_after_write -= fail
                self.answer(500 if fail else 201, {"created": len(body)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def predictions(self, task: int) -> list[dict]:
        return self.tasks[task]["predictions"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def boxes_task(task_id: int, color: str = "red", boxes=((5, 5, 30, 30), (30, 10, 60, 40))) -> dict:
    return {"id": task_id, "data": {"image": png_url(color), "boxes": [list(b) for b in boxes]}}


@pytest.fixture()
def setup(tmp_path, tiny_registry, tiny_checkpoint, redis_db, use_settings):
    def make(tasks: list[dict], **overrides):
        fake = FakeLabelStudio(7, tasks)
        settings = job_settings(
            tmp_path, model_dir=tiny_registry.root, default_model=tiny_checkpoint,
            label_studio_url=fake.url, label_studio_api_key=TOKEN, allow_private_urls=True,
            job_retries=2, predict_chunk_tasks=2, **overrides,
        )  # fmt: skip
        settings = replace(settings, preannotate_queue=f"{settings.queue_name}-pa")
        use_settings(settings)
        made.append(fake)
        return fake, settings

    made: list[FakeLabelStudio] = []
    yield make
    for fake in made:
        fake.close()


def work(settings) -> None:
    connection = redis_connection(settings)
    PreannotateWorker([preannotate_queue(settings, connection)], connection=connection).work(burst=True)


def test_predicts_skips_existing_and_records_failures(setup, tiny_registry):
    version = tiny_registry.current()
    tasks = [boxes_task(i) for i in range(1, 6)]
    tasks[1]["predictions"] = [{"model_version": version, "result": [{"id": "x"}], "task": 2}]
    tasks.append({"id": 6, "data": {"image": "data:image/png;base64,AAAA", "boxes": [[1, 1, 20, 20]]}})
    tasks.append({"id": 7, "data": {"image": png_url("blue")}})  # no boxes anywhere
    fake, settings = setup(tasks)
    connection = redis_connection(settings)
    status = start_run(settings, connection, 7, Selection(), chunk=3)
    assert status["total"] == 7 and status["jobs"] == {"queued": 3}
    work(settings)
    status = run_status(settings, connection, status["run"])
    assert status["finished"] and status["jobs"] == {"finished": 3}
    assert (status["predicted"], status["existing"], status["failed"]) == (4, 1, 2)
    assert set(status["failures"]) == {"6", "7"}
    assert status["failures"]["6"].startswith("image:") and status["failures"]["7"].startswith("no_boxes:")
    assert status["regions"] == 8
    for task in (1, 3, 4, 5):
        (pred,) = fake.predictions(task)
        assert pred["model_version"] == version and pred["result"], "one non-empty prediction per task"
        assert {r["id"] for r in pred["result"]} == {"box1", "box2"}
    assert len(fake.predictions(2)) == 1, "a task already predicted by this version is not written again"
    assert not fake.predictions(6) and not fake.predictions(7), "never an empty prediction"
    assert all(row["result"] for write in fake.writes for row in write)
    first_job = json.loads(connection.hget(f"{settings.key_prefix}:preannotate:{status['run']}", "jobs"))[0]
    meta = Job.fetch(first_job, connection=connection).get_meta()
    assert meta["done"] == meta["total"] == 3 and meta["phase"] == "done"
    assert {"regions_per_s", "eta_s", "failed", "version"} <= set(meta)
    # a second run over the same project writes nothing: every task is predicted or fails again
    again = start_run(settings, connection, 7, Selection(), chunk=10)
    writes = len(fake.writes)
    work(settings)
    again = run_status(settings, connection, again["run"])
    assert (again["predicted"], again["existing"], again["failed"]) == (0, 5, 2)
    assert len(fake.writes) == writes


def test_retried_chunk_writes_nothing_twice(setup):
    fake, settings = setup([boxes_task(i) for i in range(1, 6)])
    fake.fail_after_write = 1  # the first write is stored, then the attempt fails
    connection = redis_connection(settings)
    status = start_run(settings, connection, 7, Selection(), chunk=5)
    work(settings)
    status = run_status(settings, connection, status["run"])
    assert status["jobs"] == {"finished": 1}, "the chunk was retried and finished"
    assert [len(fake.predictions(t)) for t in range(1, 6)] == [1] * 5
    written = [row["task"] for write in fake.writes for row in write]
    assert sorted(written) == [1, 2, 3, 4, 5], "no task written twice"
    assert status["done"] == 5 and status["failed"] == 0


def test_tasks_and_view_selection_and_claims(setup, tiny_registry):
    fake, settings = setup([boxes_task(i) for i in range(1, 8)])
    connection = redis_connection(settings)
    assert preannotate.list_task_ids(settings, 7, Selection()) == list(range(1, 8))
    status = start_run(settings, connection, 7, Selection((2, 4)), task_ids=[2, 4, 99])
    # a task another job is predicting right now is left to it
    connection.set(f"{settings.key_prefix}:preannotate-claim:7:{tiny_registry.current()}:4", "other-job")
    work(settings)
    status = run_status(settings, connection, status["run"])
    assert (
        status["predicted"] == 1 and list(status["failures"]) == ["99"] and status["claimed_elsewhere"] == 1
    )
    assert [len(fake.predictions(t)) for t in range(1, 8)] == [0, 1, 0, 0, 0, 0, 0]


def test_a_run_is_at_most_max_run_chunks_jobs(setup, monkeypatch):
    _, settings = setup([boxes_task(1)])
    monkeypatch.setattr(preannotate, "MAX_RUN_CHUNKS", 3)
    status = start_run(settings, redis_connection(settings), 7, Selection(), chunk=1, task_ids=range(1, 11))
    assert (status["chunk"], status["total"], status["jobs"]) == (4, 10, {"queued": 3})
    assert preannotate_queue(settings, redis_connection(settings)).count == 3


def test_tasks_created_webhook_is_off_by_default(setup):
    fake, settings = setup([boxes_task(1), boxes_task(2)])
    payload = {"action": "TASKS_CREATED", "project": {"id": 7}, "tasks": [{"id": 1}, {"id": 2}]}
    status, body = handle_webhook(payload, settings)
    assert status == 201 and body["result"]["preannotate"].startswith("off")
    assert preannotate_queue(settings, redis_connection(settings)).count == 0
    on = replace(settings, preannotate_on_import=True)
    status, body = handle_webhook(payload, on)
    run = body["result"]["preannotate"]
    assert status == 201 and re.fullmatch(r"7-[0-9a-f]{8}", run) and body["result"]["tasks"] == 2
    work(on)
    assert run_status(on, redis_connection(on), run)["predicted"] == 2
    assert [len(fake.predictions(t)) for t in (1, 2)] == [1, 1]


def test_http_endpoint(setup, tiny_registry):
    from backend.app import create_app
    from backend.serving import ModelHolder

    fake, settings = setup([boxes_task(1), boxes_task(2), boxes_task(3)])
    app = create_app(settings, ModelHolder(settings, registry=tiny_registry))
    client = app.test_client()
    assert client.post("/preannotate", json={"project": 7, "tasks": "1"}).status_code == 400
    assert client.post("/preannotate", json={"project": 7, "tasks": [1], "view": 2}).status_code == 400
    resp = client.post("/preannotate", json={"project": 7, "chunk": 2})
    assert resp.status_code == 202, resp.json
    run = resp.json["run"]
    assert resp.json["total"] == 3 and resp.json["jobs"] == {"queued": 2}
    work(settings)
    body = client.get(f"/preannotate/{run}").json
    assert body["finished"] and body["predicted"] == 3 and body["failed"] == 0
    assert client.get("/preannotate/7-nothere").status_code == 404


def test_cli_status_shows_the_latest_run(setup, capsys):
    from backend.jobs import main

    fake, settings = setup([boxes_task(1), {"id": 2, "data": {"image": png_url("green")}}])
    assert main(["preannotate", "--project", "7", "--tasks", "1,2", "--detach"]) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run"]
    work(settings)
    assert main(["status", "7"]) == 0
    report = json.loads(capsys.readouterr().out)
    shown = report["preannotate"]
    assert shown["run"] == run and shown["finished"] and (shown["predicted"], shown["failed"]) == (1, 1)
    assert shown["failures"]["2"].startswith("no_boxes:") and report["job"] is None


def test_cli_follows_the_run_with_a_progress_bar(setup):
    fake, settings = setup([boxes_task(i) for i in range(1, 5)])
    cli = subprocess.Popen(
        [sys.executable, "-m", "backend.jobs", "preannotate", "--project", "7", "--chunk", "2"],
        env={**os.environ, **settings_env(settings)}, cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        queue = preannotate_queue(settings, redis_connection(settings))
        deadline = time.monotonic() + 60
        while queue.count < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        work(settings)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, err[-2000:]
    final = json.loads(out[out.index("\n{") + 1 :])
    assert final["finished"] and final["predicted"] == 4 and final["jobs"] == {"finished": 2}
    assert "4/4" in err and "task" in err, "tqdm's bar on stderr"
