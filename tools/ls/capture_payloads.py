"""Record the requests a real Label Studio sends to this backend, as test fixtures.

Starts Label Studio (``.venv-ls``) and this backend in-process behind a recording WSGI middleware,
then drives Label Studio through every path that calls a backend: connect (``/health``,
``/setup``), *Retrieve predictions* (batch ``/predict``), the interactive smart tool (``/predict``
with ``params.context``), annotation create / update / delete and *Start Training* (``/webhook``),
and the model-version list (``/versions``).  Each request body is written to
``tests/fixtures/ls-1.23.2/NN-<path>-<what>.json`` with the uploaded images beside them, and the
tests replay them (``tests/test_ls_fixtures.py``)::

    .venv/bin/python -m tools.ls.capture_payloads [--out tests/fixtures/ls-1.23.2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

from model.checkpoint import DEFAULT_DIR
from model.inference.image_input import encode_image
from tools.ls.harness import LS_TOKEN, LabelStudio, free_port, start_label_studio
from tools.ls.payloads import rectangle_result, region_items
from toyworld.scenes import Scene, SceneSpec, make_scene

CONFIG = "caption_attributes"
SEED = 9_100_000

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """WSGI middleware that keeps every request body before the app sees it."""

    def __init__(self, app) -> None:
        self.app = app
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        with self.lock:
            self.requests.append(
                {
                    "method": environ["REQUEST_METHOD"],
                    "path": environ.get("PATH_INFO", ""),
                    "query": environ.get("QUERY_STRING", ""),
                    "content_type": environ.get("CONTENT_TYPE", ""),
                    "body": body.decode("utf-8", errors="replace"),
                }
            )
        return self.app(environ, start_response)


def box_item(rid: str, box, scene: Scene) -> dict:
    """The rectangle result of a pixel ``box`` on ``scene``."""
    return rectangle_result(rid, box, scene.width, scene.height)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "ls-1.23.2")
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ls-capture-"))
    ls_server = start_label_studio(work / "ls")
    try:
        os.environ.update({
            "MODEL_DIR": str(work / "models"), "DATA_DIR": str(work / "data"),
            "DEFAULT_MODEL": str(args.model),
            "LABEL_STUDIO_URL": ls_server.url, "LABEL_STUDIO_API_KEY": LS_TOKEN,
            "REDIS_URL": "redis://127.0.0.1:1/0", "TRAIN_MIN_CORRECTIONS": "1000000",
        })  # fmt: skip
        from werkzeug.serving import make_server

        from backend.app import create_app

        recorder = Recorder(create_app().wsgi_app)
        port = free_port()
        httpd = make_server("127.0.0.1", port, recorder, threaded=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        backend_url = f"http://127.0.0.1:{port}"
        ls = LabelStudio(ls_server.url)
        xml = (REPO / "label_config" / f"{CONFIG}.xml").read_text()
        project = ls.create_project("capture", xml)
        scenes = [
            make_scene(random.Random(SEED + i), SceneSpec(min_objects=3, max_objects=3)) for i in range(2)
        ]
        files = [(f"scene-{i}.png", encode_image(s.image)) for i, s in enumerate(scenes)]
        tasks = ls.upload_images(project, files)
        ids = {}
        for i, scene in enumerate(scenes):
            task = tasks[f"scene-{i}.png"]
            ids[i] = task["id"]
            result = [box_item(f"s{i}b{k}", o.box, scene) for k, o in enumerate(scene.objects)]
            ls.add_prediction(task["id"], result, "boxes")
        ml = ls.connect_backend(project, backend_url)
        while not any(r["path"] == "/setup" for r in recorder.requests):
            time.sleep(0.2)
        ls.retrieve_predictions(project)
        scene = scenes[0]
        ls.interactive(
            ml["id"],
            ids[0],
            {"result": [{**box_item("smartBox1", scene.objects[1].box, scene), "origin": "manual"}]},
        )
        result = [
            item
            for k, o in enumerate(scene.objects)
            for item in region_items(f"s0b{k}", o.box, scene.width, scene.height, caption=o.caption)
        ]
        annotation = ls.create_annotation(ids[0], result)
        result[-1]["value"]["text"] = ["a corrected caption"]
        ls.call("PATCH", f"/api/annotations/{annotation['id']}", json={"result": result})
        ls.call("DELETE", f"/api/annotations/{annotation['id']}")
        ls.call("POST", f"/api/ml/{ml['id']}/train", json={})
        ls.call("GET", f"/api/ml/{ml['id']}/versions")
        time.sleep(1.0)
        httpd.shutdown()
    finally:
        ls_server.stop()

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*"):
        old.unlink()
    for i, scene in enumerate(scenes):
        name = Path(tasks[f"scene-{i}.png"]["data"]["image"]).name
        (args.out / name).write_bytes(encode_image(scene.image))
    kept = 0
    for req in recorder.requests:
        body = json.loads(req["body"]) if req["body"].strip() else None
        what = body.get("action", "") if isinstance(body, dict) else ""
        if req["path"] == "/predict" and isinstance(body, dict):
            what = "interactive" if (body.get("params") or {}).get("context") else "batch"
        suffix = f"-{what.lower()}" if what else ""
        name = f"{kept:02d}-{req['method'].lower()}{req['path'].replace('/', '-')}{suffix}.json"
        (args.out / name).write_text(json.dumps({**req, "body": body}, indent=1) + "\n")
        kept += 1
    truth = {
        str(ids[i]): {"image": tasks[f"scene-{i}.png"]["data"]["image"],
                      "objects": [{"caption": o.caption, "color": o.color, "shape": o.shape, "size": o.size,
                                   "box": list(o.box)} for o in s.objects]}
        for i, s in enumerate(scenes)
    }  # fmt: skip
    (args.out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    print(f"{kept} requests written to {args.out}")
    for req in recorder.requests:
        print(req["method"], req["path"], len(req["body"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
