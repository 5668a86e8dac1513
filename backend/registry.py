"""Model registry: immutable version folders and an atomically switched ``current`` pointer.

Layout under ``MODEL_DIR``::

    versions/<version>/     checkpoint folder (model.checkpoint), never modified once committed
    staging/<tmp>/          a version being written; moved into versions/ by one rename
    current.json            {"version": "...", "history": [...]}; replaced with os.replace

A killed writer leaves at most a stray staging folder, never a half-written version.
``python -m backend.registry list|promote VERSION|rollback`` manages it from the shell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import read_metadata

CURRENT = "current.json"


class RegistryError(RuntimeError):
    pass


@dataclass
class VersionInfo:
    version: str
    path: Path
    metadata: dict
    current: bool


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder, hard-linking files where the filesystem allows."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


class ModelRegistry:
    def __init__(self, root: Path, default_model: Path | None = None) -> None:
        self.root = Path(root)
        self.default_model = default_model
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / "staging"

    # ------------------------------------------------------------------ pointer
    def _read_pointer(self) -> dict:
        path = self.root / CURRENT
        if not path.exists():
            return {}
        return json.loads(path.read_text())

    def _write_pointer(self, data: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".current-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / CURRENT)

    def ensure_initialized(self) -> str:
        """Make sure a current version exists; seed it from the embedded default if empty."""
        pointer = self._read_pointer()
        if pointer.get("version") and (self.versions_dir / pointer["version"]).is_dir():
            return pointer["version"]
        if self.default_model is None or not (self.default_model / "config.json").exists():
            raise RegistryError(f"registry {self.root} is empty and no default model is available")
        version = read_metadata(self.default_model).get("version", "1.0.0")
        if not (self.versions_dir / version).is_dir():
            try:
                self.commit_folder(self.default_model, version, copy=True)
            except RegistryError:
                # Another thread or process (gunicorn worker, RQ worker) seeded it at the same time.
                if not (self.versions_dir / version).is_dir():
                    raise
        self.promote(version, reason="initial default model")
        return version

    def current(self) -> str:
        pointer = self._read_pointer()
        if not pointer.get("version"):
            return self.ensure_initialized()
        return pointer["version"]

    def current_path(self) -> Path:
        return self.path(self.current())

    def path(self, version: str) -> Path:
        p = self.versions_dir / version
        if not p.is_dir():
            raise RegistryError(f"unknown model version {version!r}; known: {self.version_names()}")
        return p

    # ------------------------------------------------------------------ versions
    def version_names(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted((p.name for p in self.versions_dir.iterdir() if p.is_dir()), key=_version_key)

    def versions(self) -> list[VersionInfo]:
        cur = self._read_pointer().get("version")
        return [
            VersionInfo(v, self.versions_dir / v, read_metadata(self.versions_dir / v), v == cur)
            for v in self.version_names()
        ]

    def next_version(self, parent: str) -> str:
        """Bump the minor number past every existing version of the same major."""
        major = parent.split(".")[0]
        minors = [
            int(v.split(".")[1])
            for v in self.version_names()
            if v.split(".")[0] == major and v.count(".") >= 1 and v.split(".")[1].isdigit()
        ]
        return f"{major}.{max(minors, default=0) + 1}.0"

    def staging(self) -> Path:
        """A fresh folder to write a candidate into (then :meth:`commit_folder`)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.staging_dir, prefix="cand-"))

    def commit_folder(self, folder: Path, version: str, copy: bool = False) -> Path:
        """Make ``folder`` the immutable version ``version`` (one rename; copy first if asked)."""
        target = self.versions_dir / version
        if target.exists():
            raise RegistryError(f"version {version} already exists")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        if copy:
            tmp = self.staging()
            shutil.rmtree(tmp)
            _link_tree(folder, tmp)
            folder = tmp
        meta_path = folder / "version.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta["version"] = version
        # Write a new file, never into the old one: it may be a hard link to the source folder.
        tmp_meta = meta_path.with_name(".version.json.tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp_meta, meta_path)
        try:
            os.replace(folder, target)
        except OSError as exc:  # the target appeared meanwhile (a concurrent commit of that version)
            if copy:
                shutil.rmtree(folder, ignore_errors=True)
            raise RegistryError(f"version {version} already exists ({exc.strerror})") from None
        return target

    def promote(self, version: str, reason: str = "") -> None:
        self.path(version)
        pointer = self._read_pointer()
        history = pointer.get("history", [])
        if pointer.get("version") and pointer["version"] != version:
            history.append(pointer["version"])
        self._write_pointer(
            {"version": version, "history": history[-50:], "updated": time.time(), "reason": reason}
        )

    def rollback(self) -> str:
        """Return to the previously current version."""
        pointer = self._read_pointer()
        history = pointer.get("history", [])
        if not history:
            raise RegistryError("no earlier version to roll back to")
        previous = history.pop()
        self.path(previous)
        self._write_pointer(
            {
                "version": previous,
                "history": history,
                "updated": time.time(),
                "reason": f"rollback from {pointer.get('version')}",
            }
        )
        return previous

    def clean_staging(self) -> int:
        """Remove leftovers of killed writers; returns how many were removed."""
        if not self.staging_dir.is_dir():
            return 0
        n = 0
        for p in self.staging_dir.iterdir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        return n


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("."))


def main(argv: list[str] | None = None) -> int:
    from backend.settings import get_settings

    s = get_settings()
    ap = argparse.ArgumentParser(description="model registry")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    pr = sub.add_parser("promote")
    pr.add_argument("version")
    sub.add_parser("rollback")
    args = ap.parse_args(argv)
    reg = ModelRegistry(s.model_dir, s.default_model)
    reg.ensure_initialized()
    if args.cmd == "promote":
        reg.promote(args.version, reason="cli")
    elif args.cmd == "rollback":
        print(f"rolled back to {reg.rollback()}")
    for info in reg.versions():
        m = info.metadata
        mark = "*" if info.current else " "
        print(
            f"{mark} {info.version:10s} parent={m.get('parent')!s:10s} created={m.get('created', '')} "
            f"metrics={json.dumps(m.get('metrics', {}))}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
