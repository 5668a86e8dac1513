"""New versions reach every serving process and Label Studio (issue 15, item 4), against a real
Label Studio 1.23.2 and the backend under gunicorn with two worker processes (``scripts/serve.sh``).

A promotion goes through the fine-tuning job's commit step
(:func:`backend.finetune.commit.promote_if_accepted`), which makes the registry's pointer name the
new version and then updates the Label Studio project.  Checked:

* each worker process notices the promotion on its own (its watcher's ``model version noticed``
  line, within ``MODEL_POLL_SECONDS``) and swaps before any ``/predict`` arrives; ``/health`` shows
  the new version with no ``/predict`` sent by this test;
* Label Studio's project then shows the new version (``model_version``), the Data Manager's
  prediction scores follow it, and new predictions (batch and interactive) carry it;
* a second promotion works from a project that already names a static version.

Run: ``bash scripts/setup_label_studio.sh && .venv/bin/pytest -m e2e tests/test_e2e_ls_versions.py``
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from backend.finetune.commit import promote_if_accepted
from backend.registry import ModelRegistry
from backend.settings import Settings
from model.inference.image_input import encode_image
from tools.ls.harness import LS_TOKEN, LabelStudio, Server, free_port, start_label_studio, wait_http
from tools.ls.payloads import rectangle_result
from toyworld.scenes import SceneSpec, make_scene

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "model" / "default"
POLL = 1.0  # MODEL_POLL_SECONDS of the backend under test
NOTICE_SLACK = 2.0  # scheduling on a shared machine, on top of MODEL_POLL_SECONDS
LOAD_BOUND = 120.0  # a swap also loads and checks the version (child process): bounded, measured
WORKERS = 2
SCENES = 4
SEED = 8_600_000


def start_serving(work: Path, ls_url: str, model: Path) -> Server:
    """``scripts/serve.sh`` with ``WEB_WORKERS`` processes; waits until one answers loaded."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")},
        "HOST": "127.0.0.1", "PORT": str(port), "WEB_WORKERS": str(WORKERS), "WEB_THREADS": "4",
        "MODEL_DIR": str(work / "models"), "DEFAULT_MODEL": str(model), "DATA_DIR": str(work / "data"),
        "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": LS_TOKEN, "MODEL_POLL_SECONDS": str(POLL),
        "TRAIN_MIN_CORRECTIONS": "1000000", "REDIS_URL": "redis://127.0.0.1:1/0", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    log = work / "backend.log"
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "serve.sh")], env=env, cwd=REPO, start_new_session=True,
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115 - the child owns it
    )  # fmt: skip
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_http(f"{server.url}/health", server, 300, ok=lambda r: r.ok and r.json().get("loaded"))
    except BaseException:
        server.stop()
        raise
    return server


def log_records(server: Server) -> list[dict]:
    records = []
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def at(record: dict) -> float:
    return datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    work = tmp_path_factory.mktemp("e2e-versions")
    model = (
        DEFAULT_MODEL
        if (DEFAULT_MODEL / "version.json").exists()
        else request.getfixturevalue("tiny_checkpoint")
    )
    ls = start_label_studio(work / "ls", timeout=1500)
    try:
        backend = start_serving(work / "backend", ls.url, model)
    except BaseException:
        ls.stop()
        raise
    registry = ModelRegistry(work / "backend" / "models", model)
    settings = Settings(
        model_dir=registry.root, default_model=model, label_studio_url=ls.url, label_studio_api_key=LS_TOKEN,
        model_poll_seconds=POLL, label_studio_sync_seconds=300.0,
    )  # fmt: skip
    yield {"ls": ls, "backend": backend, "client": LabelStudio(ls.url), "registry": registry,
           "settings": settings, "model": model}  # fmt: skip
    backend.stop()
    ls.stop()


@pytest.fixture(scope="module")
def project(stack):
    """A project with uploaded scenes, boxes pre-drawn as a prediction, the backend connected (live
    mode: the project's model_version is the ML backend's title) and 1.0.0 predictions retrieved."""
    ls: LabelStudio = stack["client"]
    xml = (REPO / "label_config" / "caption_attributes.xml").read_text()
    pid = ls.create_project("e2e versions", xml)
    scenes = [
        make_scene(random.Random(SEED + i), SceneSpec(min_objects=2, max_objects=3)) for i in range(SCENES)
    ]
    tasks = ls.upload_images(pid, [(f"scene-{i}.png", encode_image(s.image)) for i, s in enumerate(scenes)])
    for i, scene in enumerate(scenes):
        task = tasks[f"scene-{i}.png"]
        boxes = [
            rectangle_result(f"t{task['id']}b{k}", o.box, scene.width, scene.height)
            for k, o in enumerate(scene.objects)
        ]
        ls.add_prediction(task["id"], boxes, "boxes")
    ml = ls.connect_backend(pid, stack["backend"].url)
    assert ml["state"] == "CO", ml
    ls.retrieve_predictions(pid)
    versions = ls.call("GET", f"/api/projects/{pid}/model-versions")
    assert versions.get("1.0.0") == SCENES, versions
    assert ls.call("GET", f"/api/projects/{pid}")["model_version"] == "roi-backend"
    return {"id": pid, "ml": ml["id"], "tasks": sorted(t["id"] for t in tasks.values()), "scenes": scenes}


def promote(stack, project_id: int, parent: str) -> dict:
    """Commit a copy of the model as the next version and run the job's promotion step in a thread,
    while this thread watches ``/health`` (no /predict is sent from here)."""
    registry: ModelRegistry = stack["registry"]
    version = registry.next_version(parent)
    registry.commit_folder(stack["model"], version, copy=True)
    summary = {"project": project_id, "parent": parent, "gate": {"accepted": True, "reasons": []}}
    outcome: dict = {}

    def run() -> None:
        started = time.monotonic()
        outcome["promoted"] = promote_if_accepted(registry, stack["settings"], summary, version)
        outcome["seconds"] = time.monotonic() - started

    promoted_at = time.time()
    worker = threading.Thread(target=run)
    worker.start()
    health_at = None
    while health_at is None and time.time() - promoted_at < POLL + LOAD_BOUND:
        if requests.get(f"{stack['backend'].url}/health", timeout=5).json()["model_version"] == version:
            health_at = time.time()
        else:
            time.sleep(0.1)
    worker.join(timeout=600)
    assert not worker.is_alive()
    return {
        "version": version,
        "promoted_at": promoted_at,
        "health_at": health_at,
        "summary": summary,
        **outcome,
    }


def check_every_process_followed(stack, result: dict) -> dict:
    """Each worker process noticed the version itself, in time, and swapped before any /predict."""
    version, promoted_at = result["version"], result["promoted_at"]
    records = [r for r in log_records(stack["backend"]) if at(r) >= promoted_at]
    noticed = [r for r in records if r["message"] == "model version noticed" and r["version"] == version]
    swapped = [r for r in records if r["message"] == "model swapped" and r["version"] == version]
    assert len({r["pid"] for r in noticed}) == WORKERS, noticed
    assert {r["pid"] for r in swapped} == {r["pid"] for r in noticed}, (noticed, swapped)
    for r in noticed:
        assert r["promoted_s_ago"] <= POLL + NOTICE_SLACK, r
    first_predict = min((at(r) for r in records if r["message"] == "predicted"), default=float("inf"))
    assert min(at(r) for r in swapped) <= first_predict, "a /predict came before any process swapped"
    return {
        "noticed_s": sorted(r["promoted_s_ago"] for r in noticed),
        "swapped_s": sorted(r["promoted_s_ago"] for r in swapped),
        "health_s": round(result["health_at"] - promoted_at, 2),
        "label_studio_s": round(result["seconds"], 2),
    }


def check_label_studio_follows(stack, project: dict, version: str) -> None:
    ls: LabelStudio = stack["client"]
    pid = project["id"]
    assert ls.call("GET", f"/api/projects/{pid}")["model_version"] == version
    assert {b["model_version"] for b in ls.call("GET", f"/api/ml?project={pid}")} == {version}
    ls.retrieve_predictions(pid)  # what a reviewer's "Retrieve predictions" does now
    mine = [p for p in ls.predictions(pid) if p["model_version"] == version]
    assert sorted({p["task"] for p in mine}) == project["tasks"], "every task got a prediction of it"
    assert all(p["result"] for p in mine)
    assert ls.call("GET", f"/api/projects/{pid}/model-versions")[version] == len(mine)
    # The Data Manager's scores follow the project's version: present for every task.
    scores = {t["id"]: t.get("predictions_score") for t in ls.tasks(pid)}
    assert all(isinstance(s, float) for s in scores.values()), scores
    scene = project["scenes"][0]
    box = {**rectangle_result("e2eNew", scene.objects[0].box, scene.width, scene.height), "origin": "manual"}
    answer = ls.interactive(project["ml"], project["tasks"][0], {"result": [box]})
    assert answer["data"]["model_version"] == version


def test_promotion_reaches_every_process_and_label_studio(stack, project, capsys):
    first = promote(stack, project["id"], "1.0.0")
    assert first["promoted"] and first["version"] == "1.1.0"
    assert first["summary"]["label_studio"] == "updated", first["summary"]
    assert first["health_at"] is not None, "/health never showed the new version"
    figures = check_every_process_followed(stack, first)
    check_label_studio_follows(stack, project, "1.1.0")

    # Again, now from a project that names a static version rather than the ML backend's title.
    second = promote(stack, project["id"], "1.1.0")
    assert second["version"] == "1.2.0" and second["summary"]["label_studio"] == "updated", second["summary"]
    figures2 = check_every_process_followed(stack, second)
    check_label_studio_follows(stack, project, "1.2.0")
    with capsys.disabled():
        print(f"\npromotion -> noticed/swapped/health/LS updated (s): 1.1.0 {figures}; 1.2.0 {figures2}")


def test_backend_processes_stop_cleanly(stack):
    """The watcher threads do not keep a worker process alive on shutdown."""
    backend: Server = stack["backend"]
    os.killpg(backend.proc.pid, signal.SIGTERM)
    backend.proc.wait(timeout=60)
    assert backend.proc.returncode == 0, backend.log_tail()
