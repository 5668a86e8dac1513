"""Security: basic auth on every endpoint but /health, Redis with a password, secrets never logged,
tampered checkpoints refused while the current version keeps serving."""

from __future__ import annotations

import base64
import io
import logging
import shutil
import socket
import subprocess
import time
from dataclasses import replace

import pytest
from redis import Redis

from backend.app import create_app
from backend.jobs import flush_outbox, request_training
from backend.observability import JsonFormatter
from backend.registry import ModelRegistry
from backend.serving import ModelHolder
from backend.store import open_store
from tests.test_backend_app import SCENE, SETUP_PAYLOAD, detail, ls_task, make_settings, predict_payload, rect

GUARDED = [
    ("POST", "/setup"),
    ("POST", "/predict"),
    ("POST", "/webhook"),
    ("GET", "/versions"),
    ("GET", "/metrics"),
]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_guards_every_endpoint_but_health(tmp_path, tiny_checkpoint):
    settings = make_settings(tmp_path, tiny_checkpoint, basic_auth_user="ls", basic_auth_pass="s3cret")
    client = create_app(settings, ModelHolder(settings)).test_client()
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    refused = [
        {},
        basic("ls", "wrong"),
        basic("other", "s3cret"),
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Bearer s3cret"},
    ]
    for method, path in GUARDED:
        for headers in refused:
            resp = client.open(path, method=method, headers=headers, json=SETUP_PAYLOAD)
            assert resp.status_code == 401, (method, path, headers)
            assert "authentication required" in detail(resp)
        resp = client.open(path, method=method, headers=basic("ls", "s3cret"), json=SETUP_PAYLOAD)
        assert resp.status_code != 401, (method, path)


@pytest.fixture()
def redis_with_password(tmp_path):
    """A private redis-server on a free port that requires a password."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server binary not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "p@ss word",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            Redis(port=port, password="p@ss word").ping()
            break
        except Exception:
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(10)


def test_redis_url_with_password(tmp_path, tiny_checkpoint, redis_with_password, caplog):
    port = redis_with_password
    good = f"redis://:p%40ss%20word@127.0.0.1:{port}/0"
    settings = make_settings(tmp_path, tiny_checkpoint, data_dir=tmp_path / "data", redis_url=good)
    outcome = request_training(7, settings, Redis.from_url(good))
    assert outcome.state == "enqueued"
    wrong = replace(settings, redis_url=f"redis://:nope@127.0.0.1:{port}/0")
    store = open_store(wrong.data_dir)
    store.request_training(8, "test")
    with caplog.at_level(logging.WARNING):
        result = flush_outbox(wrong, store)
    assert result[8].startswith("error:")
    assert [r.project_id for r in store.pending_requests()] == [8]  # kept for later
    assert "nope" not in caplog.text and "p@ss" not in caplog.text


def test_api_key_and_passwords_never_logged(tmp_path, tiny_checkpoint):
    settings = make_settings(
        tmp_path, tiny_checkpoint, label_studio_url="http://127.0.0.1:1",
        label_studio_api_key="tok-SECRET-42", basic_auth_user="ls", basic_auth_pass="pw-SECRET-43",
        redis_url="redis://:redis-SECRET-44@127.0.0.1:1/0", data_dir=tmp_path / "data",
    )  # fmt: skip
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("backend")
    logger.addHandler(handler)
    try:
        client = create_app(settings, ModelHolder(settings)).test_client()
        auth = basic("ls", "pw-SECRET-43")
        task = ls_task(1, [rect("a", SCENE.objects[0].box)], image="/data/upload/1/scene.png")
        resp = client.post("/predict", json=predict_payload([task]), headers=auth)
        assert resp.status_code in (502, 504) and "tok-SECRET" not in resp.text
        client.post("/setup", json=SETUP_PAYLOAD, headers=auth)
        client.post("/setup", json=SETUP_PAYLOAD, headers=basic("ls", "wrong-SECRET-45"))
    finally:
        logger.removeHandler(handler)
    logs = stream.getvalue()
    assert "backend starting" in logs and "request" in logs
    for secret in ("tok-SECRET-42", "pw-SECRET-43", "redis-SECRET-44", "wrong-SECRET-45"):
        assert secret not in logs, secret


def test_tampered_checkpoint_is_refused_and_current_version_keeps_serving(tmp_path, tiny_checkpoint):
    settings = make_settings(tmp_path, tiny_checkpoint)
    holder = ModelHolder(settings)
    client = create_app(settings, holder).test_client()
    payload = predict_payload([ls_task(1, [rect("a", SCENE.objects[0].box)])])
    assert client.post("/predict", json=payload).status_code == 200
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    for version, damage in (("1.1.0", "truncate"), ("1.2.0", "flip"), ("1.3.0", "pickle")):
        staged = registry.staging()
        shutil.rmtree(staged)
        shutil.copytree(tiny_checkpoint, staged)
        weights = staged / "model.safetensors"
        data = weights.read_bytes()
        if damage == "truncate":
            weights.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            weights.write_bytes(b"\x00\xff" * 8 + data[16:])  # header length now nonsense
        else:
            weights.unlink()
            (staged / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle: never loaded
        registry.commit_folder(staged, version)
        registry.promote(version, reason="tampered")
        assert not holder.wait_for_version(version, timeout=3)
        for _ in range(3):
            resp = client.post("/predict", json=payload)
            assert resp.status_code == 200
            assert resp.get_json()["results"][0]["model_version"] == "1.0.0"
        health = client.get("/health").get_json()
        assert health["status"] == "UP" and health["model_version"] == "1.0.0"
        assert version in holder.error and (
            "safetensors" in holder.error or "model.safetensors" in holder.error
        )
