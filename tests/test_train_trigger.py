"""The training trigger is explicit and counts real corrections only (issue 15, item 6).

``TRAIN_TRIGGER`` says what starts a job (``threshold``, ``manual``, ``schedule``); towards
``TRAIN_MIN_CORRECTIONS`` count only regions whose reviewer text differs from what the model said,
or that the model never described.  What the model said: Label Studio's ``annotation.prediction``
(the payload) or the backend's own record of its ``/predict`` answers.  Real Redis (database 13).
"""

from __future__ import annotations

import copy
import logging
import re
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from rq import Queue

from backend.app import create_app
from backend.jobs import job_id
from backend.predicted import corrected_regions, open_prediction_log, region_texts
from backend.serving import ModelHolder
from backend.settings import Settings, SettingsError
from backend.store import CorrectionStore, open_store
from backend.webhooks import handle_webhook
from tests.redis_helpers import CLOSED_REDIS_URL, job_settings
from tests.test_backend_app import ATTR_XML, SCENE, ls_task, predict_payload, rect
from tools.ls.payloads import (
    annotation_payload,
    region_items,
    relation_item,
    start_training_payload,
    timestamp,
)

pytest_plugins = ["tests.redis_fixtures"]  # fixture: redis_db

W, H = 200, 100


# ---------------------------------------------------------------------- settings
def test_train_trigger_setting_is_explicit():
    assert Settings().train_triggers == {"threshold", "manual"}
    assert Settings.from_env({"TRAIN_TRIGGER": "manual"}).train_triggers == {"manual"}
    both = Settings.from_env({"TRAIN_TRIGGER": " Threshold , schedule", "RETRAIN_INTERVAL": "3600"})
    assert both.train_triggers == {"threshold", "schedule"}
    bad = [
        ({"TRAIN_TRIGGER": "nightly"}, "TRAIN_TRIGGER='nightly': expected a comma-separated list of "
                                       "threshold, manual, schedule (unknown: nightly)"),
        ({"TRAIN_TRIGGER": ","}, "expected a comma-separated list"),
        ({"TRAIN_TRIGGER": "manual,schedule"}, "includes schedule: set RETRAIN_CRON or RETRAIN_INTERVAL"),
        ({"RETRAIN_CRON": "0 3 * * *"}, "does not include schedule: add it"),
    ]  # fmt: skip
    for env, message in bad:
        with pytest.raises(SettingsError, match=re.escape(message)):
            Settings.from_env(env)


# ---------------------------------------------------------------------- what counts
def predicted_result() -> list[dict]:
    """What the model answered for a task with two boxes (caption + choices, a relation)."""
    return [
        *region_items("a", (10, 10, 50, 50), W, H, "a small red circle", ["red", "circle", "small"]),
        *region_items("b", (100, 10, 180, 90), W, H, "a large blue square", ["blue", "square", "large"]),
        relation_item("a", "b", ["left_of"]),
    ]


def moved(items: list[dict], rid: str, dx: float) -> list[dict]:
    """``items`` with region ``rid``'s box moved right by ``dx`` percent (texts untouched)."""
    out = copy.deepcopy(items)
    for item in out:
        if item.get("id") == rid and "x" in item.get("value", {}):
            item["value"]["x"] += dx
    return out


def recaptioned(items: list[dict], rid: str, text: str) -> list[dict]:
    out = copy.deepcopy(items)
    for item in out:
        if item.get("id") == rid and item["type"] == "textarea":
            item["value"]["text"] = [text]
    return out


def test_region_texts_compare_what_a_reviewer_can_change():
    said = region_texts(predicted_result())
    assert set(said) == {"a", "b"}
    assert any('"relation"' in t for t in said["a"]) and not any('"relation"' in t for t in said["b"])
    spaced = recaptioned(predicted_result(), "a", "  a small   red circle ")
    assert corrected_regions(moved(spaced, "a", 3.0), ["a", "b"], said) == set()  # boxes only
    assert corrected_regions(
        recaptioned(predicted_result(), "b", "a large navy square"), ["a", "b"], said
    ) == {"b"}
    chosen = copy.deepcopy(predicted_result())
    chosen[2]["value"]["choices"] = ["orange", "circle", "small"]
    assert corrected_regions(chosen, ["a", "b"], said) == {"a"}
    rel = [*predicted_result()[:-1], relation_item("a", "b", ["left_of", "smaller_than"])]
    assert corrected_regions(rel, ["a", "b"], said) == {"a"}
    new = [*predicted_result(), *region_items("c", (60, 60, 90, 90), W, H, "a small green diamond")]
    assert corrected_regions(new, ["a", "b", "c"], said) == {"c"}, "a region the model never saw"
    assert corrected_regions(new, ["a", "b"], {}) == {"a", "b"}, "nothing known: every region with text"


def ls_payload(annotation_id: int, result: list[dict], seconds: float, prediction: list[dict] | None = None,
               action: str = "ANNOTATION_CREATED", project: int = 1, task: int = 1) -> dict:  # fmt: skip
    """A webhook as Label Studio 1.23.2 sends it; ``prediction``: what it stores in
    ``annotation.prediction`` (the task's prediction of the project's selected version)."""
    payload = annotation_payload(annotation_id, result, timestamp(seconds), project, task, action=action)
    payload["annotation"]["prediction"] = (
        {"id": 9, "result": prediction, "model_version": "1.1.0", "score": 0.5} if prediction else {}
    )
    payload["annotation"]["parent_prediction"] = 9 if prediction else None
    return payload


def test_confirmed_predictions_and_box_only_regions_are_not_corrections(tmp_path: Path):
    settings = job_settings(tmp_path, redis_url=CLOSED_REDIS_URL, train_min_corrections=2)
    store = open_store(settings.data_dir)
    # The reviewer moved a box and kept every text the model gave: nothing to learn.
    body = handle_webhook(
        ls_payload(1, moved(predicted_result(), "a", 2.0), 1, predicted_result()), settings
    )[1]
    assert (body["result"]["regions"], body["result"]["corrections"]) == (2, 0)
    assert body["result"]["new_corrections"] == 0 and not body["result"]["training_requested"]
    # Boxes only (no text at all): stored, never counted.
    boxes = [item for item in predicted_result() if item["type"] == "rectanglelabels"]
    body = handle_webhook(ls_payload(2, boxes, 1, None, task=2), settings)[1]["result"]
    assert (body["regions"], body["corrections"], body["new_corrections"]) == (2, 0, 0)
    # One caption edited: one correction.
    edited = recaptioned(predicted_result(), "b", "a large navy square")
    body = handle_webhook(ls_payload(1, edited, 2, predicted_result(), "ANNOTATION_UPDATED"), settings)[1]
    assert (body["result"]["corrections"], body["result"]["new_corrections"]) == (1, 1)
    assert store.pending_requests() == []
    # A box the model never saw, with a caption: the second correction reaches the threshold.
    added = [*edited, *region_items("c", (60, 60, 90, 90), W, H, "a small green diamond")]
    body = handle_webhook(ls_payload(1, added, 3, predicted_result(), "ANNOTATION_UPDATED"), settings)[1]
    assert (body["result"]["corrections"], body["result"]["new_corrections"]) == (2, 2)
    assert body["result"]["training_requested"] and [p.project_id for p in store.pending_requests()] == [1]
    # Every region is still training data.
    (ann,) = [a for a in store.annotations() if a.annotation_id == 1]
    assert [r.caption for r in ann.regions] == [
        "a small red circle",
        "a large navy square",
        "a small green diamond",
    ]


@pytest.fixture()
def app_env(tmp_path, tiny_checkpoint):
    settings = replace(
        job_settings(tmp_path, redis_url=CLOSED_REDIS_URL, train_min_corrections=2),
        default_model=tiny_checkpoint, max_new_tokens=4, model_poll_seconds=0.5, allow_private_urls=True,
    )  # fmt: skip
    holder = ModelHolder(settings)
    yield create_app(settings, holder).test_client(), settings
    holder.stop()


def test_the_backends_own_predictions_tell_confirmations_from_corrections(app_env):
    """Label Studio in live mode sends ``annotation.prediction = {}``: the backend's record of its
    /predict answers is what the annotation is compared with."""
    client, settings = app_env
    boxes = [rect("p0", SCENE.objects[0].box), rect("p1", SCENE.objects[1].box)]
    task = ls_task(41, boxes)
    resp = client.post("/predict", json=predict_payload([task], xml=ATTR_XML))
    assert resp.status_code == 200, resp.get_json()
    answer = resp.get_json()["results"][0]["result"]
    assert set(open_prediction_log(settings.data_dir).for_task(1, 41)) == {"p0", "p1"}
    # The reviewer accepts the prediction as it is (Label Studio keeps the region ids).
    accepted = ls_payload(5, copy.deepcopy(answer), 1, None, task=41)
    accepted["project"]["label_config"] = ATTR_XML
    body = handle_webhook(accepted, settings)[1]["result"]
    assert (body["corrections"], body["new_corrections"], body["training_requested"]) == (0, 0, False)
    # ... then rewrites one caption.
    caption = next(i for i in answer if i["type"] == "textarea" and i["id"] == "p1")["value"]["text"][0]
    fixed = recaptioned(answer, "p1", f"{caption} (fixed)")
    update = ls_payload(5, fixed, 2, None, "ANNOTATION_UPDATED", task=41)
    update["project"]["label_config"] = ATTR_XML
    body = handle_webhook(update, settings)[1]["result"]
    assert (body["corrections"], body["new_corrections"]) == (1, 1)
    # Interactive answers are recorded too (the smart tool's new box).
    new_box = {**rect("p2", SCENE.objects[2].box), "origin": "manual"}
    ctx = {"result": [new_box]}
    resp = client.post("/predict", json=predict_payload([ls_task(41, boxes)], xml=ATTR_XML, context=ctx))
    assert resp.status_code == 200
    assert set(open_prediction_log(settings.data_dir).for_task(1, 41)) == {"p0", "p1", "p2"}


def test_manual_trigger_ignores_the_threshold_and_honours_start_training(tmp_path: Path, redis_db):
    settings = job_settings(tmp_path, train_min_corrections=1, train_trigger="manual")
    queue = Queue(settings.queue_name, connection=redis_db)
    body = handle_webhook(ls_payload(1, predicted_result(), 1), settings)[1]["result"]
    assert body["new_corrections"] == 2 and not body["training_requested"] and body["jobs"] == {}
    assert queue.count == 0 and open_store(settings.data_dir).pending_requests() == []
    code, body = handle_webhook(start_training_payload(1), settings)
    assert (
        code == 201 and body["result"]["jobs"] == {1: "enqueued"} and queue.job_ids == [job_id(1, settings)]
    )


def test_threshold_only_refuses_start_training_with_the_reason(tmp_path: Path, redis_db, caplog):
    settings = job_settings(tmp_path, train_trigger="threshold")
    caplog.set_level(logging.WARNING, logger="backend.webhooks")
    code, body = handle_webhook(start_training_payload(3), settings)
    assert code == 409
    assert body["detail"] == "START_TRAINING ignored: TRAIN_TRIGGER=threshold does not include manual"
    (record,) = [r for r in caplog.records if r.getMessage() == "webhook refused"]
    assert record.reason == body["detail"] and record.status == 409
    assert open_store(settings.data_dir).pending_requests() == []
    assert Queue(settings.queue_name, connection=redis_db).count == 0


def test_a_store_from_before_the_split_counts_regions_with_text(tmp_path: Path):
    """Stores written before ``regions.corrected`` existed: the column is added, box-only regions
    stop counting, regions with text keep counting."""
    store = CorrectionStore(tmp_path / "data")
    boxes = [item for item in predicted_result() if item["type"] == "rectanglelabels"]
    settings = job_settings(tmp_path, redis_url=CLOSED_REDIS_URL, train_min_corrections=100)
    handle_webhook(ls_payload(1, predicted_result(), 1), settings)
    handle_webhook(ls_payload(2, boxes, 1, task=2), settings)
    with sqlite3.connect(store.path) as con:
        con.execute("ALTER TABLE regions DROP COLUMN corrected")  # what an older store looks like
    again = CorrectionStore(tmp_path / "data")  # opened as a fresh process would
    assert again.new_corrections(1) == 2
    with sqlite3.connect(store.path) as con:
        assert [r[1] for r in con.execute("PRAGMA table_info(regions)")][-1] == "corrected"
