"""Screenshot of Label Studio's labeling page showing a predicted caption on a box.

Starts Label Studio (``.venv-ls``) and the backend (gunicorn), creates a project with a shipped
label config, uploads one synthetic scene with its boxes pre-drawn, connects the backend,
retrieves predictions, selects the backend's version for the project, then lets
``tools/ls/browser_shot.py`` (Selenium in ``.venv-ls`` + the system headless Chromium) log in,
open the task, select the first box and save a PNG::

    bash scripts/setup_label_studio.sh
    .venv/bin/python -m tools.ls.screenshot_labeling --out docs/screenshots/labeling_prediction.png
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import tempfile
from pathlib import Path

from model.checkpoint import DEFAULT_DIR
from model.inference.image_input import encode_image
from tools.ls.harness import LS_PASSWORD, LS_USER, LS_VENV, LabelStudio, start_backend, start_label_studio
from tools.ls.payloads import rectangle_result
from toyworld.scenes import SceneSpec, make_scene

REPO = Path(__file__).resolve().parents[2]
BROWSER_SHOT = Path(__file__).with_name("browser_shot.py")  # runs in .venv-ls, which has selenium


def make_task(ls: LabelStudio, project: int, seed: int) -> tuple[int, list[str]]:
    """Upload one synthetic scene; pre-draw its true boxes as a prediction.  -> (task id, captions)."""
    scene = make_scene(random.Random(seed), SceneSpec(min_objects=3, max_objects=3))
    task = ls.upload_images(project, [("scene-0.png", encode_image(scene.image))])["scene-0.png"]
    result = [
        rectangle_result(f"box{k + 1}", obj.box, scene.width, scene.height)
        for k, obj in enumerate(scene.objects)
    ]
    ls.add_prediction(task["id"], result, "boxes")
    return task["id"], [obj.caption for obj in scene.objects]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots" / "labeling_prediction.png")
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR, help="checkpoint folder to serve")
    ap.add_argument("--config", default="caption_attributes", help="label_config/<name>.xml")
    ap.add_argument("--seed", type=int, default=8_600_001)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ls-shot-"))
    ls_server = start_label_studio(work / "ls")
    backend = None
    try:
        backend = start_backend(work / "backend", ls_server.url, args.model)
        ls = LabelStudio(ls_server.url)
        xml = (REPO / "label_config" / f"{args.config}.xml").read_text()
        project = ls.create_project("Region captions", xml)
        task, captions = make_task(ls, project, args.seed)
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
