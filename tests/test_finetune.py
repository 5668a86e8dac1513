"""Fine-tuning job on a tiny model: new immutable version with curve + metrics; crash safety."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq import Queue, SimpleWorker

from backend.finetune import MixedRecords, gate, score_records
from backend.finetune.job import parent_image_token_dropout, train_config
from backend.finetune.sources import ToySceneEvaluator
from backend.jobs import job_id
from backend.registry import ModelRegistry
from backend.settings import Settings, SettingsError
from backend.store import open_store
from backend.webhooks import handle_webhook
from model.checkpoint import read_train_config
from model.config import TrainConfig, save_json
from tests.redis_helpers import job_settings, settings_env
from tools.ls.demo_active_learning import correction_scenes
from tools.ls.payloads import scene_payload

pytest_plugins = ["tests.redis_fixtures"]  # fixtures: redis_db, use_settings

REPO = Path(__file__).resolve().parent.parent


def test_mixed_records_share():
    corrections = [{"id": f"c{i}"} for i in range(3)]
    replay = [{"id": f"r{i}"} for i in range(1000)]
    mixed = MixedRecords(corrections, replay, replay_fraction=0.25, size=400)
    ids = [mixed[i]["id"] for i in range(len(mixed))]
    assert sum(i.startswith("c") for i in ids) == 300
    assert len({i for i in ids if i.startswith("r")}) == 100  # spread over the replay set
    assert (
        all(mixed[i]["id"].startswith("c") for i in range(10)) and len(MixedRecords(corrections, [], 0.5)) > 0
    )


def test_job_keeps_the_parents_image_token_dropout(tmp_path: Path, caplog):
    """A job continues its parent's regime: the image-token dropout recorded in the parent's
    train_config.json, unless TRAIN_IMAGE_TOKEN_DROPOUT sets one; bad values are refused by name,
    an unreadable parent record is logged and read as none."""
    save_json(TrainConfig(image_token_dropout=0.5, seed=9).to_dict(), tmp_path / "train_config.json")
    parent = parent_image_token_dropout(tmp_path)
    assert parent == read_train_config(tmp_path).image_token_dropout == 0.5
    assert parent_image_token_dropout(tmp_path / "none") is None
    assert read_train_config(tmp_path / "none") is None
    default = Settings.from_env({})
    assert train_config(default, seed=1, parent_dropout=parent).image_token_dropout == 0.5
    assert train_config(default, seed=1, parent_dropout=None).image_token_dropout == 0.0
    fixed = Settings.from_env({"TRAIN_IMAGE_TOKEN_DROPOUT": "0.25"})
    assert train_config(fixed, seed=1, parent_dropout=parent).image_token_dropout == 0.25
    for bad in ("1", "-0.1", "half", "nan"):
        with pytest.raises(SettingsError, match="TRAIN_IMAGE_TOKEN_DROPOUT"):
            Settings.from_env({"TRAIN_IMAGE_TOKEN_DROPOUT": bad})
    for record, message in (
        ({"image_token_dropout": 0.5, "future_field": 1}, "unreadable train_config.json"),
        ({"image_token_dropout": 1.5}, "not in [0, 1)"),
    ):
        (tmp_path / "train_config.json").write_text(json.dumps(record))
        with caplog.at_level("WARNING"):
            assert parent_image_token_dropout(tmp_path) is None
        assert message in caplog.text


def test_job_freezes_the_modules_train_freeze_names():
    """TRAIN_FREEZE (default: the region encoder): the job's stage-2 config holds those modules (the
    loop keeps them as they are: tests/test_model_core.py); unknown names, or all three, are
    refused by name at startup."""
    assert train_config(Settings.from_env({}), seed=1).freeze == ["region_encoder"]
    assert train_config(Settings.from_env({"TRAIN_FREEZE": "none"}), seed=1).freeze == []
    held = Settings.from_env({"TRAIN_FREEZE": " Region_Encoder , projector"})
    assert train_config(held, seed=1).freeze == ["projector", "region_encoder"]
    for bad, why in (
        ("vision", r"cannot freeze \['vision'\]"),
        ("lm,projector,region_encoder", "nothing would be trained"),
        (" , ", "'none' alone"),
        ("none,lm", "'none' alone"),
    ):
        with pytest.raises(SettingsError, match=f"TRAIN_FREEZE=.*{why}"):
            Settings.from_env({"TRAIN_FREEZE": bad})


def test_gate_rules():
    metrics = ToySceneEvaluator.metrics  # the embedded default's gated figures
    parent = {"base": {"caption_exact_match": 0.9, "attribute_accuracy": 0.9, "relation_accuracy": math.nan},
              "corrections": {"accuracy": 0.1}}  # fmt: skip
    ok = {"base": {"caption_exact_match": 0.89, "attribute_accuracy": 0.95, "relation_accuracy": 0.5},
          "corrections": {"accuracy": 0.1}}  # fmt: skip
    assert gate(parent, ok, 0.02, metrics) == (True, [])
    worse_base = {**ok, "base": {**ok["base"], "attribute_accuracy": 0.87}}
    accepted, reasons = gate(parent, worse_base, 0.02, metrics)
    assert not accepted and "attribute_accuracy" in reasons[0]
    worse_corr = {**ok, "corrections": {"accuracy": 0.05}}
    assert gate(parent, worse_corr, 0.02, metrics)[1][0].startswith("held-out corrections")


def _post_corrections(settings, images: Path, regions: int, project: int = 1) -> int:
    """Reviewer corrections of ``regions`` pink objects through the webhook; returns the region count."""
    images.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, scene in enumerate(correction_scenes(regions)):
        scene.image.save(images / f"s{i}.png")
        stamp = f"2025-06-01T12:00:{i:02d}Z"
        ref = f"/data/local-files/?d=s{i}.png"
        payload = scene_payload(scene, 100 + i, ref, stamp, project, task_id=200 + i)
        code, body = handle_webhook(payload, settings)
        assert code == 201, body
        total += body["result"]["regions"]
    return total


def _settings(tmp_path: Path, checkpoint: Path, **kw):
    return job_settings(
        tmp_path, default_model=checkpoint, local_files_root=str(tmp_path / "images"), train_steps=8,
        train_batch_size=4, train_max_turns=2, gate_eval_images=3, heldout_min_records=4,
        promote_tolerance=1.0, train_min_corrections=10**6, **kw,
    )  # fmt: skip


@pytest.mark.slow
def test_job_writes_gated_immutable_version(tmp_path: Path, tiny_checkpoint: Path, redis_db, use_settings):
    settings = _settings(tmp_path, tiny_checkpoint)
    use_settings(settings)
    _post_corrections(settings, tmp_path / "images", regions=12)
    code, body = handle_webhook({"action": "START_TRAINING", "project": {"id": 1}}, settings)
    assert body["result"]["jobs"] == {1: "enqueued"}
    queue = Queue(settings.queue_name, connection=redis_db)
    SimpleWorker([queue], connection=redis_db).work(burst=True)
    job = queue.fetch_job(job_id(1, settings))
    assert job.get_status().value == "finished", job.latest_result()
    assert (
        job.meta["phase"] == "done" and job.meta["steps"] == 8 and "loss" in job.meta and "eta_s" in job.meta
    )
    (round_,) = job.return_value()["rounds"]

    registry = ModelRegistry(settings.model_dir, settings.default_model)
    version = round_["version"]
    assert registry.version_names() == ["1.0.0", version] and version == "1.1.0"
    folder = registry.path(version)
    for name in ("model.safetensors", "vision.safetensors", "config.json", "metrics.json", "version.json",
                 "training_curve.png"):  # fmt: skip
        assert (folder / name).is_file(), name
    assert (folder / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((folder / "version.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert meta["parent"] == "1.0.0" and meta["version"] == version and meta["source"] == "backend.finetune"
    assert (
        meta["data"]["corrected_images"] == 6
        and meta["data"]["train_images"] + meta["data"]["gate_images"] >= 6
    )
    assert set(meta["gate"]) >= {"accepted", "reasons", "set", "tolerance"}
    assert len(metrics["history"]) == 8 and metrics["parent_scores"]["base"]["counts"]["regions"] > 0
    # the parent records no train config: the job trained (and records) no image-token dropout
    assert read_train_config(folder).image_token_dropout == 0.0
    # The gate's decision is what happened to the pointer.
    assert (registry.current() == version) == (round_["decision"] == "promoted") == meta["gate"]["accepted"]
    assert not list(registry.staging_dir.iterdir())
    status = open_store(settings.data_dir).project_status(1)
    assert status["new"] == 0 and status["last_version"] == version


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
                pids.append(int(entry.name))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL the worker *and* its work horse: RQ moves the horse to its own process group, so
    ``killpg`` on the worker would miss it; both stay in the session started for the worker."""
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_killed_worker_leaves_no_version_and_job_reruns(
    tmp_path: Path,
    tiny_checkpoint: Path,
    redis_db,
    use_settings,
):
    # One-second heartbeats: the killed run's training lease lapses in 3 s before the rerun takes it.
    settings = _settings(tmp_path, tiny_checkpoint, job_heartbeat_seconds=1)
    use_settings(settings)
    _post_corrections(settings, tmp_path / "images", regions=8)
    handle_webhook({"action": "START_TRAINING", "project": {"id": 1}}, settings)
    # A real worker process with a long run, killed (worker and work horse) in the middle of training.
    env = {**os.environ, **settings_env(settings), "TRAIN_STEPS": "1000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.worker", "--burst"],
        cwd=REPO,
        env=env,
        start_new_session=True,  # its own session: worker and work horse are killed together
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    queue = Queue(settings.queue_name, connection=redis_db)
    job = queue.fetch_job(job_id(1, settings))
    # Wait for the state (50 steps trained), not for a time: on a busy machine that takes minutes.
    patience = 1800
    deadline = time.monotonic() + patience
    while True:
        meta = job.get_meta(refresh=True)
        if meta.get("phase") == "train" and meta.get("step", 0) >= 50:
            break
        assert job.get_status(refresh=True).value != "failed", job.latest_result().exc_string
        assert proc.poll() is None, "worker exited early"
        if time.monotonic() > deadline:
            pytest.fail(f"training not under way after {patience} s: {meta}")
        time.sleep(0.2)
    _kill_session(proc.pid)
    proc.wait(timeout=120)
    deadline = time.monotonic() + 120
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _session_pids(proc.pid)

    registry = ModelRegistry(settings.model_dir, settings.default_model)
    assert registry.version_names() == ["1.0.0"] and registry.current() == "1.0.0"
    assert job.get_status(refresh=True).value == "started"  # nobody is left to say otherwise
    # RQ's abandoned-job recovery (what a live worker runs periodically) re-queues it: it has retries.
    queue.started_job_registry.cleanup(timestamp=time.time() + 10 * settings.job_timeout)
    assert job.get_status(refresh=True).value == "queued"
    registry.clean_staging()  # what `python -m backend.worker` does at start
    SimpleWorker([queue], connection=redis_db).work(burst=True)
    assert job.get_status(refresh=True).value == "finished"
    assert registry.version_names() == ["1.0.0", "1.1.0"]
    assert json.loads((registry.path("1.1.0") / "version.json").read_text())["parent"] == "1.0.0"


def test_score_records_counts_question_kinds(tiny_checkpoint: Path, tmp_path: Path):
    from model.checkpoint import load_model
    from model.inference.engine import InferenceEngine

    settings = _settings(tmp_path, tiny_checkpoint, redis_url="redis://127.0.0.1:1/13")
    _post_corrections(settings, tmp_path / "images", regions=2)
    from backend.finetune import load_images

    records, failed = load_images(open_store(settings.data_dir).export_records(1), settings)
    assert failed == [] and len(records) == 1
    scores = score_records(InferenceEngine(load_model(tiny_checkpoint)), records)
    n_objects = len(records[0]["boxes"])
    assert scores["questions"] == len(records[0]["conversations"]) // 2
    assert {"caption_accuracy", "attribute_accuracy"} <= set(scores) and n_objects >= 2
    assert 0.0 <= scores["accuracy"] <= 1.0
