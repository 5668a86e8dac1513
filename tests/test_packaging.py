"""Packaging: docker-compose stack validates, settings parse with clear errors, docs match the code
(the generated settings table in docs/configuration.md, the README's links), and CI runs exactly the
README's commands."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from backend.settings import Settings, SettingsError, env_example, markdown_table

REPO = Path(__file__).resolve().parent.parent
CORE_SERVICES = {"label-studio", "backend", "redis", "worker", "scheduler"}


def compose_config(tmp_path: Path, *files: str) -> str:
    """``docker-compose config`` (Debian's docker-compose; no engine needed) on a copy with
    ``.env`` taken from ``.env.example``."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (scripts/setup.sh installs Debian's package)"
    for name in (*files, "Dockerfile"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    args = [exe]
    for name in files:
        args += ["-f", name]
    proc = subprocess.run([*args, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_compose_stack_validates_with_healthchecks_and_shared_model_volume(tmp_path: Path):
    import yaml  # docker-compose's own dependency is not ours: parse the rendered config with PyYAML

    rendered = yaml.safe_load(compose_config(tmp_path, "docker-compose.yml"))
    services = rendered["services"]
    assert CORE_SERVICES <= set(services)
    for name in CORE_SERVICES:
        assert "healthcheck" in services[name], name
    for name in ("backend", "worker", "scheduler"):
        mounts = [
            v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in services[name]["volumes"]
        ]
        assert any(m.startswith("models:") for m in mounts), (name, mounts)
    assert services["backend"]["command"][0] == "gunicorn"
    assert services["worker"]["command"][-1] == "--no-cron"
    assert services["scheduler"]["command"][-1] == "--cron-only"
    assert services["label-studio"]["image"].startswith("heartexlabs/label-studio")
    assert "monitoring" in services["rq-dashboard"]["profiles"]


def test_compose_gpu_override_validates(tmp_path: Path):
    import yaml

    rendered = yaml.safe_load(compose_config(tmp_path, "docker-compose.yml", "docker-compose.gpu.yml"))
    for name in ("backend", "worker"):
        devices = rendered["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


def test_settings_parse_types_and_reject_bad_values_clearly():
    s = Settings.from_env({"MAX_REGIONS": "12", "ALLOW_PRIVATE_URLS": "yes", "TRAIN_LR": "1e-4",
                           "REDIS_URL": "redis://:secret@redis:6379/2"})  # fmt: skip
    assert (s.max_regions, s.allow_private_urls, s.train_lr) == (12, True, 1e-4)
    assert s.redis_url == "redis://:secret@redis:6379/2"
    bad = {
        "MAX_REGIONS": ("many", "MAX_REGIONS='many'"),
        "ALLOW_PRIVATE_URLS": ("perhaps", "expected true/false"),
        "TRAIN_STEPS": ("-5", "must not be negative"),
        "REPLAY_FRACTION": ("1.5", "REPLAY_FRACTION must be in [0, 1)"),
        "LABEL_STUDIO_URL": ("label-studio:8080", "must start with http://"),
        "BASIC_AUTH_USER": ("alice", "must be set together"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(SettingsError, match=re.escape(message)):
            Settings.from_env({name: value})


def test_secrets_are_redacted():
    s = Settings.from_env(
        {"LABEL_STUDIO_API_KEY": "tok-123", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "pw"}
    )
    text = str(s.redacted())
    assert "tok-123" not in text and "pw'" not in text


def test_env_example_and_configuration_table_match_the_settings_module():
    assert (REPO / ".env.example").read_text() == env_example(), (
        "regenerate: python -m backend.settings --env-example"
    )
    assert markdown_table() in (REPO / "docs" / "configuration.md").read_text(), (
        "docs/configuration.md settings table is out of date: python -m tools.settings_doc"
    )


def test_readme_is_a_front_page_whose_links_resolve():
    """The README stays short (details live in docs/) and every relative link in it and in docs/
    names a file that exists (and a heading of it, for a link with an anchor)."""
    readme = REPO / "README.md"
    assert readme.stat().st_size <= 10_000, (
        f"README.md is {readme.stat().st_size} bytes; move details to docs/"
    )
    pages = [readme, *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([^)]*))?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            assert (page.parent / target).exists(), (page.name, target)
            if anchor:
                assert anchor in heading_anchors(page.parent / target), (page.name, target, anchor)


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the Markdown headings of ``page``."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_ci_runs_exactly_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    ci = [line for line in ci if line and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    for marker in ("setup", "test"):
        block = re.search(rf"<!-- {marker}-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
        assert block, f"README has no marked {marker} command"
        assert block.group(1).strip() in ci, (marker, block.group(1), ci)
