"""Webhook handling: LS results -> regions, persistence, answers, enqueue triggers (real Redis)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from rq import Queue

from backend.corrections import CorrectionError, image_reference, parse_result
from backend.jobs import job_id
from backend.store import open_store
from backend.webhooks import handle_webhook
from tests.redis_helpers import CLOSED_REDIS_URL, job_settings
from tools.ls.payloads import (
    annotation_payload,
    deleted_payload,
    region_items,
    relation_item,
    start_training_payload,
    timestamp,
)

pytest_plugins = ["tests.redis_fixtures"]  # fixture: redis_db


# ---------------------------------------------------------------------- result parsing
def test_parse_result_regions_captions_attributes_relations():
    result = [
        *region_items("r1", (10, 20, 50, 60), 200, 100, "  a small   pink circle ", ["pink", "occluded"]),
        *region_items("r2", (100, 10, 180, 90), 200, 100, None, ["square"]),
        {"id": "r2", "from_name": "tax", "to_name": "image", "type": "taxonomy", "original_width": 200,
         "original_height": 100, "value": {"taxonomy": [["Size", "large"]]}},
        relation_item("r1", "r2", ["left_of", "Smaller-Than", "holds"]),
        relation_item("r1", "r2", ["left_of"], direction="left"),  # arrow r2 -> r1
    ]  # fmt: skip
    parsed = parse_result(result)
    assert (parsed.width, parsed.height) == (200, 100)
    r1, r2 = parsed.regions
    assert r1.box == pytest.approx((10, 20, 50, 60)) and r2.box == pytest.approx((100, 10, 180, 90))
    assert r1.caption == "a small pink circle" and r2.caption is None
    assert r1.attributes == {"color": "pink"}  # "occluded" is not a model attribute
    assert r2.attributes == {"shape": "square", "size": "large"}
    assert [(x.target, x.labels) for x in r1.relations] == [("r2", ("left of", "smaller than"))]
    assert [(x.target, x.labels) for x in r2.relations] == [("r1", ("left of",))]
    assert parsed.skipped == []


def test_parse_result_skips_malformed_items_with_reasons():
    ok = region_items("ok", (1, 1, 20, 20), 100, 100, "a small red circle")
    rotated = region_items("rot", (1, 1, 20, 20), 100, 100)
    rotated[0]["value"]["rotation"] = 30
    no_size = region_items("nosize", (1, 1, 20, 20), 100, 100)
    del no_size[0]["original_width"]
    outside = region_items("out", (1, 1, 20, 20), 100, 100)
    outside[0]["value"].update(x=150)
    result = [
        "junk",
        *ok,
        *rotated,
        *no_size,
        *outside,
        {"id": "ghost", "type": "textarea", "to_name": "image", "value": {"text": ["x"]}},
        relation_item("ok", "ghost", ["left_of"]),
        relation_item("ok", "ok", ["left_of"]),
        {"type": "relation", "from_id": "ok", "to_id": "rot", "direction": "bi", "labels": ["above"]},
    ]
    parsed = parse_result(result)
    # a rotated rectangle is a region (its rotated outline's box: tests/test_region_tools.py)
    assert [r.region_id for r in parsed.regions] == ["ok", "rot"]
    reasons = "\n".join(parsed.skipped)
    for needle in ("not an object", "direction 'bi'", "original_width", "outside", "ghost", "does not link"):
        assert needle in reasons, reasons
    with pytest.raises(CorrectionError, match="must be a list"):
        parse_result({"not": "a list"})


def test_parse_result_conflicting_values_and_unknown_relation_labels():
    items = region_items("a", (1, 1, 20, 20), 100, 100, None, ["pink", "red"])
    items += region_items("b", (50, 50, 90, 90), 100, 100)
    items.append(relation_item("a", "b", ["holds"]))
    parsed = parse_result(items)
    assert parsed.regions[0].attributes == {"color": "pink"}
    assert any("two color values" in s for s in parsed.skipped)
    assert any("no known relation label" in s for s in parsed.skipped)


def test_image_reference():
    assert image_reference({"image": "/data/upload/1/x.png"}) == "/data/upload/1/x.png"
    assert image_reference({"img": "http://h/x.png", "image": "y"}, "img") == "http://h/x.png"
    assert image_reference({"photo": "http://h/p.png"}) == "http://h/p.png"
    with pytest.raises(CorrectionError, match="no image"):
        image_reference({"a": "1", "b": "2"})


# ---------------------------------------------------------------------- webhook answers
def _pink(aid: int, seconds: float = 1.0, **kw) -> dict:
    items = region_items("r1", (10, 10, 40, 40), 100, 100, "a small pink circle", ["pink", "circle"])
    items += region_items("r2", (60, 60, 90, 90), 100, 100, "a small red square", ["red"])
    items.append(relation_item("r1", "r2", ["above", "left_of"]))
    return annotation_payload(aid, items, timestamp(seconds), **kw)


def test_unknown_and_malformed_payloads(tmp_path: Path):
    settings = job_settings(tmp_path, redis_url=CLOSED_REDIS_URL)
    assert handle_webhook({"action": "PROJECT_UPDATED", "project": {"id": 1}}, settings) == (
        200,
        {"status": "Unknown event", "action": "PROJECT_UPDATED"},
    )
    bad = [
        ([], "JSON object"),
        ({"project": {"id": 1}}, "no 'action'"),
        ({"action": "ANNOTATION_CREATED", "task": {"data": {}}}, "needs an 'annotation'"),
        ({**_pink(1), "annotation": {**_pink(1)["annotation"], "result": "x"}}, "must be a list"),
        ({**_pink(1), "annotation": {"id": 1, "result": []}}, "updated_at"),
        ({**_pink(1), "annotation": {**_pink(1)["annotation"], "id": "abc"}}, "integer id"),
        ({**_pink(1), "task": {"id": 5, "data": {}}}, "no image"),
        ({**_pink(1), "project": None, "annotation": {**_pink(1)["annotation"], "project": None}}, "project"),
        ({"action": "ANNOTATIONS_DELETED", "project": {"id": 1}}, "'annotations' list"),
        ({"action": "START_TRAINING"}, "project"),
    ]
    for payload, message in bad:
        code, body = handle_webhook(payload, settings)
        assert code == 400 and message in body["detail"], (payload, body)
    assert open_store(settings.data_dir).annotations() == []


def test_annotation_is_stored_before_answer_and_answer_is_fast_with_redis_down(tmp_path: Path):
    settings = job_settings(tmp_path, redis_url=CLOSED_REDIS_URL, train_min_corrections=2)
    t0 = time.monotonic()
    code, body = handle_webhook(_pink(1), settings)
    elapsed = time.monotonic() - t0
    assert code == 201 and body["status"] == "ok", body
    assert elapsed < 1.0
    result = body["result"]
    assert (result["stored"], result["regions"], result["training_requested"]) == ("created", 2, True)
    assert result["jobs"][1].startswith("error")  # Redis down: the request waits in the outbox
    store = open_store(settings.data_dir)
    (ann,) = store.annotations()
    assert ann.image == "/data/upload/1/img.png" and ann.task_id == 1001
    assert [r.caption for r in ann.regions] == ["a small pink circle", "a small red square"]
    assert [p.project_id for p in store.pending_requests()] == [1]
    assert handle_webhook(_pink(1), settings)[1]["result"]["stored"] == "duplicate"
    code, body = handle_webhook(deleted_payload([1]), settings)
    assert code == 201 and body["result"]["deleted"] == 1 and store.annotations() == []


def test_cancelled_annotation_clears_its_regions(tmp_path: Path):
    settings = job_settings(tmp_path, redis_url=CLOSED_REDIS_URL)
    handle_webhook(_pink(1, 1.0), settings)
    payload = _pink(1, 2.0, action="ANNOTATION_UPDATED")
    payload["annotation"]["was_cancelled"] = True
    assert handle_webhook(payload, settings)[1]["result"]["stored"] == "updated"
    assert open_store(settings.data_dir).annotations()[0].regions == []


def test_threshold_and_start_training_enqueue_one_job(tmp_path: Path, redis_db):
    settings = job_settings(tmp_path, train_min_corrections=5)  # 2 regions per annotation
    queue = Queue(settings.queue_name, connection=redis_db)
    assert handle_webhook(_pink(1, project_id=7), settings)[1]["result"]["jobs"] == {}
    assert handle_webhook(_pink(2, project_id=7), settings)[1]["result"]["new_corrections"] == 4
    assert queue.count == 0
    body = handle_webhook(_pink(3, project_id=7), settings)[1]["result"]
    assert body["training_requested"] and body["jobs"] == {7: "enqueued"}
    assert queue.job_ids == [job_id(7, settings)]
    body = handle_webhook(_pink(4, project_id=7), settings)[1]["result"]
    assert body["jobs"] == {7: "queued"} and queue.job_ids == [job_id(7, settings)]  # collapsed
    code, body = handle_webhook(start_training_payload(8), settings)
    assert code == 201 and body["result"]["jobs"] == {8: "enqueued"}
    assert sorted(queue.job_ids) == sorted([job_id(7, settings), job_id(8, settings)])
    job = queue.fetch_job(job_id(7, settings))
    assert job.kwargs["project_id"] == 7 and job.retries_left == settings.job_retries
    assert job.timeout == settings.job_timeout and job.meta["phase"] == "queued"
    assert open_store(settings.data_dir).pending_requests() == []
