"""Where the backend listens comes from the settings (issue 15, item 9): ``HOST``, ``PORT``,
``WEB_WORKERS``, ``WEB_THREADS`` are parsed and checked like every setting, ``scripts/serve.sh`` and
docker-compose start gunicorn through ``backend.gunicorn_conf``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from backend.settings import Settings, SettingsError, bind_address
from tests.test_packaging import compose_config
from tools.ls.harness import free_port

REPO = Path(__file__).resolve().parent.parent


def test_host_and_port_parse_and_bad_values_name_the_variable():
    s = Settings.from_env({"HOST": "0.0.0.0", "PORT": "9191", "WEB_WORKERS": "2", "WEB_THREADS": "8"})
    assert (s.host, s.port, s.web_workers, s.web_threads) == ("0.0.0.0", 9191, 2, 8)
    assert bind_address(s) == "0.0.0.0:9191"
    assert bind_address(Settings.from_env({"HOST": "::1"})) == "[::1]:9090"
    assert bind_address(Settings.from_env({"HOST": "backend"})) == "backend:9090"
    assert bind_address(Settings()) == "127.0.0.1:9090", "only this machine unless HOST says otherwise"
    bad = {
        "PORT": [("0", "PORT must be between 1 and 65535"), ("70000", "PORT must be between 1 and 65535"),
                 ("http", "PORT='http'")],
        "HOST": [("bad host", "HOST must be an IP address or a host name"),
                 ("-x", "HOST must be an IP address or a host name")],
        "WEB_WORKERS": [("0", "WEB_WORKERS must be at least 1")],
        "WEB_THREADS": [("0", "WEB_THREADS must be at least 1")],
    }  # fmt: skip
    for name, cases in bad.items():
        for value, message in cases:
            with pytest.raises(SettingsError, match=re.escape(message)):
                Settings.from_env({name: value})


def _env(**extra: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {**{k: v for k, v in os.environ.items() if k in keep}, **extra}


def test_gunicorn_config_reads_the_settings():
    code = "import backend.gunicorn_conf as c; print(c.bind, c.workers, c.threads, c.timeout)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
        env=_env(HOST="::", PORT="9292", WEB_WORKERS="3", WEB_THREADS="2"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['[::]:9292']", "3", "2", "120"]


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) with a listening TCP socket on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_serve_sh_listens_on_host_and_port(tmp_path, tiny_checkpoint):
    port = free_port()
    env = _env(
        HOST="127.0.0.1", PORT=str(port), MODEL_DIR=str(tmp_path / "models"), DATA_DIR=str(tmp_path / "data"),
        DEFAULT_MODEL=str(tiny_checkpoint), REDIS_URL="redis://127.0.0.1:1/0", OMP_NUM_THREADS="1",
    )  # fmt: skip
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        ["bash", "scripts/serve.sh"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        answered = None
        while answered is None and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                answered = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
            except requests.RequestException:
                time.sleep(0.2)
        assert answered in (200, 503), (tmp_path / "serve.log").read_text()[-3000:]
        assert _listening(port) == {"0100007F"}, "127.0.0.1 only (little-endian hex)"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_serve_sh_refuses_a_bad_port_by_name(tmp_path):
    out = subprocess.run(
        ["bash", "scripts/serve.sh"], cwd=REPO, env=_env(PORT="99999"), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert "PORT must be between 1 and 65535, got 99999" in out.stdout + out.stderr


def test_compose_backend_listens_inside_its_container_whatever_env_says(tmp_path):
    import yaml

    rendered = yaml.safe_load(compose_config(tmp_path, "docker-compose.yml"))
    backend = rendered["services"]["backend"]
    assert backend["command"] == ["gunicorn", "--config", "python:backend.gunicorn_conf", "backend.wsgi:app"]
    assert (backend["environment"]["HOST"], str(backend["environment"]["PORT"])) == ("0.0.0.0", "9090")
    assert backend["environment"]["MODEL_DIR"] == "/data/models"  # the shared settings are kept
    # PORT/HOST in .env (meant for serve.sh) do not move the container's port away from the mapping.
    (tmp_path / "other").mkdir()
    env_text = (REPO / ".env.example").read_text() + "PORT=9191\nHOST=127.0.0.1\n"
    backend = yaml.safe_load(_compose_with_env(tmp_path / "other", env_text))["services"]["backend"]
    assert (backend["environment"]["HOST"], str(backend["environment"]["PORT"])) == ("0.0.0.0", "9090")
    assert backend["ports"][0]["target"] == 9090


def _compose_with_env(folder: Path, env_text: str) -> str:
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(REPO / name, folder / name)
    (folder / ".env").write_text(env_text)
    proc = subprocess.run(
        [shutil.which("docker-compose") or "docker-compose", "config"], cwd=folder, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_model_dtype_setting_loads_the_weights_in_that_dtype(tiny_checkpoint):
    import torch

    from backend.serving import default_loader

    assert Settings().model_dtype == "auto"
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("auto", torch.float32)):
        model = default_loader(Settings.from_env({"MODEL_DTYPE": name, "DEVICE": "cpu"}))(
            tiny_checkpoint, "x"
        )
        assert {p.dtype for n, p in model.named_parameters() if not n.startswith("region_encoder.roi")} == {
            dtype
        }
    with pytest.raises(SettingsError, match="MODEL_DTYPE must be one of auto, bf16, fp16, fp32"):
        Settings.from_env({"MODEL_DTYPE": "int8"})
