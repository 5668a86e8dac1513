"""Replay the requests a real Label Studio 1.23.2 sent to this backend (recorded by
``python -m tools.ls.capture_payloads`` into ``tests/fixtures/ls-1.23.2``) against the Flask app.

A local HTTP server plays Label Studio's ``/data/upload`` so the recorded image URLs resolve.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backend.app import create_app
from backend.serving import ModelHolder
from backend.store import open_store
from tests.redis_helpers import CLOSED_REDIS_URL
from tests.test_backend_app import make_settings

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ls-1.23.2"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "model" / "default"
TRUTH = json.loads((FIXTURES / "truth.json").read_text())


def recorded(kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(FIXTURES.glob(f"*-{kind}*.json"))]


class UploadHandler(SimpleHTTPRequestHandler):
    """Serves ``/data/upload/<project>/<file>`` from the fixtures folder."""

    def translate_path(self, path: str) -> str:
        return str(FIXTURES / Path(path.split("?")[0]).name)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def fake_label_studio():
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(UploadHandler, directory=str(FIXTURES)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(tmp_path_factory, fake_label_studio):
    tmp = tmp_path_factory.mktemp("ls-fixtures")
    settings = replace(
        make_settings(tmp, DEFAULT_MODEL), data_dir=tmp / "data", redis_url=CLOSED_REDIS_URL,
        label_studio_url=fake_label_studio, max_new_tokens=24, max_regions=64, max_body_mb=10.0,
    )  # fmt: skip
    app = create_app(settings, ModelHolder(settings))
    return app.test_client(), settings


def replay(client, req: dict):
    return client.open(req["path"], method=req["method"], json=req["body"]) if req["body"] is not None else \
        client.open(req["path"], method=req["method"])  # fmt: skip


def test_recorded_health_and_setup(client):
    test_client, _ = client
    for req in recorded("get-health"):
        assert replay(test_client, req).get_json()["status"] == "UP"
    setups = recorded("post-setup")
    assert setups and set(setups[0]["body"]) == {
        "project",
        "schema",
        "hostname",
        "access_token",
        "extra_params",
    }
    for req in setups:
        resp = replay(test_client, req)
        assert resp.status_code == 200 and resp.get_json()["model_version"]
    for req in recorded("get-versions"):
        assert replay(test_client, req).get_json()["versions"]


def test_recorded_batch_predict_attaches_right_captions_to_each_box(client):
    (req,) = recorded("post-predict-batch")
    tasks = req["body"]["tasks"]
    resp = replay(client[0], req)
    assert resp.status_code == 200, resp.get_json()
    results = resp.get_json()["results"]
    assert len(results) == len(tasks)
    right = total = 0
    for task, prediction in zip(tasks, results):
        boxes = {r["id"]: r for r in task["predictions"][0]["result"]}
        items = prediction["result"]
        assert {r["id"] for r in items} == set(boxes)
        truth = TRUTH[str(task["id"])]["objects"]
        for k, (rid, box) in enumerate(boxes.items()):
            mine = {r["from_name"]: r for r in items if r["id"] == rid}
            assert mine["bbox"]["value"]["x"] == box["value"]["x"]
            assert set(mine) <= {"bbox", "caption", "color", "shape", "size"}
            total += 1
            right += mine["caption"]["value"]["text"] == [truth[k]["caption"]]
        assert 0.0 <= prediction["score"] <= 1.0
    assert right / total >= 0.8, (right, total)


def test_recorded_interactive_predict_answers_the_drawn_box(client):
    (req,) = recorded("post-predict-interactive")
    context = req["body"]["params"]["context"]["result"]
    resp = replay(client[0], req)
    assert resp.status_code == 200, resp.get_json()
    (prediction,) = resp.get_json()["results"]
    assert {r["id"] for r in prediction["result"]} == {context[-1]["id"]}
    caption = [r for r in prediction["result"] if r["from_name"] == "caption"]
    truth = TRUTH[str(req["body"]["tasks"][0]["id"])]["objects"][1]
    assert caption[0]["value"]["text"] == [truth["caption"]]


def test_recorded_webhooks_store_update_delete_and_request_training(client):
    test_client, settings = client
    created, updated = (
        recorded("post-webhook-annotation_created")[0],
        recorded("post-webhook-annotation_updated")[0],
    )
    deleted, train = (
        recorded("post-webhook-annotations_deleted")[0],
        recorded("post-webhook-start_training")[0],
    )
    store = open_store(settings.data_dir)
    body = replay(test_client, created).get_json()
    assert body["result"]["stored"] == "created" and body["result"]["regions"] == 3
    annotation = created["body"]["annotation"]["id"]
    (stored,) = store.annotations(project_id=created["body"]["project"]["id"])
    assert stored.annotation_id == annotation and all(r.caption for r in stored.regions)
    assert replay(test_client, created).get_json()["result"]["stored"] == "duplicate"
    assert replay(test_client, updated).get_json()["result"]["stored"] == "updated"
    (stored,) = store.annotations(project_id=created["body"]["project"]["id"])
    assert "a corrected caption" in [r.caption for r in stored.regions]
    assert replay(test_client, deleted).get_json()["result"]["deleted"] == 1
    assert store.annotations(project_id=created["body"]["project"]["id"]) == []
    resp = replay(test_client, train)
    assert resp.status_code == 201 and resp.get_json()["result"]["training_requested"]
    # Redis is unreachable here: the request waits in the outbox instead of being lost.
    assert [r.project_id for r in store.pending_requests()] == [train["body"]["project"]["id"]]
