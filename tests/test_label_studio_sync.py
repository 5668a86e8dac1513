"""``set_project_model_version`` follows the order Label Studio 1.23.2 accepts (issue 15, item 4).

A small stand-in for Label Studio's API keeps its rule (``ProjectSerializer.validate_model_version``:
a project ``model_version`` must be an ML backend's title or the version of stored predictions) and
its re-read of the backend's ``/setup`` on ``GET /api/ml``; the real thing is exercised by
``tests/test_e2e_ls_versions.py``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import pytest
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from backend.label_studio import set_project_model_version
from backend.settings import Settings

TOKEN = "0123456789abcdef0123456789abcdef01234567"


class FakeLabelStudio:
    """Project 1 with one ML backend whose live version is ``self.backend_version``."""

    def __init__(self) -> None:
        self.backend_version = "1.0.0"
        self.versions_seen: list[str] = []  # what each GET /api/ml re-read
        self.project_version = "roi-backend"  # live mode: the ML backend's title
        self.predictions: list[dict] = [{"task": 1, "model_version": "1.0.0"}]
        self.tasks = [
            {"id": 1, "total_annotations": 1, "total_predictions": 1},
            {"id": 2, "total_annotations": 0, "total_predictions": 1},
            {"id": 3, "total_annotations": 0, "total_predictions": 0},  # no boxes anywhere
        ]
        self.predicted: list[list[int]] = []
        self.calls: list[str] = []
        self.store_predictions = True
        self.answering: list[str] = []  # versions of the processes answering the next /predict calls
        app = Flask("fake-ls")

        @app.before_request
        def _auth():
            self.calls.append(f"{request.method} {request.full_path.rstrip('?')}")
            if request.headers.get("Authorization") != f"Token {TOKEN}":
                return jsonify({"detail": "Authentication credentials were not provided."}), 401
            return None

        @app.get("/api/ml")
        def ml_list():
            self.versions_seen.append(self.backend_version)
            return jsonify([{"id": 7, "title": "roi-backend", "model_version": self.backend_version}])

        @app.get("/api/projects/1/model-versions")
        def model_versions():
            counts: dict[str, int] = {}
            for p in self.predictions:
                counts[p["model_version"]] = counts.get(p["model_version"], 0) + 1
            return jsonify(counts)

        @app.get("/api/tasks")
        def tasks():
            return jsonify({"tasks": self.tasks, "total": len(self.tasks)})

        @app.post("/api/dm/actions")
        def action():
            assert request.args["id"] == "retrieve_tasks_predictions"
            ids = request.get_json()["selectedItems"]["included"]
            self.predicted.append(ids)
            if self.store_predictions:
                answered = self.answering.pop(0) if self.answering else self.backend_version
                self.predictions += [{"task": t, "model_version": answered} for t in ids]
            return jsonify({"processed_items": len(ids)})

        @app.route("/api/projects/1", methods=["GET", "PATCH"])
        def project():
            if request.method == "PATCH":
                value = request.get_json()["model_version"]
                known = {p["model_version"] for p in self.predictions} | {"roi-backend"}
                if value not in known:
                    return jsonify({
                        "status_code": 400, "detail": "Validation error",
                        "validation_errors": {"model_version": [
                            "Model version doesn't exist either as live model or as static predictions."]},
                    }), 400  # fmt: skip
                self.project_version = value
            return jsonify({"id": 1, "model_version": self.project_version})

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def fake():
    ls = FakeLabelStudio()
    yield ls
    ls.server.shutdown()


def settings_for(ls: FakeLabelStudio, **kw) -> Settings:
    base = Settings(
        label_studio_url=ls.url,
        label_studio_api_key=TOKEN,
        model_poll_seconds=0.05,
        label_studio_sync_seconds=10,
    )
    return replace(base, **kw)


@pytest.fixture()
def warnings(caplog):
    caplog.set_level(logging.INFO, logger="backend.label_studio")
    return caplog


def test_waits_for_the_live_version_predicts_then_selects_it(fake, warnings):
    swap = threading.Timer(0.5, lambda: setattr(fake, "backend_version", "1.1.0"))
    swap.start()  # the serving process swaps a moment after the promotion
    try:
        assert set_project_model_version(settings_for(fake), 1, "1.1.0") == "updated"
    finally:
        swap.cancel()
    assert fake.project_version == "1.1.0"
    assert fake.versions_seen[0] == "1.0.0" and fake.versions_seen[-1] == "1.1.0"
    assert fake.predicted == [[2, 1]], "unlabeled task with boxes first, then the labeled one; never task 3"
    assert fake.calls.index("PATCH /api/projects/1") > fake.calls.index(
        "POST /api/dm/actions?id=retrieve_tasks_predictions&project=1"
    )
    (record,) = [
        r for r in warnings.records if r.getMessage() == "Label Studio project model_version updated"
    ]
    assert record.version == "1.1.0" and record.predicted_tasks == [2, 1] and record.ml_backend == 7


def test_no_extra_predictions_when_the_version_has_some(fake):
    fake.backend_version = "1.1.0"
    fake.predictions.append({"task": 2, "model_version": "1.1.0"})
    assert set_project_model_version(settings_for(fake), 1, "1.1.0") == "updated"
    assert fake.predicted == [] and fake.project_version == "1.1.0"


def test_predict_tasks_setting_bounds_the_request(fake):
    fake.backend_version = "1.1.0"
    assert (
        set_project_model_version(settings_for(fake, label_studio_predict_tasks=1), 1, "1.1.0") == "updated"
    )
    assert fake.predicted == [[2]]


def test_a_process_still_loading_the_version_is_waited_for(fake):
    """Several serving processes: /setup came from one that swapped, /predict from one still loading."""
    fake.backend_version = "1.1.0"
    fake.answering = ["1.0.0", "1.0.0"]
    assert set_project_model_version(settings_for(fake), 1, "1.1.0") == "updated"
    assert fake.predicted == [[2, 1]] * 3 and fake.project_version == "1.1.0"


def test_a_backend_that_never_serves_the_version_fails_clearly(fake, warnings):
    outcome = set_project_model_version(settings_for(fake, label_studio_sync_seconds=0.3), 1, "1.1.0")
    assert outcome.startswith("failed: ") and "still reports ['1.0.0']" in outcome and "not 1.1.0" in outcome
    assert fake.project_version == "roi-backend" and fake.predicted == []
    (record,) = [r for r in warnings.records if r.levelno == logging.WARNING]
    assert record.getMessage() == "Label Studio project model_version not updated"
    assert record.reason == outcome.removeprefix("failed: ") and record.project == 1


def test_label_studio_refusing_is_reported_with_its_reason(fake, warnings):
    fake.backend_version = "1.1.0"
    fake.store_predictions = False  # e.g. every task's image failed: Label Studio stores nothing
    outcome = set_project_model_version(settings_for(fake, label_studio_sync_seconds=1.0), 1, "1.1.0")
    assert "stored no prediction of 1.1.0 for tasks [2, 1]" in outcome
    fake.tasks = [{"id": 3, "total_annotations": 0, "total_predictions": 0}]
    outcome = set_project_model_version(settings_for(fake), 1, "1.1.0")
    assert "no task with boxes to predict" in outcome
    bad_key = set_project_model_version(settings_for(fake, label_studio_api_key="x" * 40), 1, "1.1.0")
    assert bad_key.startswith("failed: GET /api/ml?project=1: HTTP 401")
    assert fake.project_version == "roi-backend"


def test_without_label_studio_settings_nothing_is_called():
    assert set_project_model_version(Settings(), 1, "1.1.0").startswith("skipped:")
