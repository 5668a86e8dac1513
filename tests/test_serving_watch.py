"""Each serving process follows the registry on its own (issue 15, item 4).

A promotion is noticed by the holder's watcher thread within ``MODEL_POLL_SECONDS`` with no request
arriving; ``/health`` and ``/setup`` then report the new version; a request that starts after the
swap point is answered by the new version.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from backend.app import create_app
from backend.registry import ModelRegistry
from backend.serving import ModelHolder
from tests.test_backend_app import SCENE, SETUP_PAYLOAD, ls_task, make_settings, predict_payload, rect

POLL = 0.3
LATE = 1.5  # scheduling slack on a shared 2-core machine, on top of MODEL_POLL_SECONDS


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, message: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == message]


@pytest.fixture()
def records():
    handler = Records()
    logger = logging.getLogger("backend.serving")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def wait_until(condition, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def commit_copy(settings, checkpoint: Path, version: str) -> ModelRegistry:
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    staged = registry.staging()
    shutil.rmtree(staged)
    shutil.copytree(checkpoint, staged)
    registry.commit_folder(staged, version)
    return registry


@pytest.fixture()
def app_env(tmp_path, tiny_checkpoint):
    settings = make_settings(tmp_path, tiny_checkpoint, model_poll_seconds=POLL)
    holder = ModelHolder(settings)
    client = create_app(settings, holder).test_client()
    assert wait_until(lambda: holder.loaded, 120)
    yield client, holder, settings
    holder.stop()


def test_promotion_reaches_health_and_setup_without_any_request(
    app_env, tiny_checkpoint, records, monkeypatch
):
    client, holder, settings = app_env
    assert holder.watching
    polled: list[str] = []
    # Requests must not drive the swap: any poll from a request would be recorded here.
    monkeypatch.setattr(holder, "poll", lambda force=False: polled.append("poll"))
    registry = commit_copy(settings, tiny_checkpoint, "1.1.0")
    registry.promote("1.1.0", reason="test")
    promoted = time.time()
    assert wait_until(lambda: bool(records.named("model version noticed")), POLL + LATE + 5)
    (noticed,) = records.named("model version noticed")
    assert noticed.version == "1.1.0" and noticed.serving == "1.0.0"
    assert noticed.created - promoted <= POLL + LATE, "noticed within MODEL_POLL_SECONDS"
    assert wait_until(lambda: bool(records.named("model swapped")), 120)
    (swapped,) = records.named("model swapped")
    assert swapped.version == "1.1.0" and swapped.previous == "1.0.0"
    # Only now any request: every endpoint already says the new version.
    assert client.get("/health").get_json()["model_version"] == "1.1.0"
    assert client.post("/setup", json=SETUP_PAYLOAD).get_json()["model_version"] == "1.1.0"
    assert polled == []


def test_no_request_after_the_swap_point_gets_the_old_version(app_env, tiny_checkpoint, records):
    client, holder, settings = app_env
    payload = predict_payload([ls_task(1, [rect("a", SCENE.objects[0].box)])])
    answers: list[tuple[float, float, str]] = []  # (started, finished, model_version)
    stop = threading.Event()
    errors: list[str] = []

    def hammer() -> None:
        while not stop.is_set():
            started = time.time()
            resp = client.post("/predict", json=payload)
            if resp.status_code != 200:
                errors.append(f"{resp.status_code}: {resp.get_data(as_text=True)[:200]}")
                return
            answers.append((started, time.time(), resp.get_json()["results"][0]["model_version"]))

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(answers) >= 2 or errors, 60)
        commit_copy(settings, tiny_checkpoint, "1.1.0").promote("1.1.0", reason="test")
        assert wait_until(lambda: bool(records.named("model swapped")), 120)
        swap = records.named("model swapped")[0].created  # logged right after the swap point
        assert wait_until(lambda: sum(1 for a in answers if a[0] > swap) >= 3 or errors, 60)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert {v for *_, v in answers} == {"1.0.0", "1.1.0"}
    after = [v for started, _, v in answers if started > swap]
    assert after and set(after) == {"1.1.0"}, "a request started after the swap got the old version"


def test_a_holder_that_is_not_started_still_follows_on_requests(tmp_path, tiny_checkpoint):
    settings = make_settings(tmp_path, tiny_checkpoint, model_poll_seconds=0.0)
    holder = ModelHolder(settings)  # no start(): no watcher, get() polls as before
    assert not holder.watching
    _, version = holder.get()
    assert version == "1.0.0"
    commit_copy(settings, tiny_checkpoint, "1.1.0").promote("1.1.0", reason="test")
    assert holder.wait_for_version("1.1.0", timeout=60)
    assert holder.get()[1] == "1.1.0"


def test_stopped_watcher_ends_and_zero_poll_does_not_spin(tmp_path, tiny_checkpoint):
    settings = make_settings(tmp_path, tiny_checkpoint, model_poll_seconds=0.0)
    holder = ModelHolder(settings)
    reads = []
    real_current = holder.registry.current
    holder.registry.current = lambda: reads.append(1) or real_current()  # type: ignore[method-assign]
    holder.start()
    assert wait_until(lambda: holder.loaded, 120)
    reads.clear()
    time.sleep(0.5)  # measuring a rate: how many pointer reads in half a second
    assert 0 < len(reads) <= 0.5 / 0.1 + 2, len(reads)
    holder.stop()
    assert wait_until(lambda: not holder.watching, 5)


def test_watcher_starts_again_in_a_forked_child(tmp_path, tiny_checkpoint):
    settings = replace(make_settings(tmp_path, tiny_checkpoint), model_poll_seconds=POLL)
    holder = ModelHolder(settings)
    holder.start()
    assert wait_until(lambda: holder.loaded, 120)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: threads are gone after a fork; the first look at the holder restarts it
        try:
            before = holder.watching
            _ = holder.version
            os.write(write, f"{int(before)}{int(holder.watching)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 8).decode()
    os.waitpid(pid, 0)
    holder.stop()
    assert answer == "01", answer
