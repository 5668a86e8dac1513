"""Model registry: immutable, verified version folders and an atomically switched ``current`` pointer.

Layout under ``MODEL_DIR``::

    versions/<version>/     checkpoint folder (model.checkpoint) with its manifest.json; files read-only
    staging/<tmp>/          a version being written; moved into versions/ by one rename
    checks/<version>.json   outcome of the last load check of a version: cleared to serve, or bad (why)
    checks/<version>.lock   held while a version is checked (one check at a time across processes)
    current.json            {"version": "...", "history": [...]}; replaced with os.replace

Version names are ``MAJOR.MINOR.PATCH`` in ASCII digits; any other name is refused before it reaches
the filesystem, and a version must be a real folder inside ``versions/`` (not a symlink).  A commit
records the SHA-256 of every file (``manifest.json``) and makes the files read-only; the seed
version is a copy of the embedded default, never a hard link to the tracked files.

A version is *checked* before it serves: manifest and headers, a memory estimate from its config,
a load, a smoke forward (:func:`run_check`).  The CLI runs the check in its own process; serving
workers run it in a child process (:meth:`ModelRegistry.check_in_child`) so that a version whose
load crashes or exhausts memory takes down the child, not the worker.  The outcome is recorded in
``checks/``: a bad version is not tried again until a later check clears it.

A killed writer leaves at most a stray staging folder, never a half-written version.
``python -m backend.registry list|promote VERSION|rollback|check VERSION|seal VERSION`` manages it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.checkpoint import (
    MANIFEST,
    CheckpointError,
    check_memory,
    load_model,
    read_metadata,
    smoke_check,
    verify_checkpoint,
    write_manifest,
)

__all__ = [
    "CHECK_TIMEOUT",
    "ModelRegistry",
    "RegistryError",
    "VersionInfo",
    "check_version_name",
    "main",
    "run_check",
]

CURRENT = "current.json"
VERSION_RE = re.compile(r"[0-9]{1,9}\.[0-9]{1,9}\.[0-9]{1,9}")
CHECK_TIMEOUT = 900.0  # seconds a child check may take (a large model on a busy CPU)


class RegistryError(RuntimeError):
    pass


@dataclass
class VersionInfo:
    version: str
    path: Path
    metadata: dict
    current: bool
    status: str = ""  # "cleared", "bad: <reason>" or "" (not checked yet)


def check_version_name(version: object) -> str:
    """``version`` if it is ``MAJOR.MINOR.PATCH`` (ASCII digits), else :class:`RegistryError`."""
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise RegistryError(f"invalid version name {version!r}: expected MAJOR.MINOR.PATCH, e.g. 1.2.0")
    return version


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to a new file beside ``path``, then rename it over ``path`` (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from a reader running as another user
    os.replace(tmp, path)


def _refuse_symlinks(folder: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            if (Path(dirpath) / name).is_symlink():
                rel = (Path(dirpath) / name).relative_to(folder)
                raise RegistryError(f"{folder}: {rel} is a symlink; a version holds only regular files")


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder: new files (never hard links to the source), no symlinks."""
    _refuse_symlinks(src)
    shutil.copytree(src, dst, copy_function=shutil.copy2)


def _make_read_only(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            path.chmod(path.stat().st_mode & ~0o222)


def _unshare(folder: Path) -> None:
    """Replace every file that has other hard links by a copy of its own."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            if path.stat().st_nlink > 1:
                tmp = path.with_name(f".{name}.copy")
                shutil.copy2(path, tmp)
                os.replace(tmp, path)


def run_check(folder: Path, memory_budget: int | None = None) -> dict[str, Any]:
    """Check a version folder in this process: manifest, memory estimate, load on the CPU, smoke
    forward.  Returns figures; any failure is a :class:`CheckpointError`."""
    started = time.monotonic()
    verify_checkpoint(folder)
    estimate = check_memory(folder, memory_budget)
    try:
        model = load_model(folder, device="cpu")
        smoke = smoke_check(model)
    except CheckpointError:
        raise
    except Exception as exc:  # any failure to build or run the model refuses the version
        raise CheckpointError(f"loading {folder} failed: {type(exc).__name__}: {exc}") from exc
    return {
        "parameters": sum(estimate.parameters.values()),
        "estimate_mib": round(estimate.peak_bytes / 2**20, 1),
        "available_mib": round(estimate.available_bytes / 2**20, 1),
        "seconds": round(time.monotonic() - started, 2),
        **smoke,
    }


def _child_main(folder: str, memory_budget: int | None, conn: Any) -> None:
    """Body of the checking child (forked from a serving worker)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        try:
            signal.signal(sig, signal.SIG_DFL)  # the worker's handlers (gunicorn's) are not the child's
        except (ValueError, OSError):
            pass
    try:  # if memory runs out anyway, the kernel picks this process, not a serving worker
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    import torch

    torch.set_num_threads(1)  # the parent's thread pool does not exist in a forked child
    try:
        conn.send({"ok": True, "figures": run_check(Path(folder), memory_budget)})
    except Exception as exc:
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


class ModelRegistry:
    def __init__(self, root: Path, default_model: Path | None = None) -> None:
        self.root = Path(root)
        self.default_model = default_model
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / "staging"
        self.checks_dir = self.root / "checks"

    # ------------------------------------------------------------------ pointer
    def _read_pointer(self) -> dict:
        path = self.root / CURRENT
        if not path.exists():
            return {}
        return json.loads(path.read_text())

    def _write_pointer(self, data: dict) -> None:
        _write_json(self.root / CURRENT, data)

    def ensure_initialized(self) -> str:
        """Make sure a current version exists; seed it from the embedded default if empty."""
        pointer = self._read_pointer()
        if pointer.get("version") and (self.versions_dir / check_version_name(pointer["version"])).is_dir():
            return pointer["version"]
        if self.default_model is None or not (self.default_model / "config.json").exists():
            raise RegistryError(f"registry {self.root} is empty and no default model is available")
        version = self.seed_version()
        if not (self.versions_dir / version).is_dir():
            self._seed(version)
        elif not (self.versions_dir / version / MANIFEST).exists():
            self._seal_seed(version)
        self.promote(version, reason="initial default model")
        return version

    def seed_version(self) -> str:
        """Version name of the embedded default (what an empty registry starts with)."""
        if self.default_model is None:
            raise RegistryError("no default model configured")
        return check_version_name(read_metadata(self.default_model).get("version", "1.0.0"))

    def _seed(self, version: str) -> None:
        assert self.default_model is not None
        if (self.default_model / MANIFEST).exists():
            try:
                verify_checkpoint(self.default_model)
            except CheckpointError as exc:
                raise RegistryError(f"the default model does not match its manifest: {exc}") from None
        try:
            self.commit_folder(self.default_model, version, copy=True)
        except RegistryError:
            # Another thread or process (gunicorn worker, RQ worker) seeded it at the same time.
            if not (self.versions_dir / version).is_dir():
                raise
        self.record_check(version, True, f"copy of the default model {self.default_model}", by="seed")

    def _seal_seed(self, version: str) -> None:
        """A seed committed before versions had manifests (its files may be hard links to the
        default's): sealed as a copy if every file matches the default's manifest."""
        assert self.default_model is not None
        try:
            listed = json.loads((self.default_model / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError):
            return  # nothing to compare with: serving refuses it until `seal` vouches for it
        folder = self.versions_dir / version
        for rel, entry in listed.items():
            path = folder / rel
            if rel == "version.json":
                continue
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                return
        self.seal(version)
        self.record_check(version, True, f"copy of the default model {self.default_model}", by="seed")

    def current(self) -> str:
        pointer = self._read_pointer()
        if not pointer.get("version"):
            return self.ensure_initialized()
        return check_version_name(pointer["version"])

    def current_path(self) -> Path:
        return self.path(self.current())

    def history(self) -> list[str]:
        """Earlier current versions, oldest first (names that are not valid versions left out)."""
        return [
            v
            for v in self._read_pointer().get("history", [])
            if isinstance(v, str) and VERSION_RE.fullmatch(v)
        ]

    def path(self, version: str) -> Path:
        """The folder of ``version``: a real directory inside ``versions/``."""
        p = self.versions_dir / check_version_name(version)
        if p.is_symlink() or (p.exists() and p.resolve().parent != self.versions_dir.resolve()):
            raise RegistryError(f"version {version} leads outside {self.versions_dir}; refused")
        if not p.is_dir():
            raise RegistryError(f"unknown model version {version!r}; known: {self.version_names()}")
        return p

    # ------------------------------------------------------------------ versions
    def version_names(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        names = (
            p.name
            for p in self.versions_dir.iterdir()
            if VERSION_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
        )
        return sorted(names, key=_version_key)

    def versions(self) -> list[VersionInfo]:
        cur = self._read_pointer().get("version")
        infos = []
        for v in self.version_names():
            record = self.check_record(v)
            status = "" if record is None else "cleared" if record["cleared"] else f"bad: {record['reason']}"
            infos.append(
                VersionInfo(v, self.versions_dir / v, read_metadata(self.versions_dir / v), v == cur, status)
            )
        return infos

    def next_version(self, parent: str) -> str:
        """Bump the minor number past every existing version of the same major."""
        major = check_version_name(parent).split(".")[0]
        minors = [int(v.split(".")[1]) for v in self.version_names() if v.split(".")[0] == major]
        return f"{major}.{max(minors, default=0) + 1}.0"

    def staging(self) -> Path:
        """A fresh folder to write a candidate into (then :meth:`commit_folder`)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.staging_dir, prefix="cand-"))

    def commit_folder(self, folder: Path, version: str, copy: bool = False) -> Path:
        """Make ``folder`` the immutable version ``version``: its ``version.json`` names it, a
        manifest records every file's SHA-256, the files become read-only, one rename publishes it
        (``copy``: a copy of ``folder`` is committed, ``folder`` is left as it is)."""
        target = self.versions_dir / check_version_name(version)
        if target.exists() or target.is_symlink():
            raise RegistryError(f"version {version} already exists")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        if copy:
            tmp = self.staging()
            shutil.rmtree(tmp)
            _copy_tree(Path(folder), tmp)
            folder = tmp
        try:
            meta_path = folder / "version.json"
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            meta["version"] = version
            # A new file renamed over the old one, never written into: the old one may be shared.
            _write_json(meta_path, meta)
            write_manifest(folder)
            _make_read_only(folder)
            os.replace(folder, target)
        except CheckpointError as exc:
            if copy:
                shutil.rmtree(folder, ignore_errors=True)
            raise RegistryError(str(exc)) from None
        except OSError as exc:  # the target appeared meanwhile (a concurrent commit of that version)
            if copy:
                shutil.rmtree(folder, ignore_errors=True)
            raise RegistryError(f"version {version} already exists ({exc.strerror})") from None
        return target

    def seal(self, version: str) -> None:
        """Record the present files of a version committed before manifests existed (the operator
        vouches for them): own copies of hard-linked files, a manifest, read-only files."""
        folder = self.path(version)
        if (folder / MANIFEST).exists():
            raise RegistryError(f"version {version} already has a {MANIFEST}; sealing would bless any change")
        _refuse_symlinks(folder)
        _unshare(folder)
        write_manifest(folder)
        _make_read_only(folder)

    def promote(self, version: str, reason: str = "") -> None:
        """Point ``current`` at ``version`` (refused for a version recorded as bad)."""
        self.path(version)
        bad = self.bad_reason(version)
        if bad is not None:
            raise RegistryError(
                f"version {version} is marked bad ({bad}); run `python -m backend.registry check {version}` "
                "once the cause is fixed"
            )
        pointer = self._read_pointer()
        history = pointer.get("history", [])
        if pointer.get("version") and pointer["version"] != version:
            history.append(pointer["version"])
        self._write_pointer(
            {"version": version, "history": history[-50:], "updated": time.time(), "reason": reason}
        )

    def rollback(self) -> str:
        """Return to the most recent earlier version that exists and is not marked bad."""
        pointer = self._read_pointer()
        history = self.history()
        while history:
            previous = history.pop()
            if (self.versions_dir / previous).is_dir() and self.bad_reason(previous) is None:
                break
        else:
            raise RegistryError("no earlier good version to roll back to")
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

    # ------------------------------------------------------------------ checks
    def _manifest_digest(self, version: str) -> str | None:
        try:
            return hashlib.sha256((self.path(version) / MANIFEST).read_bytes()).hexdigest()
        except OSError:
            return None

    def check_record(self, version: str) -> dict | None:
        """The recorded outcome of the last check of ``version`` (None if never checked, or if
        the record was made for other files)."""
        path = self.checks_dir / f"{check_version_name(version)}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("manifest") != self._manifest_digest(version):
            return None
        return record

    def bad_reason(self, version: str) -> str | None:
        """Why ``version`` was refused, if its last check failed."""
        record = self.check_record(version)
        return None if record is None or record.get("cleared") else str(record.get("reason"))

    def is_cleared(self, version: str) -> bool:
        record = self.check_record(version)
        return bool(record and record.get("cleared"))

    def record_check(
        self, version: str, cleared: bool, reason: str, by: str, figures: dict | None = None
    ) -> None:
        """Record a check's outcome (``by``: who checked — ``check``, ``child``, ``seed``, ``serving``)."""
        record = {
            "version": check_version_name(version),
            "cleared": cleared,
            "reason": reason,
            "by": by,
            "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "manifest": self._manifest_digest(version),
            "figures": figures or {},
        }
        _write_json(self.checks_dir / f"{version}.json", record)

    def check_version(self, version: str, memory_budget: int | None = None) -> dict[str, Any]:
        """Check ``version`` in this process (:func:`run_check`) and record the outcome; raises
        :class:`CheckpointError` for a version that must not serve."""
        folder = self.path(version)
        try:
            figures = run_check(folder, memory_budget)
        except CheckpointError as exc:
            self.record_check(version, False, str(exc), by="check")
            raise
        self.record_check(version, True, "passed", by="check", figures=figures)
        return figures

    def check_in_child(
        self, version: str, memory_budget: int | None = None, timeout: float = CHECK_TIMEOUT
    ) -> dict[str, Any]:
        """Check ``version`` in a forked child process unless a record exists, and record the
        outcome: a crash, an out-of-memory kill or a hang ends the child, never the caller.
        One check per version at a time across processes.  Raises :class:`CheckpointError`."""
        folder = self.path(version)
        self.checks_dir.mkdir(parents=True, exist_ok=True)
        with open(self.checks_dir / f"{version}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = self.check_record(version)
            if record is not None:  # another worker checked it while this one waited
                if record["cleared"]:
                    return record.get("figures", {})
                raise CheckpointError(str(record["reason"]))
            # fork: the child has the worker's modules already imported (a fresh interpreter would
            # import torch and transformers first, many seconds on a busy machine)
            ctx = multiprocessing.get_context("fork")
            receiver, sender = ctx.Pipe(duplex=False)
            child = ctx.Process(
                target=_child_main,
                args=(str(folder), memory_budget, sender),
                name=f"check-{version}",
                daemon=True,
            )
            child.start()
            sender.close()
            result = None
            if receiver.poll(timeout):  # also true when the child died (end of file)
                try:
                    result = receiver.recv()
                except EOFError:
                    pass
            child.join(timeout=10 if result is not None else 1)
            if child.is_alive():
                child.kill()
                child.join()
            receiver.close()
            if result is None:
                code = child.exitcode
                if code is not None and code < 0:
                    reason = (
                        f"the checking process died of signal {-code} ({signal.Signals(-code).name}; "
                        "out of memory?) while loading the version"
                    )
                elif code is not None and code > 0:
                    reason = f"the checking process exited with status {code} while loading the version"
                else:
                    reason = f"the check did not finish within {timeout:.0f} s"
                self.record_check(version, False, reason, by="child")
                raise CheckpointError(reason)
            if not result["ok"]:
                self.record_check(version, False, result["error"], by="child")
                raise CheckpointError(result["error"])
            self.record_check(version, True, "passed", by="child", figures=result["figures"])
            return result["figures"]


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("."))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="model registry")
    ap.add_argument("--root", type=Path, default=None, help="registry root (default: MODEL_DIR)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    pr = sub.add_parser("promote", help="check (load + smoke forward), then make current")
    pr.add_argument("version")
    sub.add_parser("rollback")
    ck = sub.add_parser("check", help="load and smoke-test a version here; record the outcome")
    ck.add_argument("version")
    se = sub.add_parser("seal", help="record the manifest of a version committed without one")
    se.add_argument("version")
    for p in (pr, ck):
        p.add_argument("--memory-mb", type=float, default=None, help="memory budget of the load, MiB")
    args = ap.parse_args(argv)
    try:
        from backend.settings import SettingsError, get_settings

        s = get_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reg = ModelRegistry(args.root or s.model_dir, s.default_model)
    budget = int(args.memory_mb * 2**20) if getattr(args, "memory_mb", None) else None
    try:
        if args.cmd in ("promote", "check", "seal"):
            check_version_name(args.version)
        reg.ensure_initialized()
        if args.cmd == "promote":
            if not reg.is_cleared(args.version):
                reg.check_version(args.version, budget)
            reg.promote(args.version, reason="cli")
        elif args.cmd == "rollback":
            print(f"rolled back to {reg.rollback()}")
        elif args.cmd == "check":
            print(json.dumps({"version": args.version, **reg.check_version(args.version, budget)}))
            return 0
        elif args.cmd == "seal":
            reg.seal(args.version)
            print(f"sealed {args.version}: run `python -m backend.registry check {args.version}` next")
            return 0
    except (RegistryError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for info in reg.versions():
        m = info.metadata
        mark = "*" if info.current else " "
        print(
            f"{mark} {info.version:10s} parent={m.get('parent')!s:10s} created={m.get('created', '')} "
            f"metrics={json.dumps(m.get('metrics', {}))} {info.status}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
