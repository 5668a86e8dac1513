"""The steps the end-to-end demos share (:mod:`tools.ls.demo_active_learning`,
:mod:`tools.ls.demo_nonascii`): settings pointed at a work folder, a seeded registry, a reviewer's
annotations POSTed to the real backend app, and a real RQ worker running the fine-tuning job the
last annotation enqueued.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.checkpoint import DEFAULT_DIR
from toyworld.scenes import Scene

if TYPE_CHECKING:  # the backend reads its settings on import: only once the environment is set
    from flask.testing import FlaskClient
    from rq.job import Job

    from backend.registry import ModelRegistry
    from backend.settings import Settings

__all__ = [
    "PayloadFn",
    "demo_parser",
    "finish",
    "post_annotations",
    "run_worker",
    "seed_registry",
    "use_work_folder",
]

REPO = Path(__file__).resolve().parents[2]
PayloadFn = Callable[[Scene, int, str], dict[str, Any]]
"""``(scene, index, image_url) -> ANNOTATION_CREATED body`` of the reviewer's ``index``-th annotation."""


def use_work_folder(work: Path, model: Path, prefix: str, env: dict[str, str] | None = None) -> Path:
    """Point the settings at ``work`` through the environment (registry, store and image root in it,
    a queue and key prefix of its own, ``model`` as the default), then ``env``; the app, this process
    and the worker all read the same settings.  Returns the image folder."""
    work.mkdir(parents=True, exist_ok=True)
    images_dir = work / "images"
    images_dir.mkdir(exist_ok=True)
    os.environ.update({
        "MODEL_DIR": str(work / "models"),
        "DATA_DIR": str(work / "data"),
        "DEFAULT_MODEL": str(model),
        "LOCAL_FILES_DOCUMENT_ROOT": str(images_dir),
        "QUEUE_NAME": f"{prefix}-{uuid.uuid4().hex[:8]}",
        "KEY_PREFIX": f"{prefix}-{uuid.uuid4().hex[:8]}",
        **(env or {}),
    })  # fmt: skip
    return images_dir


def seed_registry(scenes: Sequence[Scene]) -> tuple[Settings, ModelRegistry, str]:
    """Settings whose ``TRAIN_MIN_CORRECTIONS`` is the regions of ``scenes`` (the last annotation
    triggers the job) and the registry seeded from the default; returns (settings, registry, parent)."""
    from backend.registry import ModelRegistry
    from backend.settings import get_settings

    os.environ["TRAIN_MIN_CORRECTIONS"] = str(sum(len(s.objects) for s in scenes))
    get_settings.cache_clear()
    settings = get_settings()
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    return settings, registry, registry.ensure_initialized()


def post_annotations(
    client: FlaskClient, scenes: Sequence[Scene], images_dir: Path, payload: PayloadFn
) -> tuple[list[int], dict[str, Any]]:
    """Save each scene's image in ``images_dir`` and POST its annotation to ``/webhook``; returns
    the HTTP codes and the last answer's body."""
    codes, resp = [], None
    for i, scene in enumerate(scenes):
        name = f"correction-{i:03d}.png"
        scene.image.save(images_dir / name)
        resp = client.post("/webhook", json=payload(scene, i, f"/data/local-files/?d={name}"))
        codes.append(resp.status_code)
    return codes, resp.get_json() if resp is not None else {}


def run_worker(settings: Settings, project_id: int, log: Callable[[str], Any] = print) -> Job:
    """Run ``python -m backend.worker --burst`` until it exits, logging every change of the
    project's job meta (phase, step, loss...); returns the finished job.  Raises ``RuntimeError``
    when no job is enqueued or it does not finish."""
    from rq import Queue

    from backend.jobs import job_id, redis_connection

    queue = Queue(settings.queue_name, connection=redis_connection(settings))
    key = job_id(project_id, settings)
    if key not in queue.job_ids:
        raise RuntimeError(f"no fine-tuning job {key} was enqueued")
    command = [sys.executable, "-m", "backend.worker", "--burst"]
    worker = subprocess.Popen(command, cwd=REPO, env=os.environ.copy())
    job = queue.fetch_job(key)
    last = None
    while worker.poll() is None:
        time.sleep(2)
        meta = job.get_meta(refresh=True) if job is not None else {}
        line = {k: meta.get(k) for k in ("phase", "step", "steps", "loss", "eta_s") if k in meta}
        if line != last:
            log(f"job {key}: {json.dumps(line)}")
            last = line
    if worker.returncode != 0 or job is None or job.get_status(refresh=True).value != "finished":
        raise RuntimeError(f"worker exited {worker.returncode}; job status {job and job.get_status().value}")
    return job


def demo_parser(doc: str, regions: int) -> argparse.ArgumentParser:
    """The demos' shared command line (``--model --regions --work --check --json``); the caller
    adds the size of its evaluation."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR, help="starting checkpoint")
    ap.add_argument("--regions", type=int, default=regions, help="pink regions the reviewer corrects")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures and job summary here")
    return ap


def finish(text: str, missed: Sequence[str], started: float, args: argparse.Namespace, out: dict) -> int:
    """Print a demo's table and targets, write ``out`` (plus ``missed``) to ``--json``; the exit
    code (1 when a target is missed and ``--check`` asks)."""
    print(text)
    print("targets: " + ("met" if not missed else "MISSED: " + "; ".join(missed)))
    print(f"total {time.monotonic() - started:.0f}s")
    if args.json:
        args.json.write_text(
            json.dumps({**out, "missed": list(missed)}, indent=2, ensure_ascii=False, default=str)
        )
    return 1 if missed and args.check else 0
