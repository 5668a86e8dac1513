"""Screenshot of Label Studio's labeling page showing a predicted caption on a box.

Starts Label Studio (``.venv-ls``) and the backend (gunicorn), creates a project with a shipped
label config, uploads one synthetic scene with its boxes pre-drawn, connects the backend,
retrieves predictions, selects the backend's version for the project, then lets
``tools/ls/browser_shot.py`` (Selenium in ``.venv-ls`` + the system headless Chromium) log in,
open the task, select the first box and save a PNG::

    bash scripts/setup_label_studio.sh
    .venv/bin/python -m tools.ls.screenshot_labeling --out docs/screenshots/labeling_prediction.png

``--config region_qa`` asks the backend questions about the drawn boxes through Label Studio's
interactive request (as the smart question TextArea does), saves boxes, questions and the backend's
answer as the task's annotation and shoots the page once the answer shows::

    .venv/bin/python -m tools.ls.screenshot_labeling --config region_qa --out docs/screenshots/qa_answer.png

``--data-manager`` pre-annotates a project with ``python -m backend.jobs preannotate`` and one
``python -m backend.worker --preannotate`` (Redis: ``--redis``, default ``TEST_REDIS_URL`` or DB 10),
selects the served version as the project's ``model_version``, shows the *Prediction score* column
in the Data Manager tab and shoots the tasks table::

    .venv/bin/python -m tools.ls.screenshot_labeling --data-manager \
        --out docs/screenshots/preannotate_data_manager.png
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

from model.checkpoint import DEFAULT_DIR
from model.inference.image_input import encode_image
from tools.ls.harness import (
    LS_PASSWORD,
    LS_TOKEN,
    LS_USER,
    LS_VENV,
    LabelStudio,
    Server,
    start_backend,
    start_label_studio,
)
from tools.ls.payloads import rectangle_result
from toyworld.scenes import SceneSpec, make_scene

REPO = Path(__file__).resolve().parents[2]
BROWSER_SHOT = Path(__file__).with_name("browser_shot.py")  # runs in .venv-ls, which has selenium


def make_task(
    ls: LabelStudio, project: int, seed: int, colors: list[str] | None = None
) -> tuple[int, list[str]]:
    """Upload one synthetic scene (of ``colors`` only, if given); pre-draw its true boxes as a
    prediction.  -> (task id, captions)."""
    spec = SceneSpec(min_objects=3, max_objects=3)
    scene = make_scene(random.Random(seed), replace(spec, colors=colors) if colors else spec)
    task = ls.upload_images(project, [("scene-0.png", encode_image(scene.image))])["scene-0.png"]
    result = [
        rectangle_result(f"box{k + 1}", obj.box, scene.width, scene.height)
        for k, obj in enumerate(scene.objects)
    ]
    ls.add_prediction(task["id"], result, "boxes")
    return task["id"], [obj.caption for obj in scene.objects]


QA_QUESTIONS = ["What colour is box 1?", "And what shape is it?", "How is box 1 related to box 2?"]
DM_VISIBLE = {"id", "total_predictions", "predictions_score", "predictions_model_versions", "data.image"}


def shoot(server: Server, project: int, task: int, text: str, out: Path, *extra: str) -> None:
    """Run ``browser_shot.py`` in ``.venv-ls`` (it logs in and waits for ``text`` on the page)."""
    cmd = [str(LS_VENV / "bin" / "python"), str(BROWSER_SHOT), server.url, str(project), str(task), text,
           str(out), *extra]  # fmt: skip
    login = {"LS_USER": LS_USER, "LS_PASSWORD": LS_PASSWORD}
    subprocess.run(cmd, check=True, env={**os.environ, **login})


def shrink_png(path: Path, max_bytes: int = 300_000) -> None:
    """Re-save ``path`` palette-quantised, halving its size until it is under ``max_bytes``."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    while True:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size <= max_bytes or image.width < 600:
            break
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    print(f"{path}: {image.width}x{image.height}, {path.stat().st_size} bytes")


def qa_shot(server: Server, backend: Server, out: Path, seed: int) -> None:
    """Questions about a scene's boxes answered in the interactive request, kept as the annotation."""
    ls = LabelStudio(server.url)
    project = ls.create_project("Asking about regions", (REPO / "label_config" / "region_qa.xml").read_text())
    scene = make_scene(random.Random(seed), SceneSpec(min_objects=3, max_objects=3))
    task = ls.upload_images(project, [("scene-0.png", encode_image(scene.image))])["scene-0.png"]["id"]
    ml = ls.connect_backend(project, backend.url)
    boxes = [{**rectangle_result(f"box{k + 1}", o.box, scene.width, scene.height), "origin": "manual"}
             for k, o in enumerate(scene.objects)]  # fmt: skip
    question = {"id": "question", "from_name": "question", "to_name": "image", "type": "textarea",
                "origin": "manual", "value": {"text": QA_QUESTIONS}}  # fmt: skip
    answer = ls.interactive(ml["id"], task, {"result": [*boxes, question]})["data"]
    (item,) = [r for r in answer["result"] if r["from_name"] == "answer"]
    lines = item["value"]["text"]
    truth = [(o.color, o.shape, o.caption) for o in scene.objects]
    print(f"questions {QA_QUESTIONS}\nanswers {lines}\nscene objects (colour, shape, caption) {truth}")
    ls.create_annotation(task, [*boxes, question, {k: v for k, v in item.items() if k != "score"}])
    shoot(server, project, task, lines[-1], out, "--size", "1400,1500")  # the answer sits below the image


def show_score_column(ls: LabelStudio, project: int) -> None:
    """Make the project's Data Manager tab show only a few columns, *Prediction score* among them."""
    columns = ls.call("GET", f"/api/dm/columns?project={project}")["columns"]
    keys = []
    for col in columns:
        key = f"{col['parent']}.{col['id']}" if col.get("parent") else col["id"]
        keys.append(f"{col.get('target', 'tasks')}:{key}")
    keys += [f"tasks:data.{k}" for t in ls.tasks(project)[:1] for k in t["data"]]  # imported data keys too
    hidden = sorted({k for k in keys if k.split(":", 1)[1] not in DM_VISIBLE})
    if "tasks:predictions_score" not in keys:
        raise RuntimeError(f"no predictions_score column among {keys}")
    data = {"title": "Default", "hiddenColumns": {"explore": hidden, "labeling": hidden}}
    views = ls.call("GET", f"/api/dm/views?project={project}")
    if views:
        ls.call("PATCH", f"/api/dm/views/{views[0]['id']}", json={"project": project, "data": data})
    else:
        ls.call("POST", "/api/dm/views", json={"project": project, "data": data})


def data_manager_shot(server: Server, model: Path, out: Path, tasks: int, redis: str, seed: int) -> None:
    """Pre-annotate a project with a worker, select the served version, shoot the tasks table."""
    from backend.settings import Settings
    from tools.bench_preannotate import check_predictions, new_project, run_workers, upload_scenes

    ls = LabelStudio(server.url)
    data = upload_scenes(ls, tasks, 3, seed)
    project = new_project(ls, "Pre-annotated scenes", data)
    work = Path(tempfile.mkdtemp(prefix="ls-shot-pa-"))
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        redis_url=redis, key_prefix=f"shot-{tag}", queue_name=f"shot-train-{tag}",
        preannotate_queue=f"shot-pa-{tag}", model_dir=work / "models", data_dir=work / "data",
        default_model=model, label_studio_url=server.url, label_studio_api_key=LS_TOKEN,
    )  # fmt: skip
    row = run_workers(ls, replace(settings, job_heartbeat_seconds=5), project, 1, 2, work)
    row.update(check_predictions(ls, project, tasks))
    print(row)
    (version,) = row["versions"]
    ls.update_project(project, model_version=version)  # the score column averages this version's scores
    show_score_column(ls, project)
    first = min(ls.tasks(project), key=lambda t: t["id"])
    score = ls.call("GET", f"/api/predictions?task={first['id']}")[0]["score"]
    print(f"task {first['id']} prediction score {score}")
    shoot(
        server, project, first["id"], f"{score:.6f}"[:3], out, "--data-manager", "--size", "1400,1000"
    )  # "0.8" of 0.8734


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots" / "labeling_prediction.png")
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR, help="checkpoint folder to serve")
    ap.add_argument("--config", default="caption_attributes", help="label_config/<name>.xml")
    ap.add_argument("--seed", type=int, default=8_600_001)
    ap.add_argument("--data-manager", action="store_true", help="pre-annotate, shoot the Data Manager")
    ap.add_argument("--tasks", type=int, default=8, help="tasks to pre-annotate (--data-manager)")
    ap.add_argument("--redis", default=os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/10")
    ap.add_argument("--colors", nargs="*", default=None, help="scene colours (e.g. pink: a taught concept)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ls-shot-"))
    ls_server = start_label_studio(work / "ls")
    backend = None
    try:
        if args.data_manager:
            data_manager_shot(ls_server, args.model, args.out, args.tasks, args.redis, args.seed)
            shrink_png(args.out)
            return 0
        backend = start_backend(work / "backend", ls_server.url, args.model)
        if args.config == "region_qa":
            qa_shot(ls_server, backend, args.out, args.seed)
            shrink_png(args.out)
            return 0
        ls = LabelStudio(ls_server.url)
        xml = (REPO / "label_config" / f"{args.config}.xml").read_text()
        project = ls.create_project("Region captions", xml)
        task, captions = make_task(ls, project, args.seed, args.colors)
        ls.connect_backend(project, backend.url)
        ls.retrieve_predictions(project)
        stored = [p for p in ls.predictions(project) if p["model_version"] != "boxes"]
        ls.update_project(project, model_version=stored[0]["model_version"])  # show these predictions
        first = next(r for r in stored[0]["result"] if r["from_name"] == "caption" and r["id"] == "box1")
        predicted = first["value"]["text"][0]
        print(f"true captions {captions}; predicted for box1: {predicted!r}")
        cmd = [str(LS_VENV / "bin" / "python"), str(BROWSER_SHOT), ls_server.url,
               str(project), str(task), predicted, str(args.out)]  # fmt: skip
        login = {"LS_USER": LS_USER, "LS_PASSWORD": LS_PASSWORD}
        subprocess.run(cmd, check=True, env={**os.environ, **login})
    finally:
        if backend is not None:
            backend.stop()
        ls_server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
