"""Peak RSS of the backend process while it answers one ``/predict`` with many tasks.

For every size, a fresh backend process (the Flask app on werkzeug's server, the embedded default
model, ``ALLOW_PRIVATE_URLS`` on) is started; this process serves the tasks' images from a loopback
HTTP server, warms the backend up with a one-task request, resets the backend's peak-RSS counter
(``/proc/<pid>/clear_refs``), sends the big request and reads ``VmHWM`` / ``VmRSS`` from
``/proc/<pid>/status``.  Linux only.

    .venv/bin/python scripts/bench_predict_memory.py                 # 100 / 600 / 2,000 distinct images
    .venv/bin/python scripts/bench_predict_memory.py --same-image    # every task shows one image
    .venv/bin/python scripts/bench_predict_memory.py --sizes 50 --env PREDICT_CHUNK_TASKS=8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
CONFIG_XML = (REPO / "label_config" / "caption_attributes.xml").read_text()
IMAGE_SIZE = (160, 120)
BOXES = [[10, 10, 70, 60], [80, 40, 150, 110]]  # pixel boxes of every task


def image_png(index: int) -> bytes:
    """A small PNG that differs for every index (so every task is a distinct image)."""
    rgb = ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)
    image = Image.new("RGB", IMAGE_SIZE, rgb)
    draw = ImageDraw.Draw(image)
    x, y = 5 + index % 90, 5 + (index // 90) % 60
    draw.ellipse((x, y, x + 50, y + 40), fill=(255 - rgb[0], 255 - rgb[1], 255 - rgb[2]))
    draw.text((2, 100), str(index), fill=(0, 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ImageHandler(BaseHTTPRequestHandler):
    """``GET /img/<index>.png``."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        try:
            index = int(self.path.rsplit("/", 1)[1].removesuffix(".png"))
        except ValueError:
            self.send_error(404)
            return
        body = image_png(index)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def payload(indexes: list[int], image_base: str) -> dict:
    tasks = [
        {"id": n + 1, "data": {"image": f"{image_base}/img/{i}.png", "boxes": BOXES}}
        for n, i in enumerate(indexes)
    ]
    return {"tasks": tasks, "label_config": CONFIG_XML, "project": "1.1", "params": {"context": None}}


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def serve(port_file: str) -> None:
    """Child: the backend app on a loopback port (written to ``port_file``)."""
    from werkzeug.serving import make_server

    from backend.app import create_app

    server = make_server("127.0.0.1", 0, create_app(), threaded=False)
    Path(port_file).write_text(str(server.server_port))
    server.serve_forever()


def measure(size: int, same_image: bool, extra_env: dict[str, str], image_base: str) -> dict:
    """Start a backend, send one /predict with ``size`` tasks, return its memory figures."""
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        env = {
            **os.environ,
            "MODEL_DIR": f"{tmp}/models",
            "DATA_DIR": f"{tmp}/data",
            "ALLOW_PRIVATE_URLS": "true",
            "MAX_TASKS_PER_REQUEST": str(max(size, 1)),
            "MAX_BODY_MB": "64",
            "LOG_LEVEL": "WARNING",
            "REDIS_URL": "redis://127.0.0.1:1/0",  # /predict needs no Redis
            **extra_env,
        }
        port_file, log_file = Path(tmp) / "port", Path(tmp) / "backend.log"
        with log_file.open("wb") as log:  # a file, not a pipe: a pipe nobody reads blocks the backend
            child = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port_file)], env=env, cwd=REPO,
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not port_file.exists() or not port_file.read_text():
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"backend did not start: {log_file.read_text()[-2000:]}")
                time.sleep(0.1)
            base = f"http://127.0.0.1:{port_file.read_text()}"
            while not requests.get(f"{base}/health", timeout=30).json().get("loaded"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"model did not load: {log_file.read_text()[-2000:]}")
                time.sleep(0.2)
            warm = requests.post(f"{base}/predict", json=payload([10**6], image_base), timeout=600)
            warm.raise_for_status()
            Path(f"/proc/{child.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            before = proc_status(child.pid)
            indexes = [0] * size if same_image else list(range(size))
            started = time.perf_counter()
            resp = requests.post(f"{base}/predict", json=payload(indexes, image_base), timeout=3600)
            seconds = time.perf_counter() - started
            after = proc_status(child.pid)
            return {
                "tasks": size,
                "distinct_images": 1 if same_image else size,
                "status": resp.status_code,
                "rss_before_mib": before["VmRSS"],
                "peak_rss_mib": after["VmHWM"],
                "peak_minus_before_mib": after["VmHWM"] - before["VmRSS"],
                "rss_after_mib": after["VmRSS"],
                "seconds": round(seconds, 1),
            }
        finally:
            child.terminate()
            child.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 600, 2000])
    parser.add_argument("--same-image", action="store_true", help="every task shows the same image")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the backend process")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--serve", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    extra = dict(item.split("=", 1) for item in args.env)
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    image_base = f"http://127.0.0.1:{server.server_port}"
    rows = [measure(size, args.same_image, extra, image_base) for size in args.sizes]
    server.shutdown()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    columns = ["tasks", "distinct images", "status", "RSS before (MiB)", "peak RSS (MiB)"]
    columns += ["peak - before (MiB)", "seconds"]
    print("| " + " | ".join(columns) + " |")
    print("|---:" * len(columns) + "|")
    for r in rows:
        print(
            f"| {r['tasks']:,} | {r['distinct_images']:,} | {r['status']} | {r['rss_before_mib']:,} | "
            f"{r['peak_rss_mib']:,} | {r['peak_minus_before_mib']:,} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
