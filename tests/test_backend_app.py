"""The Flask app with Label Studio 1.23.2 payloads (shapes from the protocol reference, §1.4-1.7)."""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

import backend.app as app_module
from backend.app import create_app
from backend.corrections import CorrectionError
from backend.errors import ClientError
from backend.images import ImageError
from backend.label_config import ConfigError
from backend.observability import JsonFormatter
from backend.predictions import PredictionError
from backend.registry import ModelRegistry
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.store import StoreError
from backend.webhooks import PayloadError
from model.checkpoint import load_model
from model.geometry import pixels_to_percent
from tests.model_helpers import png_bytes
from toyworld.scenes import SceneSpec, make_scene

CONFIGS = Path(__file__).resolve().parents[1] / "label_config"
CAPTION_XML = (CONFIGS / "region_caption.xml").read_text()
ATTR_XML = (CONFIGS / "caption_attributes.xml").read_text()
REL_XML = (CONFIGS / "caption_relations.xml").read_text()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


SCENE = make_scene(random.Random(11), SceneSpec(min_objects=3, max_objects=3))
IMAGE_URL = data_url(SCENE.image)


def rect(rid: str, box, w: int = SCENE.width, h: int = SCENE.height) -> dict:
    return {
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {**pixels_to_percent(box, w, h), "rotation": 0, "rectanglelabels": ["Object"]},
        "id": rid,
        "from_name": "bbox",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def ls_task(task_id: int, result: list[dict] | None = None, image: str = IMAGE_URL) -> dict:
    annotations = []
    if result is not None:
        annotations = [
            {"id": 100 + task_id, "result": result, "was_cancelled": False, "created_at": "2026-01-01"}
        ]
    return {
        "id": task_id,
        "data": {"image": image},
        "meta": {},
        "created_at": "2026-05-01T10:00:00.000000Z",
        "updated_at": "2026-05-01T10:00:00.000000Z",
        "is_labeled": bool(result),
        "overlap": 1,
        "inner_id": task_id,
        "total_annotations": len(annotations),
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": 1,
        "updated_by": None,
        "file_upload": "61d70099-scene.png",
        "comment_authors": [],
        "annotations": annotations,
        "predictions": [],
    }


def predict_payload(tasks: list[dict], xml: str = CAPTION_XML, context: dict | None = None) -> dict:
    return {
        "tasks": tasks,
        "project": "1.1795583044",
        "label_config": xml,
        "params": {"login": None, "password": None, "context": context},
    }


SETUP_PAYLOAD = {
    "project": "1.1795583044",
    "schema": ATTR_XML,
    "hostname": "http://localhost:8080",
    "access_token": "0123456789abcdef",
    "extra_params": None,
}


def make_settings(tmp_path: Path, checkpoint: Path, **overrides) -> Settings:
    base = Settings(
        model_dir=tmp_path / "models",
        default_model=checkpoint,
        max_new_tokens=4,
        max_regions=5,
        max_body_mb=0.5,
        model_poll_seconds=0.0,
        label_studio_api_key="supersecret-key",
    )
    return replace(base, **overrides)


class CountingLoader:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, folder: Path, version: str):
        self.calls.append(version)
        return load_model(folder)


@pytest.fixture()
def env(tmp_path, tiny_checkpoint):
    settings = make_settings(tmp_path, tiny_checkpoint)
    loader = CountingLoader()
    holder = ModelHolder(settings, loader=loader)
    app = create_app(settings, holder)
    return app.test_client(), holder, loader, settings


def detail(resp) -> str:
    body = resp.get_json()
    assert body is not None, resp.data[:200]
    assert body["status"] == resp.status_code
    assert "Traceback" not in body["detail"]
    return body["detail"]


def test_health_and_root(env):
    client, *_ = env
    for path in ("/health", "/"):
        body = client.get(path).get_json()
        assert body["status"] == "UP" and body["model_class"] and body["model_version"] == "1.0.0"


def test_setup_is_fast_and_never_loads_again(env):
    client, holder, loader, _ = env
    holder.get()
    for _ in range(5):
        started = time.perf_counter()
        resp = client.post("/setup", json=SETUP_PAYLOAD)
        assert time.perf_counter() - started < 0.5
        body = resp.get_json()
        assert resp.status_code == 200 and body["model_version"] == "1.0.0"
        assert body["mapping"] and body["warnings"] == []  # /setup says what it will serve (issue 15.7)
    assert loader.calls == ["1.0.0"]


def test_setup_rejects_unservable_config(env):
    client, *_ = env
    resp = client.post(
        "/setup", json={**SETUP_PAYLOAD, "schema": '<View><Image name="i" value="$image"/></View>'}
    )
    assert resp.status_code == 400 and "RectangleLabels" in detail(resp)
    resp = client.post("/setup", json={**SETUP_PAYLOAD, "schema": None})
    assert resp.status_code == 400 and "schema" in detail(resp)


def test_batch_predict_one_prediction_per_task(env):
    client, *_ = env
    tasks = [
        ls_task(1, [rect(f"a{k}", o.box) for k, o in enumerate(SCENE.objects)]),
        ls_task(2, [rect("b0", SCENE.objects[0].box)]),
        ls_task(3),  # no boxes anywhere -> [] (Label Studio stores no prediction), still one entry per task
    ]
    resp = client.post("/predict", json=predict_payload(tasks, ATTR_XML))
    assert resp.status_code == 200
    results = resp.get_json()["results"]
    assert len(results) == 3
    ids = [{(r["id"], r["from_name"]) for r in p["result"]} for p in results[:2]]
    # every box gets its rectangle and caption; choices only when the (random) model says a declared value
    assert {(f"a{k}", n) for k in range(3) for n in ("bbox", "caption")} <= ids[0]
    assert ids[0] <= {(f"a{k}", n) for k in range(3) for n in ("bbox", "caption", "color", "shape", "size")}
    assert {("b0", "bbox"), ("b0", "caption")} <= ids[1]
    assert results[2] == []
    for p in results[:2]:
        assert p["model_version"] == "1.0.0"
    assert isinstance(results[0]["score"], float)


def test_interactive_context_returns_the_new_box(env):
    client, holder, *_ = env
    ctx = {"result": [rect("userBox1", SCENE.objects[1].box)]}
    task = {**ls_task(5), "drafts": [], "allow_skip": True}
    resp = client.post("/predict", json=predict_payload([task], CAPTION_XML, ctx))
    assert resp.status_code == 200
    (pred,) = resp.get_json()["results"]
    assert {(r["id"], r["type"]) for r in pred["result"]} == {
        ("userBox1", "rectanglelabels"),
        ("userBox1", "textarea"),
    }
    misses = holder.engine_if_loaded().stats.image_cache_misses
    ctx["result"].append(rect("userBox2", SCENE.objects[2].box))
    resp = client.post("/predict", json=predict_payload([task], CAPTION_XML, ctx))
    assert {r["id"] for r in resp.get_json()["results"][0]["result"]} == {"userBox2"}
    assert holder.engine_if_loaded().stats.image_cache_misses == misses  # same image: not re-encoded


def test_relations_config(env):
    client, *_ = env
    tasks = [ls_task(1, [rect(f"r{k}", o.box) for k, o in enumerate(SCENE.objects)])]
    resp = client.post("/predict", json=predict_payload(tasks, REL_XML))
    assert resp.status_code == 200
    for item in resp.get_json()["results"][0]["result"]:
        if item["type"] == "relation":
            assert {item["from_id"], item["to_id"]} <= {"r0", "r1", "r2"} and item["labels"]


@pytest.mark.parametrize(
    "make_body, status, needle",
    [
        (lambda: b"{not json", 400, "malformed JSON"),
        (lambda: b"[1, 2]", 400, "must be an object"),
        (lambda: b"", 400, "empty"),
        (lambda: {"label_config": CAPTION_XML}, 400, "tasks"),
        (lambda: predict_payload([]), 400, "tasks"),
        (lambda: predict_payload([ls_task(1)], xml=None), 400, "label_config"),
        (
            lambda: predict_payload([ls_task(1)], xml='<View><Image name="i" value="$image"/></View>'),
            400,
            "Rectangle",
        ),
        (lambda: predict_payload([{"id": 1, "data": {}}]), 400, "no image"),
        (lambda: predict_payload([ls_task(1, [rect("z", (10, 10, 10, 30))])]), 400, "zero or negative area"),
        (lambda: predict_payload([ls_task(1, [rect("o", (5000, 5000, 5100, 5100))])]), 400, "outside"),
        (
            lambda: predict_payload([ls_task(1, [rect(f"m{i}", (1, 1, 9, 9)) for i in range(6)])]),
            400,
            "at most 5",
        ),
        (
            lambda: predict_payload(
                [ls_task(1)], context={"result": [{**rect("u", (1, 1, 9, 9)), "from_name": "nope"}]}
            ),
            400,
            "from_name 'nope'",
        ),
        (
            lambda: predict_payload(
                [ls_task(1, [rect("n", (1, 1, 9, 9))], image="data:text/plain;base64,aGVsbG8=")]
            ),
            415,
            "not an image",
        ),
        (
            lambda: predict_payload([ls_task(1, [rect("f", (1, 1, 9, 9))], image="file:///etc/passwd")]),
            400,
            "scheme",
        ),
        (lambda: {**predict_payload([ls_task(1)]), "pad": "x" * 600_000}, 413, "MAX_BODY_MB"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_server_keeps_serving(env, make_body, status, needle):
    client, *_ = env
    body = make_body()
    if isinstance(body, bytes):
        resp = client.post("/predict", data=body, content_type="application/json")
    else:
        resp = client.post("/predict", json=body)
    assert resp.status_code == status, resp.data[:300]
    assert needle in detail(resp)
    assert client.get("/health").status_code == 200


def test_nan_box_in_raw_json(env):
    client, *_ = env
    payload = json.dumps(predict_payload([ls_task(1, [rect("nan", (1, 1, 9, 9))])]))
    payload = payload.replace('"x": 0.', '"x": NaN, "_": 0.', 1)
    resp = client.post("/predict", data=payload, content_type="application/json")
    assert resp.status_code == 400 and "NaN" in detail(resp)


@pytest.fixture()
def json_log():
    """The ``backend`` loggers' records as the JSON lines the app writes."""
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(JsonFormatter().format(record))

    handler = Capture()
    logging.getLogger("backend").addHandler(handler)
    yield records
    logging.getLogger("backend").removeHandler(handler)


def test_refusals_are_logged_as_json_with_the_detail_and_counted(env, json_log):
    client, *_ = env
    image = client.post(
        "/predict", json=predict_payload([ls_task(1, [rect("f", (1, 1, 9, 9))], image="file:///etc/passwd")])
    )
    empty = client.post("/setup", data=b"", content_type="application/json")
    assert (image.status_code, empty.status_code) == (400, 400)
    refused = [json.loads(r) for r in json_log if json.loads(r)["message"] == "refused"]
    assert [(r["level"], r["path"], r["status"], r["error"]) for r in refused] == [
        ("WARNING", "/predict", 400, "ImageError"),
        ("WARNING", "/setup", 400, "BodyError"),
    ]
    assert [r["reason"] for r in refused] == [detail(image), detail(empty)]
    text = client.get("/metrics").text
    assert 'roi_image_errors_total{status="400"} 1.0' in text  # only the image refusal
    assert 'roi_http_requests_total{endpoint="/setup",method="POST",status="400"} 1.0' in text


def test_every_refusal_is_a_client_error_with_message_then_status():
    for cls in (ImageError, PredictionError, ConfigError, CorrectionError, PayloadError, StoreError):
        exc = cls("why", 404)
        assert isinstance(exc, ClientError) and (str(exc), exc.message, exc.status) == ("why", "why", 404)
        assert cls("why").status == 400, cls


def test_unexpected_error_is_json_500_and_logged_with_traceback(env, monkeypatch, json_log):
    client, *_ = env
    records = json_log

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom inside")

    monkeypatch.setattr(app_module, "predict_tasks", boom)
    resp = client.post("/predict", json=predict_payload([ls_task(1, [rect("a", (1, 1, 9, 9))])]))
    assert resp.status_code == 500
    assert "kaboom" not in detail(resp) and "error id" in detail(resp)
    assert any("Traceback" in r and "kaboom inside" in r for r in records)
    assert all("supersecret-key" not in r for r in records)
    for line in records:
        json.loads(line)  # structured: one JSON object per line


def test_unknown_route_and_method_are_json(env):
    client, *_ = env
    assert client.get("/nope").status_code == 404 and detail(client.get("/nope"))
    resp = client.get("/predict")
    assert resp.status_code == 405 and detail(resp)


def test_webhook_delegates(env, monkeypatch):
    client, _, _, settings = env
    seen = []

    def fake(payload, s, secret, basic_auth):
        seen.append((payload["action"], s is settings, secret, basic_auth))
        return 201, {"result": "stored", "status": "ok"}

    monkeypatch.setattr(app_module.webhooks, "handle_webhook", fake)
    payload = {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": 7,
            "task": 1,
            "project": 1,
            "result": [rect("a", (1, 1, 9, 9))],
            "was_cancelled": False,
        },
        "task": {"id": 1, "data": {"image": "/data/upload/1/x.png"}, "meta": {}, "project": 1},
        "project": {"id": 1, "label_config": CAPTION_XML, "model_version": "1.0.0"},
    }
    resp = client.post("/webhook", json=payload, headers={"X-Webhook-Secret": "from-ls"})
    assert resp.status_code == 201 and resp.get_json() == {"result": "stored", "status": "ok"}
    assert seen == [("ANNOTATION_CREATED", True, "from-ls", False)]  # the header is handed on
    assert 'roi_webhooks_total{action="ANNOTATION_CREATED",status="201"} 1.0' in client.get("/metrics").text


def test_versions_and_metrics(env):
    client, *_ = env
    client.post("/predict", json=predict_payload([ls_task(1, [rect("a", SCENE.objects[0].box)])]))
    assert client.get("/versions").get_json() == {"versions": ["1.0.0"], "current": "1.0.0"}
    text = client.get("/metrics").text
    for needle in (
        'roi_http_requests_total{endpoint="/predict",method="POST",status="200"} 1.0',
        "roi_http_request_seconds_bucket",
        "roi_regions_captioned_total 1.0",
        "roi_engine_cache_misses_total 1.0",
        'roi_model_info{version="1.0.0"} 1.0',
        "roi_training_queue_length ",
        "roi_training_jobs_running ",
        "roi_training_requests_pending ",
    ):
        assert needle in text, needle


def test_basic_auth(tmp_path, tiny_checkpoint):
    settings = make_settings(tmp_path, tiny_checkpoint, basic_auth_user="ls", basic_auth_pass="pw")
    client = create_app(settings, ModelHolder(settings)).test_client()
    assert client.get("/health").status_code == 200
    resp = client.post("/setup", json=SETUP_PAYLOAD)
    assert resp.status_code == 401 and detail(resp) and resp.headers["WWW-Authenticate"].startswith("Basic")
    bad = base64.b64encode(b"ls:wrong").decode()
    assert (
        client.post("/setup", json=SETUP_PAYLOAD, headers={"Authorization": f"Basic {bad}"}).status_code
        == 401
    )
    good = base64.b64encode(b"ls:pw").decode()
    assert (
        client.post("/setup", json=SETUP_PAYLOAD, headers={"Authorization": f"Basic {good}"}).status_code
        == 200
    )
    assert client.get("/metrics", headers={"Authorization": f"Basic {good}"}).status_code == 200
    assert client.get("/metrics").status_code == 401


def test_new_version_is_swapped_in_without_dropping_requests(env, tiny_checkpoint):
    client, holder, loader, settings = env
    holder.get()
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    staged = registry.staging()
    shutil.rmtree(staged)
    shutil.copytree(tiny_checkpoint, staged)
    registry.commit_folder(staged, "1.1.0")
    payload = predict_payload([ls_task(1, [rect("a", SCENE.objects[0].box)])])
    statuses: list[int] = []
    versions: list[str] = []

    def hammer() -> None:
        for _ in range(6):
            resp = client.post("/predict", json=payload)
            statuses.append(resp.status_code)
            versions.append(resp.get_json()["results"][0]["model_version"])

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    registry.promote("1.1.0", reason="test")
    for t in threads:
        t.join()
    assert holder.wait_for_version("1.1.0", timeout=30)
    assert statuses and set(statuses) == {200}
    assert set(versions) <= {"1.0.0", "1.1.0"}
    resp = client.post("/predict", json=payload)
    assert resp.get_json()["results"][0]["model_version"] == "1.1.0"
    assert client.post("/setup", json=SETUP_PAYLOAD).get_json()["model_version"] == "1.1.0"
    assert client.get("/versions").get_json() == {"versions": ["1.0.0", "1.1.0"], "current": "1.1.0"}
    assert loader.calls == ["1.0.0", "1.1.0"]


def test_refusals_outside_the_views_are_logged_and_counted_too(
    tmp_path, tiny_checkpoint, json_log, monkeypatch
):
    """Label Studio shows none of these bodies: a wrong password, an unknown route or method and a
    model that is not there leave their reason in one WARNING line each, and a count."""
    from backend.serving import ModelUnavailable

    settings = make_settings(tmp_path, tiny_checkpoint, basic_auth_user="ls", basic_auth_pass="pw")
    holder = ModelHolder(settings)
    client = create_app(settings, holder).test_client()
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    wrong = client.post("/setup", json=SETUP_PAYLOAD, headers={"Authorization": "Basic \xe9"})
    missing = client.post("/train", json={}, headers=auth)
    method = client.get("/predict", headers=auth)

    def gone():
        raise ModelUnavailable("no model could be loaded: test")

    monkeypatch.setattr(holder, "get", gone)
    down = client.post(
        "/predict", json=predict_payload([ls_task(1, [rect("a", (1, 1, 9, 9))])]), headers=auth
    )
    responses = [wrong, missing, method, down]
    assert [r.status_code for r in responses] == [401, 404, 405, 503]
    assert wrong.headers["WWW-Authenticate"].startswith("Basic")
    refused = [json.loads(r) for r in json_log if json.loads(r)["message"] == "refused"]
    assert [(r["level"], r["path"], r["status"]) for r in refused] == [
        ("WARNING", "/setup", 401),
        ("WARNING", "/train", 404),
        ("WARNING", "/predict", 405),
        ("WARNING", "/predict", 503),
    ]
    assert [r["reason"] for r in refused] == [detail(r) for r in responses]
    text = client.get("/metrics", headers=auth).text
    for code in ("auth", "http", "model_unavailable"):
        assert f'reason="{code}"' in text


def test_made_up_methods_and_actions_add_no_metric_series(env):
    client, *_ = env
    for k in range(20):
        client.open("/predict", method=f"FOO{k}")
        client.post("/webhook", json={"action": f"MADE_UP_{k}"})
    text = client.get("/metrics").text
    assert "FOO" not in text and "MADE_UP" not in text
    assert 'method="OTHER"' in text and 'action="OTHER"' in text


def test_odd_digits_and_huge_integers_are_refused_not_500(env):
    client, *_ = env
    # "²".isdigit() is True, int("²") raises: the project id is kept as text
    assert client.post("/setup", json={**SETUP_PAYLOAD, "project": "²"}).status_code == 200
    task = ls_task(1, [rect("a", (1, 1, 9, 9))])
    raw = json.dumps(predict_payload([task]))
    huge = raw.replace('"x": ', '"x": 1' + "0" * 400 + ', "_x": ', 1)
    resp = client.post("/predict", data=huge, content_type="application/json")
    assert resp.status_code == 400 and "308 digits" in detail(resp)
    webhook = '{"action": "ANNOTATION_CREATED", "annotation": {"id": 1' + "0" * 400 + "}}"
    resp = client.post("/webhook", data=webhook, content_type="application/json")
    assert resp.status_code == 400 and "308 digits" in detail(resp)


def test_a_deep_taxonomy_is_a_400_naming_the_limit(env):
    client, *_ = env
    deep = '<Choice value="a">' * 1200 + "</Choice>" * 1200
    xml = ATTR_XML.replace(
        "</View>", f'<Taxonomy name="colour" toName="image" perRegion="true">{deep}</Taxonomy></View>'
    )
    resp = client.post("/setup", json={**SETUP_PAYLOAD, "schema": xml})
    assert resp.status_code == 400 and "deeper than 32 levels" in detail(resp)
