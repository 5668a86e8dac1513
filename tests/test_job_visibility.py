"""What a fine-tuning job shows (issue 15, item 8): the gate's decision and reasons in ``job.meta``,
in ``python -m backend.jobs status`` and in the worker's log; a new round starts with no field of the
previous one; the worker logs JSON lines like the backend.  Real Redis (database 13)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from rq import Queue, SimpleWorker
from rq.job import JobStatus

from backend.finetune.gate import gate_decision
from backend.jobs import job_id, main, progress_reporter, request_training, set_phase
from backend.webhooks import handle_webhook
from tests.redis_helpers import job_settings, settings_env

pytest_plugins = ["tests.redis_fixtures"]  # fixtures: redis_db, use_settings

REPO = Path(__file__).resolve().parent.parent


def two_rounds() -> list[dict]:
    """A stand-in job: round 1 trains and is rejected, round 2 starts; returns its meta as saved in
    Redis at the end of round 1 and at the start of round 2."""
    from rq import get_current_job

    job = get_current_job()
    set_phase("load", project=5, parent="1.0.0")
    progress_reporter("train", {"project": 5})({"step": 3, "steps": 6, "loss": 1.5, "eta_s": 2.0})
    set_phase("done", project=5, decision="rejected", accepted=False, reasons=["worse"], version="1.1.0")
    snapshots = [dict(job.get_meta(refresh=True))]  # a copy: the next phase edits job.meta in place
    set_phase("load", project=5, parent="1.0.0")
    return [*snapshots, dict(job.get_meta(refresh=True))]


def test_a_new_round_starts_without_the_previous_rounds_fields(tmp_path, redis_db):
    settings = job_settings(tmp_path)
    queue = Queue(settings.queue_name, connection=redis_db)
    job = queue.enqueue("tests.test_job_visibility.two_rounds", meta={"project": 5, "reason": "test"})
    SimpleWorker([queue], connection=redis_db).work(burst=True)
    end_of_round_1, start_of_round_2 = job.return_value(refresh=True)
    assert end_of_round_1["decision"] == "rejected" and end_of_round_1["step"] == 3
    assert start_of_round_2["phase"] == "load" and start_of_round_2["reason"] == "test"
    for key in ("step", "steps", "loss", "eta_s", "decision", "accepted", "reasons", "version"):
        assert key not in start_of_round_2, key


def test_gate_decision_and_reasons_in_meta_status_and_log(
    tmp_path, tiny_checkpoint, redis_db, use_settings, caplog, capsys, monkeypatch
):
    from tools.ls.demo_active_learning import correction_scenes
    from tools.ls.payloads import scene_payload, timestamp

    images = tmp_path / "images"
    images.mkdir()
    settings = job_settings(
        tmp_path, default_model=tiny_checkpoint, local_files_root=str(images), train_steps=6,
        train_batch_size=4, train_max_turns=2, gate_eval_images=3, heldout_min_records=4,
        train_min_corrections=10**6, job_retries=0,
    )  # fmt: skip
    use_settings(settings)
    for i, scene in enumerate(correction_scenes(8)):
        scene.image.save(images / f"s{i}.png")
        payload = scene_payload(
            scene, 10 + i, f"/data/local-files/?d=s{i}.png", timestamp(i), 1, task_id=20 + i
        )
        assert handle_webhook(payload, settings)[0] == 201
    assert request_training(1, settings, redis_db, "test").state == "enqueued"
    # The gate's own rule is tested elsewhere; here a rejection with a known reason (SimpleWorker runs
    # the job in this process).
    why = "base caption accuracy 0.40 < parent 0.55 - 0.02 (test)"
    real = gate_decision

    def reject(*args, **kwargs):
        return {**real(*args, **kwargs), "accepted": False, "reasons": [why]}

    monkeypatch.setattr("backend.finetune.job.gate_decision", reject)
    caplog.set_level(logging.INFO, logger="backend")
    queue = Queue(settings.queue_name, connection=redis_db)
    SimpleWorker([queue], connection=redis_db).work(burst=True)
    job = queue.fetch_job(job_id(1, settings))
    assert job.get_status() == JobStatus.FINISHED, job.exc_info
    (round_,) = job.return_value()["rounds"]
    reasons = round_["gate"]["reasons"]
    assert round_["decision"] == "rejected" and reasons == [why]
    # The rule's figures per question kind and per script come with the decision.
    assert round_["gate"]["kinds"] and {"parent", "candidate", "questions"} <= set(
        next(iter(round_["gate"]["kinds"].values()))
    )
    assert "latin" in round_["gate"]["scripts"] and set(round_["gate"]["malformed"]) == {
        "parent",
        "candidate",
    }

    meta = job.get_meta()
    assert meta["phase"] == "done" and meta["decision"] == "rejected" and meta["accepted"] is False
    assert meta["reasons"] == reasons and meta["version"] == round_["version"]

    (logged,) = [r for r in caplog.records if r.getMessage() == "gate decision"]
    assert logged.decision == "rejected" and logged.reasons == reasons and logged.version == round_["version"]

    capsys.readouterr()
    assert main(["status", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["job"]["meta"]["decision"] == "rejected" and shown["job"]["meta"]["reasons"] == reasons
    assert shown["job"]["rounds"][0]["gate"]["reasons"] == reasons
    assert shown["store"]["last_decision"] == "rejected"


def test_worker_logs_are_json_lines(tmp_path, redis_db):
    settings = job_settings(tmp_path)
    env = {**settings_env(settings), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "backend.worker", "--burst"], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    loggers = {r["logger"] for r in records}
    assert "backend.worker" in loggers and any(name.startswith("rq.") for name in loggers), loggers
    assert any(r["message"].startswith("worker ready") for r in records)
