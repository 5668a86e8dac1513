"""Throughput of project pre-annotation through a real Label Studio (issue 18).

``python -m tools.bench_preannotate [--tasks 1000] [--boxes 3] [--runs 1x1,2x1,ls]``

Starts Label Studio 1.23.2 (``tools.ls.harness``), uploads ``--tasks`` distinct toyworld scenes
(each with ``--boxes`` objects) once, and for every run imports the same tasks (upload URL plus
``data.boxes``) into a fresh project, then pre-annotates them:

* ``WxT``: ``W`` processes of ``python -m backend.worker --preannotate`` with ``OMP_NUM_THREADS=T``,
  started together with ``python -m backend.jobs preannotate --all``.  ``wall``: from starting the
  workers to the last write; ``run``: from the enqueue to the last write (model load included,
  process start not); tasks/s and regions/s are over ``run``; *steady*: from the first written
  prediction to the last;
* ``ls`` / ``lsT``: Label Studio's own *Retrieve predictions* (Data Manager action, one synchronous
  ``/predict`` with every task) against this backend under gunicorn (1 process, 4 threads,
  ``OMP_NUM_THREADS=T``, 2 by default), timed around the action (the harness sets Label Studio's
  ``ML_TIMEOUT_PREDICT`` to 300 s).

Each run checks that every task ends with exactly one prediction, then prints one JSON line; a
Markdown table follows at the end.  Needs Redis (``--redis``, default ``TEST_REDIS_URL`` or DB 10).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from redis import Redis

from backend.preannotate import run_status
from backend.settings import Settings
from model.inference.image_input import encode_image
from tools.ls.harness import LS_TOKEN, LabelStudio, start_backend, start_label_studio
from toyworld.scenes import SceneSpec, make_scene

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "model" / "default"
CONFIG = REPO / "label_config" / "region_caption.xml"
UPLOAD_BATCH = 100


def _env(settings: Settings) -> dict[str, str]:
    from dataclasses import fields

    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if text != "":
            env[Settings.env_name(f)] = text
    return env


def upload_scenes(ls: LabelStudio, count: int, boxes: int, seed: int) -> list[dict[str, Any]]:
    """Upload ``count`` distinct scenes into a holder project; returns ``{"image", "boxes"}`` data."""
    holder = ls.create_project("bench images", CONFIG.read_text())
    rng = random.Random(seed)
    scenes = [make_scene(rng, SceneSpec(min_objects=boxes, max_objects=boxes)) for _ in range(count)]
    for start in range(0, count, UPLOAD_BATCH):
        files = [
            (f"file{i}", (f"scene-{i}.png", encode_image(scenes[i].image), "image/png"))
            for i in range(start, min(start + UPLOAD_BATCH, count))
        ]
        ls.call("POST", f"/api/projects/{holder}/import", files=files, timeout=300)
    by_name: dict[str, str] = {}
    page = 1
    while len(by_name) < count:
        body = ls.call("GET", f"/api/tasks?project={holder}&fields=task_only&page_size=500&page={page}")
        for task in body["tasks"]:
            image = task["data"]["image"]
            by_name[image.rsplit("-", 1)[-1] if "-" in image else image] = image
        page += 1
    return [
        {"image": by_name[f"{i}.png"], "boxes": [list(o.box) for o in scenes[i].objects]}
        for i in range(count)
    ]


def new_project(ls: LabelStudio, title: str, data: list[dict[str, Any]]) -> int:
    project = ls.create_project(title, CONFIG.read_text())
    for start in range(0, len(data), 500):
        ls.call("POST", f"/api/projects/{project}/import", json=data[start : start + 500], timeout=300)
    return project


def check_predictions(ls: LabelStudio, project: int, tasks: int) -> dict[str, Any]:
    predictions = ls.call("GET", f"/api/predictions?project={project}", timeout=300)
    per_task = Counter(p["task"] for p in predictions)
    regions = sum(len({r["id"] for r in p["result"] if r.get("type") != "relation"}) for p in predictions)
    return {
        "tasks_with_prediction": len(per_task),
        "one_per_task": len(per_task) == tasks and set(per_task.values()) == {1},
        "regions": regions,
        "versions": sorted({p["model_version"] for p in predictions}),
    }


def run_workers(
    ls: LabelStudio, settings: Settings, project: int, workers: int, threads: int, work: Path
) -> dict[str, Any]:
    env = {**_env(settings), "OMP_NUM_THREADS": str(threads)}
    redis = Redis.from_url(settings.redis_url)
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "backend.worker", "--preannotate"],
            env=env,
            cwd=REPO,
            stdout=open(work / f"worker-{project}-{k}.log", "wb"),
            stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True,
        )  # fmt: skip
        for k in range(workers)
    ]
    try:
        cli = subprocess.run(
            [sys.executable, "-m", "backend.jobs", "preannotate", "--project", str(project), "--detach"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        run = json.loads(cli.stdout.strip().splitlines()[-1])["run"]
        while not (status := run_status(settings, redis, run))["finished"]:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a worker exited: see {work}")
            time.sleep(0.5)
        wall = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    run_s = status["elapsed_s"]  # enqueue -> last write: model load included, process start not
    steady = run_s - (status["first_write_s"] or 0.0)
    done = status["done"]
    return {
        "path": f"{workers} worker(s), OMP_NUM_THREADS={threads}",
        "tasks": status["total"], "done": done, "failed": status["failed"], "wall_s": round(wall, 1),
        "run_s": round(run_s, 1), "tasks_per_s": round(done / run_s, 2),
        "regions_per_s": round(status["regions"] / run_s, 2),
        "steady_tasks_per_s": round(done / steady, 2) if steady > 0 else None,
        "first_write_s": status["first_write_s"],
    }  # fmt: skip


def run_label_studio(
    ls: LabelStudio, ls_url: str, project: int, model: Path, work: Path, threads: int = 2
) -> dict[str, Any]:
    backend = start_backend(
        work / f"backend-{project}", ls_url, model, timeout=600, extra_env={"OMP_NUM_THREADS": str(threads)}
    )
    try:
        ml = ls.connect_backend(project, backend.url)
        started = time.monotonic()
        try:
            answer = ls.retrieve_predictions(project, timeout=900)
        except RuntimeError as exc:
            answer = {"error": str(exc)[:300]}
        wall = time.monotonic() - started
    finally:
        backend.stop()
    return {"path": f"Label Studio 'Retrieve predictions' (1 gunicorn process, OMP_NUM_THREADS={threads})",
            "ml_backend": ml.get("id"), "answer": answer, "wall_s": round(wall, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--boxes", type=int, default=3)
    ap.add_argument(
        "--runs",
        default="1x1,2x1,ls",
        help="WxT (workers x OMP threads) or lsT (T: OMP threads, 2), comma-separated",
    )
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--redis", default=os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/10")
    ap.add_argument("--seed", type=int, default=18_000)
    args = ap.parse_args(argv)
    model = DEFAULT_MODEL
    work = Path(tempfile.mkdtemp(prefix="bench-preannotate-"))
    server = start_label_studio(work / "ls", timeout=1500)
    rows = []
    try:
        ls = LabelStudio(server.url)
        data = upload_scenes(ls, args.tasks, args.boxes, args.seed)
        for spec in args.runs.split(","):
            project = new_project(ls, f"bench {spec}", data)
            if spec.startswith("ls"):
                row = run_label_studio(ls, server.url, project, model, work, int(spec[2:] or 2))
                row["tasks"] = args.tasks
            else:
                workers, threads = (int(x) for x in spec.split("x"))
                tag = uuid.uuid4().hex[:8]
                settings = Settings(
                    redis_url=args.redis, key_prefix=f"bench-{tag}", queue_name=f"bench-train-{tag}",
                    preannotate_queue=f"bench-pa-{tag}", preannotate_chunk_tasks=args.chunk,
                    model_dir=work / f"models-{tag}", data_dir=work / f"data-{tag}", default_model=model,
                    label_studio_url=server.url, label_studio_api_key=LS_TOKEN,
                )  # fmt: skip
                settings = replace(settings, job_heartbeat_seconds=5)
                row = run_workers(ls, settings, project, workers, threads, work)
            row.update(check_predictions(ls, project, args.tasks))
            if "wall_s" in row and row.get("tasks_with_prediction"):
                row.setdefault("tasks_per_s", round(row["tasks_with_prediction"] / row["wall_s"], 2))
                row.setdefault("regions_per_s", round(row["regions"] / row["wall_s"], 2))
            row["load_avg_1m"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
    print(f"\n{args.tasks} tasks x {args.boxes} boxes, model {model.name}, {os.cpu_count()} CPUs\n")
    print("| path | wall s | run s | tasks/s | regions/s | steady tasks/s | one prediction per task |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['path']} | {row['wall_s']} | {row.get('run_s', row['wall_s'])} | "
            f"{row.get('tasks_per_s')} | "
            f"{row.get('regions_per_s')} | {row.get('steady_tasks_per_s', '-')} | {row['one_per_task']} "
            f"({row['tasks_with_prediction']}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
