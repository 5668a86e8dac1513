"""Run a real Label Studio (from ``.venv-ls``) and this backend (gunicorn) locally, and drive them.

Used by ``tests/test_e2e_label_studio.py``, ``tests/test_e2e_ls_failures.py``, ``tests/test_load.py``
and the tools beside this module (``capture_payloads``, ``screenshot_labeling``).  Everything binds to
127.0.0.1; Label Studio runs headless with a temp data dir and a fixed legacy token (protocol
reference §6).  The REST calls are plain ``requests`` with ``Authorization: Token``.

A fresh Label Studio data dir spends minutes in database migrations on a busy machine, so the first
start keeps a copy of the migrated database (admin user and token only, no project) as a template
(``LS_TEMPLATE_DIR``, default ``$TMPDIR/roi-ls-template-<uid>/<Label Studio version>``) and later
starts begin from a copy of it: every start still gets its own data dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

__all__ = [
    "LS_PASSWORD",
    "LS_TOKEN",
    "LS_USER",
    "LS_VENV",
    "LabelStudio",
    "Server",
    "ensure_ls_venv",
    "free_port",
    "start_backend",
    "start_label_studio",
    "wait_http",
]

REPO = Path(__file__).resolve().parents[2]
LS_VENV = REPO / ".venv-ls"
LS_USER = "admin@example.com"
LS_PASSWORD = "admin12345"
LS_TOKEN = "0123456789abcdef0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ls_venv() -> Path:
    """``.venv-ls/bin/label-studio``, creating the virtualenv with the setup script if needed."""
    exe = LS_VENV / "bin" / "label-studio"
    if not exe.exists() or not (LS_VENV / "bin" / "python").exists():
        subprocess.run(["bash", str(REPO / "scripts" / "setup_label_studio.sh")], check=True, cwd=REPO)
    return exe


@dataclass
class Server:
    """A child process (own process group) with its base URL and log file."""

    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON lines of the log (the backend's own log records; other lines are skipped)."""
        records = []
        for line in self.log.read_text(errors="replace").splitlines() if self.log.exists() else []:
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records


def _spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_http(
    url: str, server: Server, timeout: float, ok=lambda r: r.status_code == 200
) -> requests.Response:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.proc.args[0]} exited ({server.proc.returncode}):\n{server.log_tail()}"
            )
        try:
            resp = requests.get(url, timeout=2)
            if ok(resp):
                return resp
            last = resp.status_code
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s (last: {last}):\n{server.log_tail()}")


def _template_dir() -> Path:
    """Where the migrated-database template of this Label Studio version lives."""
    versions = sorted(LS_VENV.glob("lib/python*/site-packages/label_studio-*.dist-info"))
    version = versions[-1].name.removesuffix(".dist-info").split("-", 1)[1] if versions else "unknown"
    root = os.environ.get("LS_TEMPLATE_DIR") or Path(tempfile.gettempdir()) / f"roi-ls-template-{os.getuid()}"
    return Path(root) / version


def _seed_data_dir(data_dir: Path) -> bool:
    """Copy the template database into an empty ``data_dir``; ``False`` when there is no template."""
    template = _template_dir()
    if not (template / "label_studio.sqlite3").exists() or (data_dir / "label_studio.sqlite3").exists():
        return False
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("label_studio.sqlite3", ".env"):
        if (template / name).exists():
            shutil.copy2(template / name, data_dir / name)
    return True


def _save_template(data_dir: Path) -> None:
    """Keep a consistent copy (sqlite backup API) of a just-started, empty Label Studio database."""
    template = _template_dir()
    if template.exists():
        return
    staging = template.parent / f".{template.name}.{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    with (
        sqlite3.connect(data_dir / "label_studio.sqlite3") as src,
        sqlite3.connect(staging / "label_studio.sqlite3") as dst,
    ):
        src.backup(dst)
    if (data_dir / ".env").exists():
        shutil.copy2(data_dir / ".env", staging / ".env")
    try:
        staging.rename(template)  # atomic: a concurrent first start loses the race harmlessly
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def start_label_studio(
    workdir: Path, port: int | None = None, timeout: float = 900, template: bool = True
) -> Server:
    """Start Label Studio headless on 127.0.0.1 with a fresh data dir (protocol reference §6),
    seeded from the migrated template when ``template`` (see the module docstring)."""
    exe = ensure_ls_venv()
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    seeded = template and _seed_data_dir(workdir / "ls-data")
    env = {
        "PATH": f"{LS_VENV / 'bin'}:/usr/bin:/bin",
        "HOME": str(workdir),
        "LABEL_STUDIO_BASE_DATA_DIR": str(workdir / "ls-data"),
        "LABEL_STUDIO_USERNAME": LS_USER,
        "LABEL_STUDIO_PASSWORD": LS_PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": LS_TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "COLLECT_ANALYTICS": "false",
        "ML_TIMEOUT_PREDICT": "300",
    }
    cmd = [str(exe), "start", "--no-browser", "--port", str(port), "--internal-host", "127.0.0.1"]
    server = Server(
        _spawn(cmd + ["--log-level", "INFO"], env, workdir / "label-studio.log", workdir),
        "",
        workdir / "label-studio.log",
    )
    server.url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{server.url}/health", server, timeout)
    except BaseException:
        server.stop()
        raise
    if template and not seeded:
        _save_template(workdir / "ls-data")
    return server


def start_backend(
    workdir: Path,
    ls_url: str,
    default_model: Path,
    port: int | None = None,
    timeout: float = 180,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Start this backend under gunicorn (1 worker, 4 threads) and wait until its model is loaded."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")},
        "MODEL_DIR": str(workdir / "models"),
        "DEFAULT_MODEL": str(default_model),
        "DATA_DIR": str(workdir / "data"),
        "LABEL_STUDIO_URL": ls_url,
        "LABEL_STUDIO_API_KEY": LS_TOKEN,
        "TRAIN_MIN_CORRECTIONS": "1000000",  # no fine-tuning jobs from e2e annotations
        "REDIS_URL": "redis://127.0.0.1:1/0",  # nothing listens there: the backend must cope
        "OMP_NUM_THREADS": "2",
        **(extra_env or {}),
    }
    cmd = [
        str(REPO / ".venv" / "bin" / "gunicorn"),
        "-w", "1", "--threads", "4", "--timeout", "300",
        "-b", f"127.0.0.1:{port}", "backend.wsgi:app",
    ]  # fmt: skip
    server = Server(
        _spawn(cmd, env, workdir / "backend.log", REPO), f"http://127.0.0.1:{port}", workdir / "backend.log"
    )
    try:
        wait_http(f"{server.url}/health", server, timeout, ok=lambda r: r.ok and r.json().get("loaded"))
    except BaseException:
        server.stop()
        raise
    return server


class LabelStudio:
    """The few Label Studio REST calls the e2e test and the screenshot need."""

    def __init__(self, url: str, token: str = LS_TOKEN) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, timeout: float = 60, **kw: Any) -> Any:
        resp = self.session.request(method, f"{self.url}{path}", timeout=timeout, **kw)
        if resp.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {resp.status_code}: {resp.text[:1000]}")
        return resp.json() if resp.content else None

    def create_project(self, title: str, label_config: str) -> int:
        return self.call("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]

    def upload_images(self, project: int, files: Iterable[tuple[str, bytes]]) -> dict[str, dict]:
        """Multipart import (one task per image) -> ``{file name: task}``.

        Label Studio stores uploads as ``/data/upload/<project>/<uuid8>-<name>``."""
        files = list(files)
        multipart = [(f"file{i}", (name, data, "image/png")) for i, (name, data) in enumerate(files)]
        self.call("POST", f"/api/projects/{project}/import", files=multipart)
        out = {}
        for task in self.tasks(project):
            image = task["data"]["image"]
            out[
                next(name for name, _ in files if image.endswith(f"-{name}") or image.endswith(f"/{name}"))
            ] = task
        return out

    def tasks(self, project: int) -> list[dict]:
        data = self.call("GET", f"/api/tasks?project={project}&page_size=1000&fields=all")
        return data["tasks"] if isinstance(data, dict) else data

    def task(self, task_id: int) -> dict:
        return self.call("GET", f"/api/tasks/{task_id}")

    def add_prediction(self, task: int, result: list[dict], model_version: str, score: float = 1.0) -> dict:
        body = {"task": task, "result": result, "model_version": model_version, "score": score}
        return self.call("POST", "/api/predictions", json=body)

    def connect_backend(self, project: int, url: str, title: str = "roi-backend") -> dict:
        body = {"project": project, "url": url, "title": title, "is_interactive": True}
        return self.call("POST", "/api/ml", json=body)

    def try_connect_backend(self, project: int, url: str, title: str = "roi-backend") -> requests.Response:
        """Connecting as *Settings -> Model -> Connect model* does; the answer as Label Studio gives it
        (a refused ``/setup`` is a 400 whose text is all its user sees)."""
        body = {"project": project, "url": url, "title": title, "is_interactive": True}
        return self.session.post(f"{self.url}/api/ml", json=body, timeout=60)

    def import_tasks(self, project: int, data: list[dict[str, Any]]) -> list[dict]:
        """JSON import of one task per ``data`` object -> the project's tasks, in id order."""
        self.call("POST", f"/api/projects/{project}/import", json=data)
        return sorted(self.tasks(project), key=lambda t: t["id"])

    def create_draft(self, task: int, result: list[dict]) -> dict:
        """A draft of the token's user (what the labeling page saves before *Submit*)."""
        return self.call("POST", f"/api/tasks/{task}/drafts", json={"result": result, "lead_time": 1.0})

    def retrieve_predictions(self, project: int, timeout: float = 600) -> Any:
        return self.call(
            "POST",
            f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
            json={"selectedItems": {"all": True, "excluded": []}},
            timeout=timeout,
        )

    def predictions(self, project: int) -> list[dict]:
        return self.call("GET", f"/api/predictions?project={project}")

    def interactive(self, ml_backend: int, task: int, context: dict, timeout: float = 120) -> dict:
        return self.call(
            "POST",
            f"/api/ml/{ml_backend}/interactive-annotating",
            json={"task": task, "context": context},
            timeout=timeout,
        )

    def create_annotation(self, task: int, result: list[dict]) -> dict:
        return self.call("POST", f"/api/tasks/{task}/annotations", json={"result": result, "lead_time": 3.2})

    def update_project(self, project: int, **fields: Any) -> dict:
        return self.call("PATCH", f"/api/projects/{project}", json=fields)
