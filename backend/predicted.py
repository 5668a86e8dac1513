"""What the model told Label Studio about each region, so that only real corrections count.

A reviewer's annotation repeats every region of the prediction it was made from, edited or not, and
often adds boxes of its own.  For the training trigger (``TRAIN_MIN_CORRECTIONS``) a region counts
as a *correction* only when the reviewer gave it text (caption, choices, relations) and either the
model never described that region, or its texts differ from what the model said.  A region whose
box was moved but whose texts are the model's is not a correction, nor is a box without any text.

What the model said comes from, per region id:

1. ``annotation.prediction`` of the webhook: Label Studio 1.23.2 stores in it, when the annotation
   is created, the task's prediction of the project's selected ``model_version`` (``{}`` when the
   project selects no stored version, e.g. the ML backend's title right after connecting);
2. else this backend's own record: ``/predict`` (batch and interactive) records, per project, task
   and region id, the texts it answered (:meth:`PredictionLog.record`; the latest answer wins).

Texts are compared as Label Studio items, not as the model's vocabulary: per region, the set of its
non-geometry items (``from_name``, ``type`` and value: TextArea text with whitespace collapsed,
Choices, Taxonomy, Labels) and of the relations starting at it (target, direction, labels).

The record lives in ``DATA_DIR/predicted.sqlite3`` (WAL, ``synchronous=NORMAL``: a record lost in
a power cut only makes a confirmed region count as a correction), one row per region of a task.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backend.region_shapes import REGION_TYPES
from backend.settings import Settings
from backend.store import database_path, one_per_folder

__all__ = [
    "DB_NAME",
    "PredictionLog",
    "corrected_regions",
    "open_prediction_log",
    "region_texts",
    "remember_predictions",
]

log = logging.getLogger(__name__)

DB_NAME = "predicted.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS predicted (
    project_id INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    region_id TEXT NOT NULL,
    texts TEXT NOT NULL,
    version TEXT NOT NULL,
    predicted_at REAL NOT NULL,
    PRIMARY KEY (project_id, task_id, region_id)
);
"""
GEOMETRY_TYPES = REGION_TYPES  # region items: their labels are geometry, not text the model said
MAX_ID = 2**63 - 1


def _text_value(item: Mapping[str, Any]) -> Any:
    """The comparable value of one non-geometry item (``None``: the item says nothing)."""
    value = item.get("value")
    if not isinstance(value, Mapping):
        return None
    kind = item.get("type")
    if kind == "textarea":
        texts = value.get("text")
        texts = texts if isinstance(texts, list) else [texts]
        joined = " ".join(" ".join(t.split()) for t in texts if isinstance(t, str)).strip()
        return joined or None
    found = value.get(kind) if isinstance(kind, str) else None
    if isinstance(found, list):
        words = sorted(json.dumps(w, sort_keys=True, ensure_ascii=False) for w in found)
        return words or None
    return None


def region_texts(result: Any) -> dict[str, list]:
    """``{region id: sorted texts}`` of a Label Studio ``result`` list (see the module docstring)."""
    texts: dict[str, set[str]] = {}
    if not isinstance(result, list):
        return {}
    for item in result:
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind == "relation":
            src, dst = item.get("from_id"), item.get("to_id")
            if isinstance(src, str) and isinstance(dst, str):
                labels = sorted(lbl for lbl in item.get("labels") or [] if isinstance(lbl, str))
                entry = ["relation", dst, str(item.get("direction", "right")), labels]
                texts.setdefault(src, set()).add(json.dumps(entry, ensure_ascii=False))
            continue
        rid = item.get("id")
        if not isinstance(rid, str) or kind in GEOMETRY_TYPES:
            continue
        value = _text_value(item)
        if value is not None:
            entry = [str(item.get("from_name")), str(kind), value]
            texts.setdefault(rid, set()).add(json.dumps(entry, ensure_ascii=False))
    return {rid: sorted(found) for rid, found in texts.items()}


def corrected_regions(
    annotation_result: Any, with_text: Iterable[str], predicted: Mapping[str, list]
) -> set[str]:
    """Region ids of ``with_text`` (the regions a reviewer gave text) whose texts in
    ``annotation_result`` differ from ``predicted`` (:func:`region_texts` of what the model said),
    or that the model never described."""
    given = region_texts(annotation_result)
    return {rid for rid in with_text if rid not in predicted or given.get(rid, []) != predicted[rid]}


def _prediction_results(answer: Any) -> list[Mapping[str, Any]]:
    """The prediction objects of one task's /predict answer entry (a dict, a list of them, or
    ``[]`` for a skipped task)."""
    entries = answer if isinstance(answer, list) else [answer]
    return [e for e in entries if isinstance(e, Mapping) and isinstance(e.get("result"), list)]


def _int_id(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        return None
    return value


class PredictionLog:
    """Per (project, task, region) the texts the backend last answered (thread- and process-safe:
    every call opens its own short-lived connection)."""

    def __init__(self, path: str | Path) -> None:
        self.path = database_path(path, DB_NAME)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            # NORMAL: no fsync per answer (see the module docstring for what a lost record costs).
            con.execute("PRAGMA synchronous=NORMAL")
            yield con
        finally:
            con.close()

    def record(self, project_id: Any, tasks: Sequence[Any], answers: Sequence[Any]) -> int:
        """Record what ``/predict`` answered (``answers[i]`` for ``tasks[i]``); returns the regions
        recorded.  Tasks without an integer id or project are left out."""
        rows = []
        now = time.time()
        for task, answer in zip(tasks, answers):
            if not isinstance(task, Mapping):
                continue
            task_id = _int_id(task.get("id"))
            project = _int_id(task.get("project")) or _int_id(project_id)
            if task_id is None or project is None:
                continue
            for prediction in _prediction_results(answer):
                version = str(prediction.get("model_version") or "")
                for rid, texts in region_texts(prediction["result"]).items():
                    rows.append((project, task_id, rid, json.dumps(texts, ensure_ascii=False), version, now))
        if rows:
            with self._connect() as con:
                con.executemany(
                    "INSERT INTO predicted VALUES (?,?,?,?,?,?) ON CONFLICT (project_id, task_id, region_id)"
                    " DO UPDATE SET texts=excluded.texts, version=excluded.version,"
                    " predicted_at=excluded.predicted_at",
                    rows,
                )
        return len(rows)

    def for_task(self, project_id: int, task_id: int) -> dict[str, list]:
        """``{region id: texts}`` the backend last answered for the task."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT region_id, texts FROM predicted WHERE project_id = ? AND task_id = ?",
                (project_id, task_id),
            ).fetchall()
        return {rid: json.loads(texts) for rid, texts in rows}

    def predicted_for(self, project_id: int, task_id: int | None, annotation: Mapping[str, Any]) -> dict:
        """What the model said about the regions of ``annotation`` (see the module docstring:
        Label Studio's ``annotation.prediction`` first, then this log)."""
        said = self.for_task(project_id, task_id) if task_id is not None else {}
        shown = annotation.get("prediction")
        if isinstance(shown, Mapping):
            said.update(region_texts(shown.get("result")))
        return said


_open_log = one_per_folder(PredictionLog)


def open_prediction_log(data_dir: str | Path) -> PredictionLog:
    """The log under ``data_dir``, one per folder and process (its schema is created once)."""
    return _open_log(data_dir)


def remember_predictions(settings: Settings, tasks: Sequence[Any], answers: Sequence[Any]) -> None:
    """:meth:`PredictionLog.record` for ``/predict``; a failure is logged, never raised (the answer
    matters more than the record: without it the reviewer's regions count as corrections)."""
    try:
        open_prediction_log(settings.data_dir).record(None, tasks, answers)
    except (sqlite3.Error, OSError) as exc:
        log.warning("predictions not recorded", extra={"reason": f"{type(exc).__name__}: {exc}"})
