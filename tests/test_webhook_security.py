"""Webhook trust (issue 14): a shared secret, project-scoped annotation ids, no timestamps from the
future, absurd values refused with a 4xx, optional verification against Label Studio.

Every attack here was reproduced on the code before the fix; real Redis (database 13) and the
Flask app, a loopback stand-in for Label Studio's API where verification is on.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rq import Queue

import backend.webhooks as webhooks_module
from backend.app import create_app
from backend.observability import JsonFormatter
from backend.serving import ModelHolder
from backend.store import CorrectionStore, StoreError, open_store
from tests.redis_helpers import job_settings
from tools.ls.payloads import (
    annotation_payload,
    deleted_payload,
    region_items,
    start_training_payload,
    timestamp,
)

pytest_plugins = ["tests.redis_fixtures"]  # fixture: redis_db

SECRET = "hook-secret-0123456789"


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def now_plus(seconds: float) -> str:
    return iso(datetime.now(timezone.utc) + timedelta(seconds=seconds))


def correction(aid: int, updated_at: str, caption: str = "a small pink circle", **kw) -> dict:
    items = region_items("r1", (10, 10, 40, 40), 100, 100, caption, ["pink"])
    return annotation_payload(aid, items, updated_at, **kw)


@pytest.fixture()
def json_log() -> Iterator[list[dict]]:
    """The ``backend`` loggers' records, as the parsed JSON lines the app writes."""
    records: list[dict] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(JsonFormatter().format(record)))

    handler = Capture(level=logging.DEBUG)
    logging.getLogger("backend").addHandler(handler)
    yield records
    logging.getLogger("backend").removeHandler(handler)


@pytest.fixture()
def hook(tmp_path: Path, tiny_checkpoint: Path, redis_db):
    """``hook(**settings)`` -> (test client, settings, the settings' RQ queue)."""

    def make(**overrides):
        settings = job_settings(tmp_path, default_model=tiny_checkpoint, train_min_corrections=1, **overrides)
        client = create_app(settings, ModelHolder(settings)).test_client()
        return client, settings, Queue(settings.queue_name, connection=redis_db)

    return make


def post(client, payload, headers=None, raw: str | None = None):
    if raw is not None:
        return client.post("/webhook", data=raw, content_type="application/json", headers=headers or {})
    return client.post("/webhook", json=payload, headers=headers or {})


def live(settings) -> dict[int, tuple[int, list[str | None]]]:
    """Live annotations: id -> (project, captions)."""
    anns = open_store(settings.data_dir).annotations()
    return {a.annotation_id: (a.project_id, [r.caption for r in a.regions]) for a in anns}


# ---------------------------------------------------------------------- shared secret
def test_secret_refuses_anonymous_and_wrong_headers_and_stores_nothing(hook, json_log):
    client, settings, queue = hook(webhook_secret=SECRET)
    wrong = ["wrong", "", SECRET + "x", SECRET[:-1]]
    refused = [{}, *({"X-Webhook-Secret": w} for w in wrong), {"Authorization": f"Token {SECRET}"}]
    for n, headers in enumerate(refused):
        resp = post(client, correction(1 + n, timestamp(1)), headers)
        assert resp.status_code == 401, (headers, resp.get_json())
        assert "X-Webhook-Secret" in resp.get_json()["detail"]
    assert live(settings) == {} and queue.count == 0  # no training data, no job
    warnings = [r for r in json_log if r["level"] == "WARNING" and r.get("status") == 401]
    assert len(warnings) == len(refused)
    assert all("X-Webhook-Secret" in r["reason"] for r in warnings)
    assert all(SECRET not in json.dumps(r) for r in json_log)  # the secret itself is never logged

    resp = post(client, correction(50, timestamp(1)), {"x-webhook-secret": SECRET})  # header names: any case
    assert resp.status_code == 201, resp.get_json()
    assert live(settings) == {50: (1, ["a small pink circle"])} and queue.count == 1


def test_secret_is_compared_in_constant_time(hook, monkeypatch):
    client, _, _ = hook(webhook_secret=SECRET)
    calls = []
    real = webhooks_module.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(webhooks_module.hmac, "compare_digest", spy)
    assert post(client, correction(1, timestamp(1)), {"X-Webhook-Secret": "guess"}).status_code == 401
    assert calls == [(b"guess", SECRET.encode())]


def test_start_training_from_the_ml_connection_is_accepted_with_basic_auth_only(hook):
    """LS's "Start Training" posts START_TRAINING through the ML backend connection, which can send
    basic auth but no custom header; basic auth authenticates it then.  Data-carrying actions
    still need the secret."""
    client, _, queue = hook(webhook_secret=SECRET, basic_auth_user="ls", basic_auth_pass="pw")
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    assert post(client, start_training_payload(3), auth).status_code == 201
    assert queue.count == 1
    assert post(client, correction(1, timestamp(1)), auth).status_code == 401
    assert post(client, deleted_payload([1]), auth).status_code == 401
    client, _, queue = hook(webhook_secret=SECRET)  # no basic auth: nothing vouches for the caller
    assert post(client, start_training_payload(3)).status_code == 401


# ---------------------------------------------------------------------- project scope
def test_forged_delete_from_another_project_tombstones_nothing(hook, json_log):
    client, settings, _ = hook()
    assert post(client, correction(5, timestamp(1), project_id=1)).status_code == 201
    for ids in ([5], [77, 5]):  # 77 is unknown: the whole delivery is refused, all or nothing
        resp = post(client, deleted_payload(ids, project_id=999))
        assert resp.status_code == 409, resp.get_json()
        assert "annotation 5 belongs to project 1" in resp.get_json()["detail"]
    assert live(settings) == {5: (1, ["a small pink circle"])}
    assert post(client, correction(77, timestamp(1), project_id=1)).status_code == 201  # 77 not tombstoned
    assert any(r["level"] == "WARNING" and r.get("status") == 409 for r in json_log)
    resp = post(client, deleted_payload([5], project_id=1))  # the owner can delete it
    assert resp.status_code == 201 and resp.get_json()["result"]["deleted"] == 1
    assert set(live(settings)) == {77}


def test_same_annotation_id_from_another_project_does_not_move_it(hook):
    client, settings, _ = hook()
    assert post(client, correction(5, timestamp(1), project_id=1)).status_code == 201
    forged = correction(5, timestamp(2), "a forged caption", project_id=2, action="ANNOTATION_UPDATED")
    resp = post(client, forged)
    assert resp.status_code == 409 and "belongs to project 1" in resp.get_json()["detail"]
    assert live(settings) == {5: (1, ["a small pink circle"])}
    update = correction(5, timestamp(3), "a small red circle", project_id=1, action="ANNOTATION_UPDATED")
    assert post(client, update).get_json()["result"]["stored"] == "updated"
    assert live(settings) == {5: (1, ["a small red circle"])}


def test_store_refuses_a_project_change_itself(tmp_path: Path):
    store = CorrectionStore(tmp_path)
    store.apply_annotation(1, 10, timestamp(1), "img.png", 100, 80, [])
    with pytest.raises(StoreError, match="belongs to project 1") as info:
        store.apply_annotation(2, 10, timestamp(2), "img.png", 100, 80, [])
    assert info.value.status == 409
    with pytest.raises(StoreError, match="belongs to project 1"):
        store.delete_annotations(2, [10])
    assert [(a.annotation_id, a.project_id) for a in store.annotations()] == [(10, 1)]


def test_payload_and_annotation_must_name_the_same_project(hook):
    client, settings, _ = hook()
    payload = correction(5, timestamp(1), project_id=1)
    payload["annotation"]["project"] = 2
    resp = post(client, payload)
    assert resp.status_code == 400 and "project" in resp.get_json()["detail"]
    assert live(settings) == {}


# ---------------------------------------------------------------------- time
def test_updated_at_from_the_future_is_refused_and_cannot_pin_a_record(hook):
    client, settings, queue = hook(webhook_max_skew_seconds=300.0)
    resp = post(client, correction(5, "9999-12-31T23:59:59Z", "a forged caption"))
    assert resp.status_code == 422, resp.get_json()
    assert "in the future" in resp.get_json()["detail"]
    assert live(settings) == {} and queue.count == 0
    assert post(client, correction(5, now_plus(-5))).get_json()["result"]["stored"] == "created"
    # The real reviewer's next edit is not "stale": nothing from the future was stored.
    update = correction(5, now_plus(0), "a small red circle", action="ANNOTATION_UPDATED")
    assert post(client, update).get_json()["result"]["stored"] == "updated"
    assert post(client, correction(6, now_plus(120))).status_code == 201  # within the allowed skew
    assert post(client, correction(7, now_plus(900))).status_code == 422  # beyond it
    assert set(live(settings)) == {5, 6}


@pytest.mark.parametrize(
    "raw_value",
    ["NaN", "Infinity", "-Infinity", "1e308", "-1e308", "1e400", "1e20", "-5", '"9999-99-99"', '""',
     '"2025-01-01T00:00:00\\ud800"', "[1]", "true"],
)  # fmt: skip
def test_absurd_updated_at_is_a_4xx(hook, raw_value):
    client, settings, _ = hook()
    raw = json.dumps(correction(5, "PLACEHOLDER")).replace('"PLACEHOLDER"', raw_value)
    resp = post(client, None, raw=raw)
    assert 400 <= resp.status_code < 500, (raw_value, resp.status_code, resp.data[:300])
    assert resp.get_json()["detail"]
    assert live(settings) == {}


@pytest.mark.parametrize(
    "where",
    ["annotation.id", "task.id", "project.id", "annotation.project", "deleted.id"],
)
@pytest.mark.parametrize("value", [10**30, -1, 0, 2**63])
def test_out_of_range_ids_are_a_4xx(hook, where, value):
    client, settings, _ = hook()
    payload = deleted_payload([5]) if where == "deleted.id" else correction(5, timestamp(1))
    if where == "deleted.id":
        payload["annotations"] = [{"id": value}]
    else:
        obj, key = where.split(".")
        payload[obj][key] = value
    resp = post(client, payload)
    assert 400 <= resp.status_code < 500, (where, value, resp.status_code, resp.data[:300])
    assert "id" in resp.get_json()["detail"]
    assert live(settings) == {}


# ---------------------------------------------------------------------- verification (WEBHOOK_VERIFY)
class FakeLabelStudio(ThreadingHTTPServer):
    """``GET /api/annotations/<id>/`` and ``/api/tasks/<id>/`` from ``annotations`` / ``tasks``
    (404 when absent), the API token checked."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.annotations: dict[int, dict] = {}
        self.tasks: dict[int, dict] = {}
        self.requests: list[tuple[str, str | None]] = []
        super().__init__(("127.0.0.1", 0), FakeLabelStudioHandler)


class FakeLabelStudioHandler(BaseHTTPRequestHandler):
    server: FakeLabelStudio

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.requests.append((self.path, self.headers.get("Authorization")))
        parts = self.path.strip("/").split("/")
        if self.headers.get("Authorization") != f"Token {self.server.token}":
            return self._send(401, {"detail": "Authentication credentials were not provided."})
        table = {"annotations": self.server.annotations, "tasks": self.server.tasks}
        if len(parts) != 3 or parts[0] != "api" or parts[1] not in table or not parts[2].isdigit():
            return self._send(404, {"detail": "Not found."})
        item = table[parts[1]].get(int(parts[2]))
        return self._send(200, item) if item is not None else self._send(404, {"detail": "Not found."})

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def fake_ls() -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio(token="ls-api-token-123")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_verify_trains_on_what_label_studio_holds(hook, fake_ls):
    url = f"http://127.0.0.1:{fake_ls.server_address[1]}"
    client, settings, queue = hook(
        webhook_verify=True, label_studio_url=url, label_studio_api_key=fake_ls.token
    )
    real = correction(5, timestamp(1), "a small pink circle", project_id=1)
    fake_ls.annotations[5] = dict(real["annotation"])
    fake_ls.tasks[real["task"]["id"]] = dict(real["task"])

    # An id Label Studio does not have: refused, nothing stored.
    resp = post(client, correction(6, timestamp(1), project_id=1))
    assert resp.status_code == 403 and "annotation 6" in resp.get_json()["detail"]
    # The right id but another project: refused.
    resp = post(client, correction(5, timestamp(1), project_id=2))
    assert resp.status_code == 403 and "project 1" in resp.get_json()["detail"]
    # The right id with a forged result and image: what Label Studio holds is stored.
    forged = correction(5, timestamp(1), "a forged caption", project_id=1, image="http://evil/x.png")
    resp = post(client, forged)
    assert resp.status_code == 201, resp.get_json()
    assert live(settings) == {5: (1, ["a small pink circle"])}
    assert open_store(settings.data_dir).annotations()[0].image == "/data/upload/1/img.png"
    assert ("/api/annotations/5/", f"Token {fake_ls.token}") in fake_ls.requests
    assert queue.count == 1

    # A delete Label Studio has not done (the annotation is still there): refused.
    resp = post(client, deleted_payload([5], project_id=1))
    assert resp.status_code == 403 and "still exists" in resp.get_json()["detail"]
    assert set(live(settings)) == {5}
    del fake_ls.annotations[5]
    assert post(client, deleted_payload([5], project_id=1)).status_code == 201
    assert live(settings) == {}


def test_verify_with_label_studio_unreachable_stores_nothing(hook):
    client, settings, _ = hook(
        webhook_verify=True, label_studio_url="http://127.0.0.1:1", label_studio_api_key="k"
    )
    resp = post(client, correction(5, timestamp(1)))
    assert resp.status_code == 503 and "verify" in resp.get_json()["detail"]
    assert live(settings) == {}
