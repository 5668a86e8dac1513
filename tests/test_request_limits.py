"""Requests that cost without bound (issue 14): nesting depth, streamed bodies, non-finite numbers,
lone surrogates, text sizes, tasks per request, and /predict memory bounded by chunks.

Each case answered 500, was silently truncated or grew memory with the request before the fix.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from werkzeug.serving import make_server
from werkzeug.test import EnvironBuilder, run_wsgi_app

from backend.app import create_app
from backend.label_config import parse_label_config
from backend.observability import JsonFormatter
from backend.predictions import predict_tasks
from backend.serving import ModelHolder
from backend.store import open_store
from model.checkpoint import load_model
from model.inference.engine import InferenceEngine
from tests.redis_helpers import CLOSED_REDIS_URL
from tests.test_backend_app import (
    CAPTION_XML,
    SCENE,
    SETUP_PAYLOAD,
    ls_task,
    make_settings,
    predict_payload,
    rect,
)
from tests.test_predictions import DictFetcher, scene
from tests.test_predictions import ls_task as plain_task
from tools.ls.payloads import annotation_payload, region_items, timestamp

DEEP = 100_000
ENDPOINTS = ("/predict", "/webhook", "/setup")


@pytest.fixture()
def json_log() -> Iterator[list[dict]]:
    records: list[dict] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(JsonFormatter().format(record)))

    handler = Capture(level=logging.DEBUG)
    logging.getLogger("backend").addHandler(handler)
    yield records
    logging.getLogger("backend").removeHandler(handler)


@pytest.fixture()
def client_for(tmp_path: Path, tiny_checkpoint: Path):
    """``client_for(**settings)`` -> (Flask test client, settings)."""

    def make(**overrides):
        settings = make_settings(
            tmp_path, tiny_checkpoint, data_dir=tmp_path / "data", redis_url=CLOSED_REDIS_URL, **overrides
        )
        return create_app(settings, ModelHolder(settings)).test_client(), settings

    return make


def detail(resp) -> str:
    body = resp.get_json()
    assert body is not None, resp.data[:300]
    # the app answers {"status": code, ...}; a webhook refusal {"status": "error", ...} (LS's shape)
    assert body["status"] in (resp.status_code, "error") and "Traceback" not in body["detail"]
    return body["detail"]


def assert_refusal_logged(json_log: list[dict], status: int, reason: str) -> None:
    """The refusal's reason is logged at WARNING with the status (one JSON line)."""
    hits = [
        r
        for r in json_log
        if r["level"] == "WARNING" and r.get("status") == status and r.get("reason") == reason
    ]
    assert hits, [r for r in json_log if r["level"] == "WARNING"]


# ---------------------------------------------------------------------- nesting depth
@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_json_is_a_400_with_the_reason(client_for, json_log, path, opener):
    client, _ = client_for(max_body_mb=2.0)
    closer = "]" if opener == "[" else "}"
    body = '{"tasks": ' + opener * DEEP + "1" + closer * DEEP + "}"
    resp = client.post(path, data=body, content_type="application/json")
    assert resp.status_code == 400, resp.data[:300]
    reason = detail(resp)
    assert "nested deeper than" in reason and "MAX_JSON_DEPTH" in reason
    assert_refusal_logged(json_log, 400, reason)
    assert client.get("/health").status_code == 200


def test_nesting_within_the_limit_and_brackets_inside_strings_are_fine(client_for):
    client, settings = client_for(max_json_depth=12)
    text = '[[[[[[[[[[[[[[[[[[[[{{{{{{{{{{\\"'  # brackets (and an escaped quote) inside a string
    ok = {**SETUP_PAYLOAD, "extra_params": {"text": text, "deep": [[[[[1]]]]]}}
    assert client.post("/setup", json=ok).status_code == 200
    too_deep = {**SETUP_PAYLOAD, "extra_params": json.loads("[" * 12 + "]" * 12)}
    resp = client.post("/setup", json=too_deep)
    assert resp.status_code == 400 and "nested deeper than 12" in detail(resp)


# ---------------------------------------------------------------------- streamed bodies
class Stream:
    """A request body of ``total`` bytes produced on demand (a JSON object with one long string)."""

    def __init__(self, total: int) -> None:
        self.head, self.tail = b'{"schema": "', b'"}'
        self.total = total
        self.sent = 0

    def read(self, size: int = -1) -> bytes:
        size = self.total - self.sent if size < 0 else min(size, self.total - self.sent)
        out = bytearray()
        while len(out) < size:
            pos = self.sent + len(out)
            if pos < len(self.head):
                out += self.head[pos : pos + size - len(out)]
            elif pos >= self.total - len(self.tail):
                k = pos - (self.total - len(self.tail))
                out += self.tail[k : k + size - len(out)]
            else:
                out += b"x" * min(size - len(out), self.total - len(self.tail) - pos)
        self.sent += len(out)
        return bytes(out)


def post_stream(app, path: str, stream) -> tuple[int, dict]:
    """POST ``stream`` with no Content-Length, the way a WSGI server passes a chunked body on
    (``wsgi.input_terminated``: the server ends the stream)."""
    environ = EnvironBuilder(path=path, method="POST", content_type="application/json").get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"wsgi.input": stream, "wsgi.input_terminated": True})
    app_iter, status, _ = run_wsgi_app(app, environ, buffered=True)
    code, body = int(status.split()[0]), json.loads(b"".join(app_iter))
    if code >= 400:
        assert body["status"] == code and "Traceback" not in body["detail"]
    return code, body


def test_streamed_body_over_the_limit_is_413_not_truncated(client_for, json_log):
    """No Content-Length (chunked): 50 MB against a 10 MiB limit."""
    client, _ = client_for(max_body_mb=10.0)
    stream = Stream(50 * 10**6)
    status, body = post_stream(client.application, "/setup", stream)
    assert status == 413, body
    assert "MAX_BODY_MB" in body["detail"]
    assert_refusal_logged(json_log, 413, body["detail"])
    assert stream.sent <= 10 * 2**20 + 2**17  # it stopped reading at the limit


def test_streamed_body_under_the_limit_is_read_whole(client_for):
    client, _ = client_for(max_body_mb=1.0)
    status, body = post_stream(client.application, "/setup", _Bytes(json.dumps(SETUP_PAYLOAD).encode()))
    assert status == 200, body


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.pos + size
        out, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return out


def test_chunked_50mb_to_a_real_server_is_413(client_for):
    """The same over a socket: HTTP/1.1 chunked transfer to werkzeug's server on loopback."""
    client, settings = client_for(max_body_mb=10.0)
    server = make_server("127.0.0.1", 0, client.application, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=30)
        sock.sendall(
            b"POST /setup HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 2**16
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        sent = 0
        response = b""
        deadline = time.monotonic() + 60
        while sent < 50 * 10**6 and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                break  # the server answered before the body ended
            if writable:
                try:
                    sock.sendall(frame if sent else b"10\r\n" + b'{"schema": "xxxx' + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(chunk)
        try:
            while b"\r\n\r\n" not in response or len(response) < 200:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except ConnectionResetError:
            pass
        sock.close()
    finally:
        server.shutdown()
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert b"MAX_BODY_MB" in response
    assert sent < 20 * 10**6  # refused near the 10 MiB limit, not after the whole 50 MB


# ---------------------------------------------------------------------- numbers and text
@pytest.mark.parametrize("literal", ["1e400", "-1e400", "Infinity", "-Infinity", "NaN"])
def test_non_finite_numbers_are_a_400(client_for, json_log, literal):
    client, _ = client_for()
    raw = json.dumps(predict_payload([ls_task(1, [rect("a", SCENE.objects[0].box)])]))
    raw = raw.replace('"width": ', f'"width": {literal}, "_w": ', 1)
    resp = client.post("/predict", data=raw, content_type="application/json")
    assert resp.status_code == 400, resp.data[:300]
    reason = detail(resp)
    assert literal in reason and "finite" in reason
    assert_refusal_logged(json_log, 400, reason)


@pytest.mark.parametrize("size", [1e300, 10**30, 2**31])
def test_absurd_image_sizes_in_a_webhook_are_skipped_not_a_500(client_for, size):
    client, settings = client_for()
    items = region_items("r1", (10, 10, 40, 40), 100, 100, "a small pink circle")
    for item in items:
        item["original_width"] = size
    resp = client.post("/webhook", json=annotation_payload(5, items, timestamp(1)))
    assert resp.status_code == 201, resp.data[:300]
    result = resp.get_json()["result"]
    assert result["regions"] == 0 and any("original_width" in s for s in result["skipped"])


@pytest.mark.parametrize("path", ENDPOINTS)
def test_lone_surrogate_is_a_400_on_every_endpoint(client_for, path):
    client, settings = client_for()
    items = region_items("r1", (10, 10, 40, 40), 100, 100, "PLACEHOLDER", ["pink"])
    payloads = {
        "/webhook": annotation_payload(5, items, timestamp(1)),
        "/predict": predict_payload([ls_task(1, [rect("PLACEHOLDER", SCENE.objects[0].box)])]),
        "/setup": {**SETUP_PAYLOAD, "project": "PLACEHOLDER"},
    }
    raw = json.dumps(payloads[path]).replace("PLACEHOLDER", "a \\ud800 circle")
    resp = client.post(path, data=raw, content_type="application/json")
    assert resp.status_code == 400, resp.data[:300]
    assert "surrogate" in detail(resp)
    assert open_store(settings.data_dir).annotations() == []
    paired = json.dumps(payloads[path]).replace("PLACEHOLDER", "a \\ud83d\\ude00 circle")  # a real emoji
    assert client.post(path, data=paired, content_type="application/json").status_code < 500


def test_huge_caption_is_refused_with_the_limit(client_for, json_log):
    client, settings = client_for(max_body_mb=10.0)
    items = region_items("r1", (10, 10, 40, 40), 100, 100, "x" * 5_000_000, ["pink"])
    resp = client.post("/webhook", json=annotation_payload(5, items, timestamp(1)))
    assert resp.status_code == 422, resp.data[:300]
    reason = detail(resp)
    assert "5000000 characters" in reason and "MAX_TEXT_CHARS" in reason
    assert_refusal_logged(json_log, 422, reason)
    assert open_store(settings.data_dir).annotations() == []
    ok = region_items("r1", (10, 10, 40, 40), 100, 100, "y" * settings.max_text_chars, ["pink"])
    assert client.post("/webhook", json=annotation_payload(6, ok, timestamp(1))).status_code == 201


def test_long_region_ids_are_refused(client_for):
    client, settings = client_for(max_body_mb=10.0)
    items = region_items("r" * 100_000, (10, 10, 40, 40), 100, 100, "a small pink circle")
    resp = client.post("/webhook", json=annotation_payload(5, items, timestamp(1)))
    assert resp.status_code == 422 and "MAX_TEXT_CHARS" in detail(resp)
    assert open_store(settings.data_dir).annotations() == []


# ---------------------------------------------------------------------- tasks per request, chunks
def test_too_many_tasks_is_a_413_with_the_setting(client_for, json_log):
    client, _ = client_for(max_tasks_per_request=3, max_body_mb=2.0)
    tasks = [ls_task(n, [rect("a", SCENE.objects[0].box)]) for n in range(4)]
    resp = client.post("/predict", json=predict_payload(tasks, CAPTION_XML))
    assert resp.status_code == 413
    reason = detail(resp)
    assert "4 tasks" in reason and "MAX_TASKS_PER_REQUEST" in reason and "3" in reason
    assert_refusal_logged(json_log, 413, reason)
    assert client.post("/predict", json=predict_payload(tasks[:3], CAPTION_XML)).status_code == 200


class SpyEngine(InferenceEngine):
    """The real engine, recording how many images each call was handed."""

    calls: list[int]

    def answer(self, images, boxes, queries, masks=None):
        self.calls.append(len(images))
        return super().answer(images, boxes, queries, masks)


def test_predict_works_in_bounded_chunks_and_encodes_each_image_once(tiny_checkpoint):
    """Memory follows the work in flight: no engine call holds more than PREDICT_CHUNK_TASKS
    images, and an image repeated across tasks (same URL, or same bytes at another URL) is encoded
    once for the whole request."""
    engine = SpyEngine(load_model(tiny_checkpoint), "1.0.0", max_new_tokens=2)
    engine.calls = []
    scenes = [scene(20 + k) for k in range(3)]
    fetcher = DictFetcher({"a": scenes[0].image, "b": scenes[1].image, "c": scenes[2].image,
                           "a-again": scenes[0].image})  # fmt: skip
    refs = (["a"] * 12) + ["b", "a-again", "c", "a", "b", "c"] * 3
    tasks = []
    for n, ref in enumerate(refs):
        sc = scenes[{"a": 0, "a-again": 0, "b": 1, "c": 2}[ref]]
        box = sc.objects[n % 3].box
        tasks.append(plain_task(n, ref, data={"image": ref, "boxes": [list(box)]}))
    cfg = parse_label_config(CAPTION_XML)
    settings = replace(make_settings(Path("/nonexistent"), tiny_checkpoint), predict_chunk_tasks=4)
    results, stats = predict_tasks(tasks, cfg, None, engine, "1.0.0", fetcher, settings)
    assert len(results) == len(tasks) == stats.tasks
    assert all(r["result"] and r["result"][0]["id"] == "box1" for r in results)
    assert max(engine.calls) <= 4 and sum(engine.calls) == len(tasks)
    assert engine.stats.image_cache_misses == 3  # three distinct images, each encoded once
