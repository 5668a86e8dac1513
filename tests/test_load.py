"""Load: 8 concurrent clients x 200 ``/predict`` requests (interactive and batch mixed) against the
gunicorn-served backend on loopback.  Prints p50/p95 latency, throughput and the worker's resident
memory over the run; asserts no errors and no memory growth beyond the bounded caches."""

from __future__ import annotations

import random
import statistics
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.test_backend_app import ATTR_XML, CAPTION_XML, data_url, ls_task, predict_payload, rect
from tools.ls.harness import start_backend
from toyworld.scenes import SceneSpec, make_scene

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "model" / "default"
CLIENTS, REQUESTS = 8, 200
IMAGES = 12
# The first concurrent requests grow the heap (thread arenas, larger batch shapes) once; after that
# the resident size must stay flat: the caches are bounded and nothing else accumulates.
MAX_WARMUP_GROWTH_MIB = 128.0
MAX_STEADY_GROWTH_MIB = 24.0


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def payloads(rng: random.Random, scenes: list, urls: list[str]) -> list[tuple[str, dict, int]]:
    """``(kind, body, expected results)``: half interactive (one new box on a task), half batch
    (two tasks whose annotations hold the boxes)."""
    out = []
    for _ in range(REQUESTS):
        xml = rng.choice([CAPTION_XML, ATTR_XML])
        if rng.random() < 0.5:
            i = rng.randrange(len(scenes))
            boxes = [
                rect(f"b{k}", o.box, scenes[i].width, scenes[i].height)
                for k, o in enumerate(scenes[i].objects)
            ]
            task = ls_task(1, image=urls[i])
            out.append(("interactive", predict_payload([task], xml, context={"result": boxes}), 1))
        else:
            tasks = []
            for t, i in enumerate(rng.sample(range(len(scenes)), 2)):
                s = scenes[i]
                result = [rect(f"t{t}b{k}", o.box, s.width, s.height) for k, o in enumerate(s.objects[:2])]
                tasks.append(ls_task(t + 1, result, image=urls[i]))
            out.append(("batch", predict_payload(tasks, xml), 2))
    return out


@pytest.mark.slow
def test_concurrent_predict_load(tmp_path: Path, tiny_checkpoint: Path):
    model = DEFAULT_MODEL if (DEFAULT_MODEL / "config.json").is_file() else tiny_checkpoint
    server = start_backend(tmp_path / "backend", "", model, extra_env={"FEATURE_CACHE_MB": "64"})
    try:
        scenes = [
            make_scene(random.Random(4242 + i), SceneSpec(min_objects=2, max_objects=3))
            for i in range(IMAGES)
        ]
        urls = [data_url(s.image) for s in scenes]
        pid = worker_pid(server.proc.pid)
        session = requests.Session()
        for i, scene in enumerate(scenes):  # warm-up: every image once, so the caches hold what they will
            boxes = [rect(f"b{k}", o.box, scene.width, scene.height) for k, o in enumerate(scene.objects)]
            for xml in (CAPTION_XML, ATTR_XML):
                body = predict_payload([ls_task(1, image=urls[i])], xml, context={"result": boxes})
                assert session.post(f"{server.url}/predict", json=body, timeout=120).status_code == 200
        rss = [rss_mib(pid)]
        latencies: dict[str, list[float]] = {"interactive": [], "batch": []}
        errors: list[str] = []
        lock = threading.Lock()
        done = [0]

        def client(seed: int) -> None:
            own = requests.Session()
            for kind, body, expected in payloads(random.Random(seed), scenes, urls):
                t0 = time.perf_counter()
                try:
                    resp = own.post(f"{server.url}/predict", json=body, timeout=300)
                    ok = resp.status_code == 200 and len(resp.json()["results"]) == expected
                    problem = None if ok else f"{resp.status_code}: {resp.text[:200]}"
                except requests.RequestException as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies[kind].append(elapsed)
                    if problem:
                        errors.append(problem)
                    done[0] += 1
                    if done[0] % 400 == 0:
                        rss.append(rss_mib(pid))

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss.append(rss_mib(pid))
        health = session.get(f"{server.url}/health", timeout=10).json()
    finally:
        server.stop()

    every = latencies["interactive"] + latencies["batch"]

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[q - 1] * 1000

    print(f"\nmodel: {model.name}; {CLIENTS} clients x {REQUESTS} requests = {len(every)} in {wall:.1f} s "
          f"({len(every) / wall:.1f} req/s); errors: {len(errors)}")  # fmt: skip
    for kind, values in (*latencies.items(), ("all", every)):
        print(f"{kind:12s} n={len(values):5d} p50={pct(values, 50):7.1f} ms p95={pct(values, 95):7.1f} ms "
              f"max={max(values) * 1000:7.1f} ms")  # fmt: skip
    print(
        "worker RSS MiB after warm-up, every 400 requests, at the end: " + " ".join(f"{r:.0f}" for r in rss)
    )
    assert not errors, errors[:5]
    assert len(every) == CLIENTS * REQUESTS
    assert health["status"] == "UP"
    assert rss[1] - rss[0] < MAX_WARMUP_GROWTH_MIB, rss
    assert rss[-1] - rss[1] < MAX_STEADY_GROWTH_MIB, rss  # from request 400 to request 1,600
