"""Corrections store: idempotent writes, deletes, export format, crash durability."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backend.corrections import Region, Relation, parse_result
from backend.settings import Settings
from backend.store import CorrectionStore, StoreError, parse_timestamp
from backend.webhooks import handle_webhook
from model.data.converters import validate_record
from model.tasks import ATTRIBUTE_QUESTIONS, CAPTION_QUESTIONS, RELATION_QUESTIONS
from tools.ls.payloads import annotation_payload, region_items, relation_item, timestamp

CLOSED_REDIS = "redis://127.0.0.1:1/0"  # nothing listens there: "Redis is down"


def _regions(tag: int) -> list[Region]:
    return [
        Region("a", (1.0, 2.0, 30.0 + tag, 40.0), f"a small pink circle {tag}", {"color": "pink"},
               [Relation("b", ("left of",))]),
        Region("b", (50.0, 10.0, 90.0, 60.0 + tag), None, {"shape": "square", "size": "large"}),
    ]  # fmt: skip


def test_parse_timestamp_orders_formats():
    assert parse_timestamp("2025-01-01T00:00:00Z") == parse_timestamp("2025-01-01T00:00:00+00:00")
    assert parse_timestamp("2025-01-01T01:00:00+01:00") == parse_timestamp("2025-01-01T00:00:00Z")
    assert parse_timestamp("2025-01-01T00:00:00.000001Z") > parse_timestamp("2025-01-01T00:00:00Z")
    with pytest.raises(StoreError, match="ISO 8601"):
        parse_timestamp("yesterday")


def test_write_replay_update_stale_delete(tmp_path: Path):
    store = CorrectionStore(tmp_path)
    w = store.apply_annotation(1, 10, timestamp(5), "img.png", 100, 80, _regions(0), train_threshold=3)
    assert (w.status, w.regions, w.new_corrections, w.training_requested) == ("created", 2, 2, False)
    assert store.apply_annotation(1, 10, timestamp(5), "img.png", 100, 80, _regions(9)).status == "duplicate"
    assert store.apply_annotation(1, 10, timestamp(4), "img.png", 100, 80, _regions(9)).status == "stale"
    assert store.annotations()[0].regions == _regions(0)
    w = store.apply_annotation(1, 10, timestamp(6), "img.png", 100, 80, _regions(1)[:1], train_threshold=3)
    assert (w.status, w.regions) == ("updated", 1)
    assert store.annotations()[0].regions == _regions(1)[:1]
    w = store.apply_annotation(1, 11, timestamp(1), "b.png", 100, 80, _regions(2), train_threshold=3)
    assert w.new_corrections == 3 and w.training_requested
    assert [r.project_id for r in store.pending_requests()] == [1]

    assert store.delete_annotations(1, [10, 999]) == 1
    assert [a.annotation_id for a in store.annotations()] == [11]
    # A late (re)delivery of a deleted annotation must not bring it back.
    assert store.apply_annotation(1, 10, timestamp(60), "img.png", 100, 80, _regions(3)).status == "deleted"
    assert store.apply_annotation(1, 999, timestamp(60), "x.png", 100, 80, _regions(3)).status == "deleted"
    assert [a.annotation_id for a in store.annotations()] == [11]


def test_training_watermark_and_outbox(tmp_path: Path):
    store = CorrectionStore(tmp_path)
    store.apply_annotation(1, 1, timestamp(1), "i", 100, 80, _regions(0))
    store.apply_annotation(2, 2, timestamp(1), "i", 100, 80, _regions(0))
    _, snap = store.begin_training(1)
    assert (store.new_corrections(1), store.new_corrections(2)) == (0, 2)
    store.apply_annotation(1, 3, timestamp(1), "i", 100, 80, _regions(0)[:1])
    assert store.new_corrections(1) == 1
    store.abort_training(1, snap)  # a failed job gives its snapshot back
    assert store.new_corrections(1) == 3
    store.request_training(2, "START_TRAINING")
    row = store.pending_requests()[0]
    store.request_training(2, "again")  # one row per project
    assert len(store.pending_requests()) == 1
    assert not store.resolve_request(2, row.requested_at)  # a newer request replaced that one
    newer = store.pending_requests()[0]
    assert store.resolve_request(2, newer.requested_at) and store.pending_requests() == []
    store.request_training(2, "x")
    assert store.take_followup(2) and not store.take_followup(2)


def test_export_records_are_valid_jsonl(tmp_path: Path):
    store = CorrectionStore(tmp_path)
    store.apply_annotation(1, 7, timestamp(1), "/data/upload/1/a.png", 100, 80, _regions(0))
    # A region without any text and not related to another one carries nothing to learn.
    store.apply_annotation(1, 8, timestamp(1), "/data/upload/1/b.png", 100, 80, [Region("z", (1, 1, 9, 9))])
    records = store.export_records(1)
    assert len(records) == 1
    rec = records[0]
    validate_record(rec)
    assert rec["source"] == "labelstudio" and rec["image"] == "/data/upload/1/a.png"
    assert rec["boxes"] == [[1.0, 2.0, 30.0, 40.0], [50.0, 10.0, 90.0, 60.0]]
    turns = [
        (rec["conversations"][i]["value"], rec["conversations"][i + 1]["value"]) for i in range(0, 10, 2)
    ]
    answers = [a for _, a in turns]
    assert answers == ["a small pink circle 0", "pink", "left of", "square", "large"]
    q = [t for t, _ in turns]
    assert q[0] in [t.format(a="<region1>") for t in CAPTION_QUESTIONS]
    assert q[1] in [t.format(a="<region1>") for t in ATTRIBUTE_QUESTIONS["color"]]
    assert q[2] in [t.format(a="<region1>", b="<region2>") for t in RELATION_QUESTIONS]
    assert store.export_records(1) == records  # stable templates across exports
    n = store.export_jsonl(tmp_path / "out.jsonl", 1)
    assert n == 1 and json.loads((tmp_path / "out.jsonl").read_text())["id"] == "ls-7"


def _version_result(aid: int, version: int) -> list[dict]:
    """Version ``version`` of annotation ``aid``: boxes and texts that differ per version."""
    rng = random.Random(aid * 100 + version)
    w, h = 200, 160
    items: list[dict] = []
    n = 1 + rng.randrange(3)
    for k in range(n):
        x0, y0 = rng.uniform(0, 100), rng.uniform(0, 80)
        box = (x0, y0, x0 + rng.uniform(10, 90), y0 + rng.uniform(10, 70))
        color = rng.choice(["pink", "red"])
        items += region_items(f"r{k}", box, w, h, f"a small {color} circle v{version}", [color, "circle"])
    if n > 1:
        items.append(relation_item("r0", "r1", ["left_of"]))
    return items


def test_thousand_duplicate_updated_out_of_order_deliveries(tmp_path: Path):
    """1,000 deliveries of 5 versions of 60 annotations, duplicated and shuffled, plus deletes:
    the store ends exactly as if each annotation's newest version had been delivered once."""
    settings = Settings(data_dir=tmp_path, redis_url=CLOSED_REDIS, train_min_corrections=10**9)
    rng = random.Random(0)
    annotations, versions = range(1, 61), 5
    deliveries = [(a, v) for a in annotations for v in range(versions)]  # 300 distinct versions
    deliveries += [rng.choice(deliveries) for _ in range(1000 - 300 - 8)]  # duplicates
    deleted = {3, 17, 29, 41}
    deliveries += [(a, "delete") for a in deleted] * 2  # each delete delivered twice
    rng.shuffle(deliveries)
    assert len(deliveries) == 1000
    statuses: dict[str, int] = {}
    for aid, v in deliveries:
        if v == "delete":
            payload = {
                "action": "ANNOTATIONS_DELETED",
                "annotations": [{"id": aid}],
                "project": {"id": 1 + aid % 2},
            }
        else:
            action = "ANNOTATION_CREATED" if v == 0 else "ANNOTATION_UPDATED"
            when = timestamp(v * 10 + aid / 100)
            payload = annotation_payload(aid, _version_result(aid, v), when, 1 + aid % 2, action=action)
        code, body = handle_webhook(payload, settings)
        assert code == 201, body
        status = body["result"].get("stored", "deleted-event")
        statuses[status] = statuses.get(status, 0) + 1
    assert statuses["created"] + statuses["updated"] < 300  # stale and duplicate ones were ignored
    assert statuses["duplicate"] > 0 and statuses["stale"] > 0

    # Expected: newest version of every annotation that was not deleted, parsed once, in id order.
    store = CorrectionStore(tmp_path)
    expected = {
        a: parse_result(_version_result(a, versions - 1), "image", "caption").regions
        for a in annotations
        if a not in deleted
    }
    got = {a.annotation_id: a.regions for a in store.annotations()}
    assert got == expected
    assert {a.annotation_id: a.project_id for a in store.annotations()} == {a: 1 + a % 2 for a in expected}
    records = store.export_records()
    assert len(records) == len(expected)
    for rec in records:
        validate_record(rec)
        assert all(t["value"].endswith(f"v{versions - 1}") for t in rec["conversations"][1:2])


WRITER = textwrap.dedent(
    """
    from backend.settings import Settings
    from backend.webhooks import handle_webhook
    from tools.ls.payloads import annotation_payload, region_items, timestamp
    settings = Settings(data_dir={data!r}, redis_url="redis://127.0.0.1:1/0", train_min_corrections=10**9)
    for aid in range(1, 100000):
        caption = f"a small pink circle {{aid}}"
        items = region_items("r", (1, 2, 30 + aid % 50, 40), 100, 80, caption, ["pink"])
        code, body = handle_webhook(annotation_payload(aid, items, timestamp(aid)), settings)
        assert code == 201, body
        print("ack", aid, flush=True)  # acknowledged only after the transaction committed
    """
)


@pytest.mark.slow
def test_sigkill_mid_burst_keeps_every_acknowledged_write(tmp_path: Path):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(data=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: list[int] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acked.append(int(line.split()[1]))
        if len(acked) == 300:
            proc.send_signal(signal.SIGKILL)  # mid-burst: it is already writing number 301
            break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    acked += [int(line.split()[1]) for line in proc.stdout]  # acks printed before the kill landed
    con = sqlite3.connect(tmp_path / "corrections.sqlite3")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    store = CorrectionStore(tmp_path)
    got = {a.annotation_id: a for a in store.annotations()}
    assert set(acked) <= set(got)
    assert len(got) - len(acked) in (0, 1)  # at most the one in flight (committed, not yet printed)
    for aid in acked:
        (region,) = got[aid].regions
        assert region.caption == f"a small pink circle {aid}"
        assert region.box == (1.0, 2.0, 30.0 + aid % 50, 40.0)


def test_a_delete_of_ids_never_seen_cannot_block_annotations_made_after_it(tmp_path: Path):
    """A sender may name ids Label Studio has not made yet (ids are sequential; with WEBHOOK_VERIFY
    Label Studio answers 404 for them as for deleted ones): the blind tombstone keeps out late
    deliveries of versions saved before the delete, never an annotation edited after it."""
    import time as _time
    from datetime import datetime, timezone

    store = CorrectionStore(tmp_path)
    assert store.delete_annotations(1, [777]) == 0
    assert store.delete_annotations(2, [778]) == 0  # under another project
    store.delete_annotations(2, [779])
    store.delete_annotations(1, [779])  # a second blind delete of the id: no 409, the newer counts
    later = datetime.fromtimestamp(_time.time() + 1, timezone.utc).isoformat()
    assert store.apply_annotation(1, 777, later, "a.png", 100, 80, _regions(0)).status == "created"
    assert store.apply_annotation(1, 778, later, "b.png", 100, 80, _regions(0)).status == "created"
    assert {a.annotation_id: a.project_id for a in store.annotations()} == {777: 1, 778: 1}
    # the late delivery of a version saved before its delete still stays out
    assert store.apply_annotation(1, 779, timestamp(60), "c.png", 100, 80, _regions(0)).status == "deleted"
    # and a real annotation's tombstone is not blind: nothing brings it back
    assert store.delete_annotations(1, [777]) == 1
    even_later = datetime.fromtimestamp(_time.time() + 5, timezone.utc).isoformat()
    assert store.apply_annotation(1, 777, even_later, "a.png", 100, 80, _regions(1)).status == "deleted"
    with pytest.raises(StoreError, match="belongs to project 1"):
        store.delete_annotations(2, [777])
