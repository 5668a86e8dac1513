"""Durable corrections store: SQLite (WAL, ``synchronous=FULL``), one transaction per webhook.

Tables::

    annotations  one row per Label Studio annotation id: project, task, image reference, original
                 size, ``updated_us`` (ordering key) and ``seq`` (store-wide change counter);
                 ``deleted=1`` rows are tombstones (no regions) so a late delivery cannot revive them
    regions      the annotation's region-text pairs: pixel box, caption, attributes, relations, and
                 ``corrected``: the reviewer gave it text the model did not (:mod:`backend.predicted`);
                 only those count towards ``TRAIN_MIN_CORRECTIONS``, all are training data
    projects     per project ``trained_seq`` (the training watermark: changes up to it are in a
                 committed version, or were in a candidate the gate rejected) and the running job's
                 claim (``claimed_seq`` until ``claimed_until``)
    outbox       per project, a training request not yet handed to Redis (or waiting for a running
                 job); survives a Redis outage and is flushed by the next webhook, the worker,
                 the scheduler or ``python -m backend.jobs flush``

Idempotency: an annotation write is applied only if its ``updated_at`` is newer than the stored one;
an equal one (replay, duplicate delivery) and an older one (out-of-order delivery) change nothing.

Watermark: a job's snapshot moves ``trained_seq`` only when the job commits a version (promoted or
rejected by the gate), never when it starts or dies.  While it runs, the job *claims* its snapshot
for a short lease that it renews (``JOB_HEARTBEAT_SECONDS``), so corrections it is training on are
not counted as new (no follow-up round for them); a killed job's claim lapses and they count again.

Ownership: an annotation id belongs to the project of the first write that names it (a create, or
the tombstone of a delete that arrived first); a write or delete naming another project is refused
(:class:`StoreError`, 409) and the transaction changes nothing.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from backend.corrections import Region, Relation, annotation_record
from backend.errors import ClientError
from model.data.converters import validate_record, write_jsonl

DB_NAME = "corrections.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    annotation_id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL,
    task_id INTEGER,
    updated_us INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    image TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS annotations_project ON annotations (project_id, seq);
CREATE TABLE IF NOT EXISTS regions (
    annotation_id INTEGER NOT NULL REFERENCES annotations (annotation_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    region_id TEXT NOT NULL,
    x0 REAL NOT NULL, y0 REAL NOT NULL, x1 REAL NOT NULL, y1 REAL NOT NULL,
    caption TEXT,
    attributes TEXT NOT NULL,
    relations TEXT NOT NULL,
    corrected INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (annotation_id, idx)
);
CREATE TABLE IF NOT EXISTS projects (
    project_id INTEGER PRIMARY KEY,
    trained_seq INTEGER NOT NULL DEFAULT 0,
    last_version TEXT,
    last_decision TEXT,
    last_trained_at REAL,
    claimed_seq INTEGER,
    claimed_until REAL
);
CREATE TABLE IF NOT EXISTS outbox (
    project_id INTEGER PRIMARY KEY,
    reason TEXT NOT NULL,
    requested_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


MAX_EPOCH_SECONDS = 253_402_300_800  # 10000-01-01T00:00:00Z


class StoreError(ClientError):
    """Input the store cannot record (bad timestamp, ids; 409: an id owned by another project)."""


def _blind(row: sqlite3.Row) -> bool:
    """A tombstone written by a delete of an id that was never stored (no version, no image)."""
    return bool(row["deleted"]) and row["updated_us"] == 0 and row["image"] == ""


def _not_owner(annotation_id: int, owner: int, project_id: int, what: str) -> StoreError:
    return StoreError(f"annotation {annotation_id} belongs to project {owner}, not {project_id}; {what}", 409)


def parse_timestamp(value: Any) -> int:
    """Label Studio ``updated_at`` (ISO 8601, ``Z`` or offset; or epoch seconds) -> UTC microseconds.

    Epoch seconds must be finite and within years 1970-9999 (``datetime``'s range for strings)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (isinstance(value, int) or math.isfinite(value)) or not 0 <= value < MAX_EPOCH_SECONDS:
            raise StoreError(f"timestamp {value!r:.40} is not epoch seconds between 1970 and 9999", 422)
        return int(round(float(value) * 1_000_000))
    if not isinstance(value, str) or not value.strip():
        raise StoreError(f"timestamp must be an ISO 8601 string, got {value!r:.80}")
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise StoreError(f"timestamp {value!r:.80} is not ISO 8601") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)  # Label Studio stores UTC
    delta = dt - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclass
class WriteResult:
    """What one webhook changed: ``status`` is created, updated, duplicate, stale or deleted."""

    status: str
    regions: int
    new_corrections: int
    training_requested: bool


@dataclass
class OutboxRow:
    project_id: int
    reason: str
    requested_at: float
    attempts: int
    last_error: str | None


@dataclass
class Annotation:
    annotation_id: int
    project_id: int
    task_id: int | None
    image: str
    width: int
    height: int
    seq: int
    regions: list[Region]


def database_path(path: str | Path, name: str) -> Path:
    """``path`` when it names a file (it has a suffix), else ``path / name``; its folder is created."""
    path = Path(path)
    path = path / name if path.suffix == "" else path
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class CorrectionStore:
    """Thread- and process-safe: every call opens its own short-lived connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = database_path(path, DB_NAME)
        with self._connect() as con:
            # WAL is a property of the database file: set once, every later connection inherits it.
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
            if "corrected" not in {r["name"] for r in con.execute("PRAGMA table_info(regions)")}:
                # A store written before corrections were told apart: regions with text count.
                con.execute("ALTER TABLE regions ADD COLUMN corrected INTEGER NOT NULL DEFAULT 1")
                con.execute(
                    "UPDATE regions SET corrected = 0"
                    " WHERE caption IS NULL AND attributes = '{}' AND relations = '[]'"
                )
            columns = {r["name"] for r in con.execute("PRAGMA table_info(projects)")}
            for column, kind in (("claimed_seq", "INTEGER"), ("claimed_until", "REAL")):
                if column not in columns:  # a store written before claims existed
                    con.execute(f"ALTER TABLE projects ADD COLUMN {column} {kind}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            # FULL: a commit is on disk (WAL fsynced) before we acknowledge the webhook.
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time, all or nothing."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                if con.in_transaction:  # SQLite has already rolled back after an I/O error
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ------------------------------------------------------------------ writes
    @staticmethod
    def _next_seq(con: sqlite3.Connection) -> int:
        con.execute(
            "INSERT INTO counters (name, value) VALUES ('seq', 1) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1"
        )
        return con.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]

    def apply_annotation(
        self,
        project_id: int,
        annotation_id: int,
        updated_at: Any,
        image: str,
        width: int,
        height: int,
        regions: Sequence[Region],
        task_id: int | None = None,
        train_threshold: int | None = None,
        corrections: Collection[str] | None = None,
    ) -> WriteResult:
        """Record one annotation version (created or updated) in one transaction.

        ``corrections``: ids of the regions that count as corrections (None: every region with text).

        When ``train_threshold`` is given and the project's new corrections reach it, a training
        request is put in the outbox in the same transaction.
        """
        updated_us = parse_timestamp(updated_at)
        with self.transaction() as con:
            row = con.execute(
                "SELECT updated_us, deleted, project_id, image, received_at FROM annotations"
                " WHERE annotation_id = ?",
                (annotation_id,),
            ).fetchone()
            if row is not None and _blind(row) and updated_us > row["received_at"] * 1e6:
                row = None  # edited after a delete of an id never seen: that delete was not of it
            if row is not None and row["project_id"] != project_id:
                raise _not_owner(annotation_id, row["project_id"], project_id, "nothing was stored")
            if row is not None and row["deleted"]:
                status = "deleted"  # Label Studio never reuses ids: a late delivery must not revive it
            elif row is not None and updated_us <= row["updated_us"]:
                status = "duplicate" if updated_us == row["updated_us"] else "stale"
            else:
                status = "created" if row is None else "updated"
                seq = self._next_seq(con)
                con.execute(
                    "INSERT INTO annotations (annotation_id, project_id, task_id, updated_us, updated_at,"
                    " image, width, height, deleted, seq, received_at) VALUES (?,?,?,?,?,?,?,?,0,?,?)"
                    " ON CONFLICT (annotation_id) DO UPDATE SET task_id=excluded.task_id, deleted=0,"
                    " project_id=excluded.project_id,"
                    " updated_us=excluded.updated_us, updated_at=excluded.updated_at, image=excluded.image,"
                    " width=excluded.width,"
                    " height=excluded.height, seq=excluded.seq, received_at=excluded.received_at",
                    (annotation_id, project_id, task_id, updated_us, str(updated_at), image, width, height,
                     seq, time.time()),
                )  # fmt: skip
                con.execute("DELETE FROM regions WHERE annotation_id = ?", (annotation_id,))
                with_text = {r.region_id for r in regions if r.has_text}
                counted = with_text if corrections is None else set(corrections)
                con.executemany(
                    "INSERT INTO regions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [_region_row(annotation_id, i, r, r.region_id in counted) for i, r in enumerate(regions)],
                )
            new = self._new_corrections(con, project_id)
            requested = False
            if train_threshold is not None and status in ("created", "updated") and new >= train_threshold:
                self._request(con, project_id, f"{new} new corrections")
                requested = True
        return WriteResult(status, len(regions), new, requested)

    def delete_annotations(self, project_id: int, annotation_ids: Sequence[int]) -> int:
        """Remove annotations (tombstones keep late deliveries out); returns how many had data.

        All or nothing: an id stored under another project refuses the whole delete (409).  The
        tombstone of an id never stored is *blind*: it keeps out only versions Label Studio saved
        before the delete arrived (a late delivery), not an annotation edited after it, so a
        delete naming ids Label Studio has not made yet cannot block them."""
        removed = 0
        with self.transaction() as con:
            for aid in annotation_ids:
                row = con.execute(
                    "SELECT updated_us, deleted, project_id, image FROM annotations WHERE annotation_id = ?",
                    (aid,),
                ).fetchone()
                if row is not None and _blind(row):
                    row = None  # another delete of an id never seen: the newer one counts
                if row is not None and row["project_id"] != project_id:
                    raise _not_owner(aid, row["project_id"], project_id, "nothing was deleted")
                if row is not None and row["deleted"]:
                    continue
                removed += row is not None
                con.execute("DELETE FROM regions WHERE annotation_id = ?", (aid,))
                con.execute(
                    "INSERT INTO annotations (annotation_id, project_id, updated_us, updated_at, image,"
                    " width, height, deleted, seq, received_at) VALUES (?, ?, 0, '', '', 0, 0, 1, ?, ?)"
                    " ON CONFLICT (annotation_id) DO UPDATE SET deleted = 1, seq = excluded.seq,"
                    " project_id = excluded.project_id,"
                    " received_at = excluded.received_at",
                    (aid, project_id, self._next_seq(con), time.time()),
                )
        return removed

    # ------------------------------------------------------------------ outbox
    @staticmethod
    def _request(con: sqlite3.Connection, project_id: int, reason: str) -> None:
        con.execute(
            "INSERT INTO outbox (project_id, reason, requested_at) VALUES (?, ?, ?)"
            " ON CONFLICT (project_id) DO UPDATE SET reason = excluded.reason,"
            " requested_at = excluded.requested_at",
            (project_id, reason, time.time()),
        )

    def request_training(self, project_id: int, reason: str) -> None:
        """Put a training request for the project in the outbox (idempotent: one row per project)."""
        with self.transaction() as con:
            self._request(con, project_id, reason)

    def pending_requests(self) -> list[OutboxRow]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM outbox ORDER BY requested_at").fetchall()
        return [OutboxRow(**dict(r)) for r in rows]

    def resolve_request(self, project_id: int, requested_at: float) -> bool:
        """Drop the request once handed over; a newer request (other ``requested_at``) stays."""
        with self.transaction() as con:
            cur = con.execute(
                "DELETE FROM outbox WHERE project_id = ? AND requested_at = ?", (project_id, requested_at)
            )
        return cur.rowcount > 0

    def note_attempt(self, project_id: int, error: str | None) -> None:
        with self.transaction() as con:
            con.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE project_id = ?",
                (error, project_id),
            )

    def take_followup(self, project_id: int) -> bool:
        """Called by a running job between rounds: consume a request that arrived meanwhile."""
        with self.transaction() as con:
            cur = con.execute("DELETE FROM outbox WHERE project_id = ?", (project_id,))
        return cur.rowcount > 0

    # ------------------------------------------------------------------ training bookkeeping
    @staticmethod
    def _new_corrections(con: sqlite3.Connection, project_id: int) -> int:
        row = con.execute(
            "SELECT COUNT(*) FROM regions r JOIN annotations a USING (annotation_id)"
            " WHERE r.corrected = 1"
            " AND a.project_id = ? AND a.deleted = 0 AND a.seq > COALESCE((SELECT MAX(trained_seq, CASE"
            " WHEN claimed_until > ? THEN claimed_seq ELSE 0 END) FROM projects WHERE project_id = ?), 0)",
            (project_id, time.time(), project_id),
        ).fetchone()
        return int(row[0])

    def new_corrections(self, project_id: int) -> int:
        """Corrected regions changed after the training watermark and not claimed by a running job."""
        with self._connect() as con:
            return self._new_corrections(con, project_id)

    def projects(self) -> list[int]:
        with self._connect() as con:
            rows = con.execute("SELECT DISTINCT project_id FROM annotations WHERE deleted = 0").fetchall()
        return sorted(r[0] for r in rows)

    def begin_training(self, project_id: int, claim_seconds: float = 3600.0) -> tuple[int, int]:
        """Snapshot for a training job: returns ``(trained_seq, snapshot seq)``.  The watermark stays;
        the job claims the snapshot for ``claim_seconds`` (renewed with :meth:`renew_claim`), so
        corrections arriving from now on are the ones that count as new while it runs."""
        with self.transaction() as con:
            prev = con.execute(
                "SELECT trained_seq FROM projects WHERE project_id = ?", (project_id,)
            ).fetchone()
            prev_seq = int(prev[0]) if prev else 0
            snap = con.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
            snap_seq = int(snap[0]) if snap else 0
            con.execute(
                "INSERT INTO projects (project_id, claimed_seq, claimed_until) VALUES (?, ?, ?)"
                " ON CONFLICT (project_id) DO UPDATE SET claimed_seq = excluded.claimed_seq,"
                " claimed_until = excluded.claimed_until",
                (project_id, snap_seq, time.time() + claim_seconds),
            )
        return prev_seq, snap_seq

    def renew_claim(self, project_id: int, snapshot_seq: int, claim_seconds: float) -> bool:
        """Extend the running job's claim (only its own: the claim still names ``snapshot_seq``)."""
        with self.transaction() as con:
            cur = con.execute(
                "UPDATE projects SET claimed_until = ? WHERE project_id = ? AND claimed_seq = ?",
                (time.time() + claim_seconds, project_id, snapshot_seq),
            )
        return cur.rowcount > 0

    def abort_training(self, project_id: int, snapshot_seq: int) -> None:
        """A failed job drops its claim, so its corrections count as new again at once."""
        with self.transaction() as con:
            self._drop_claim(con, project_id, snapshot_seq)

    def finish_training(
        self, project_id: int, snapshot_seq: int, version: str | None, decision: str, trained: bool
    ) -> None:
        """Record a finished job and drop its claim; ``trained`` (it committed a version, promoted or
        rejected by the gate) moves the watermark to the job's snapshot."""
        with self.transaction() as con:
            con.execute(
                "UPDATE projects SET last_version = ?, last_decision = ?, last_trained_at = ?,"
                " trained_seq = CASE WHEN ? THEN MAX(trained_seq, ?) ELSE trained_seq END"
                " WHERE project_id = ?",
                (version, decision, time.time(), trained, snapshot_seq, project_id),
            )
            self._drop_claim(con, project_id, snapshot_seq)

    @staticmethod
    def _drop_claim(con: sqlite3.Connection, project_id: int, snapshot_seq: int) -> None:
        con.execute(
            "UPDATE projects SET claimed_seq = NULL, claimed_until = NULL"
            " WHERE project_id = ? AND claimed_seq = ?",
            (project_id, snapshot_seq),
        )

    def project_status(self, project_id: int) -> dict[str, Any]:
        with self._connect() as con:
            row = con.execute("SELECT * FROM projects WHERE project_id = ?", (project_id,)).fetchone()
            count = con.execute(
                "SELECT COUNT(*) FROM regions r JOIN annotations a USING (annotation_id)"
                " WHERE a.project_id = ? AND a.deleted = 0",
                (project_id,),
            ).fetchone()[0]
            new = self._new_corrections(con, project_id)
        return {**(dict(row) if row else {"project_id": project_id}), "regions": count, "new": new}

    # ------------------------------------------------------------------ reads / export
    def annotations(self, project_id: int | None = None, since_seq: int = 0) -> list[Annotation]:
        """Live annotations (optionally of one project, changed after ``since_seq``), by id."""
        where = "a.deleted = 0 AND a.seq > ?"
        args: list[Any] = [since_seq]
        if project_id is not None:
            where += " AND a.project_id = ?"
            args.append(project_id)
        with self._connect() as con:
            con.execute("BEGIN")  # one consistent snapshot for both tables
            rows = con.execute(f"SELECT a.* FROM annotations a WHERE {where} ORDER BY a.annotation_id", args)
            rows = rows.fetchall()
            regions: dict[int, list[Region]] = {}
            for r in con.execute(
                f"SELECT r.* FROM regions r JOIN annotations a USING (annotation_id) WHERE {where}"
                " ORDER BY r.annotation_id, r.idx",
                args,
            ):
                regions.setdefault(r["annotation_id"], []).append(_row_region(r))
            con.execute("COMMIT")
        return [
            Annotation(
                r["annotation_id"], r["project_id"], r["task_id"], r["image"], r["width"], r["height"],
                r["seq"], regions.get(r["annotation_id"], []),
            )
            for r in rows
        ]  # fmt: skip

    def export_records(self, project_id: int | None = None, since_seq: int = 0) -> list[dict[str, Any]]:
        """Region-text records (``model.data.converters`` JSONL format), one per annotation that has
        at least one usable region-text pair; every record passes ``validate_record``."""
        records = []
        for ann in self.annotations(project_id, since_seq):
            rec = annotation_record(
                ann.annotation_id, ann.project_id, ann.task_id, ann.image, ann.width, ann.height, ann.regions
            )
            if rec is not None:
                validate_record(rec)
                records.append(rec)
        return records

    def export_jsonl(self, path: str | Path, project_id: int | None = None) -> int:
        return write_jsonl(self.export_records(project_id), path)


def _region_row(annotation_id: int, idx: int, r: Region, corrected: bool) -> tuple:
    relations = [{"target": rel.target, "labels": list(rel.labels)} for rel in r.relations]
    return (
        annotation_id, idx, r.region_id, *r.box, r.caption,
        json.dumps(r.attributes, sort_keys=True), json.dumps(relations), int(corrected),
    )  # fmt: skip


def _row_region(row: sqlite3.Row) -> Region:
    relations = [Relation(d["target"], tuple(d["labels"])) for d in json.loads(row["relations"])]
    box = (row["x0"], row["y0"], row["x1"], row["y1"])
    return Region(row["region_id"], box, row["caption"], json.loads(row["attributes"]), relations)


T = TypeVar("T")


def one_per_folder(factory: Callable[[Path], T]) -> Callable[[str | Path], T]:
    """``factory`` made at most once per resolved folder and process, thread-safe (two threads
    must never get two objects for one database)."""
    lock = threading.Lock()
    made: dict[Path, T] = {}

    def opened(data_dir: str | Path) -> T:
        key = Path(data_dir).resolve()
        with lock:
            if key not in made:
                made[key] = factory(key)
            return made[key]

    return opened


_open_store = one_per_folder(CorrectionStore)


def open_store(data_dir: str | Path) -> CorrectionStore:
    """The store under ``data_dir``, one per folder and process (its schema is created once)."""
    return _open_store(data_dir)
