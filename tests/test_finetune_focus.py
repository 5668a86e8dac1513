"""Fine-tuning samples of a corrected image take the questions the parent answers wrong first
(backend.finetune.focus, TRAIN_FOCUS_TURNS)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from backend.finetune import MixedRecords
from backend.finetune.focus import focused_turns, missed_turns
from backend.settings import Settings, SettingsError


def _record(rid: str, answers: list[str]) -> dict:
    conv = []
    for k, a in enumerate(answers):
        conv += [{"from": "human", "value": f"q{k} <region1>?"}, {"from": "gpt", "value": a}]
    return {
        "id": rid,
        "image": None,
        "width": 10,
        "height": 10,
        "boxes": [[0, 0, 5, 5]],
        "conversations": conv,
    }


def _answers(record: dict) -> list[str]:
    return [t["value"] for t in record["conversations"] if t["from"] == "gpt"]


def test_focused_turns_take_the_missed_ones_first_and_fill_with_the_others():
    rec = _record("a", [f"a{k}" for k in range(10)])
    seen = Counter()
    for seed in range(200):
        got = _answers(focused_turns(rec, {"a": [2, 7]}, max_turns=4, focus=3, seed=seed))
        assert len(got) == 4 and len(set(got)) == 4
        assert {"a2", "a7"} <= set(got)  # both missed turns, every time
        seen.update(got)
    assert len(seen) == 10  # the known turns are drawn too, all of them in turn
    # At most ``focus`` missed turns in one sample; when too few known ones remain, more missed ones.
    many = _answers(focused_turns(rec, {"a": list(range(8))}, max_turns=4, focus=2, seed=1))
    assert len(many) == 4 and sum(a in {"a8", "a9"} for a in many) == 2
    only_missed = _answers(focused_turns(rec, {"a": list(range(10))}, max_turns=4, focus=2, seed=1))
    assert len(set(only_missed)) == 4


def test_focused_turns_leave_a_record_alone_when_nothing_to_choose():
    rec = _record("a", ["x", "y", "z"])
    assert focused_turns(rec, {"a": [0]}, max_turns=4, focus=3, seed=0) is rec  # fits as it is
    big = _record("b", [f"b{k}" for k in range(9)])
    assert focused_turns(big, {"b": []}, max_turns=4, focus=3, seed=0) is big  # nothing missed
    assert focused_turns(big, {}, max_turns=4, focus=3, seed=0) is big
    assert focused_turns(big, {"b": [1]}, max_turns=4, focus=0, seed=0) is big  # focus off


def test_mixed_records_pick_applies_to_corrections_only():
    corrections = [_record("c", [f"c{k}" for k in range(8)])]
    replay = [_record(f"r{i}", [f"r{k}" for k in range(8)]) for i in range(5)]
    mixed = MixedRecords(corrections, replay, 0.5, size=20, pick=lambda rec, i: {**rec, "picked": i})
    assert [mixed[i].get("picked") for i in range(10)] == list(range(10))
    assert all("picked" not in mixed[i] for i in range(10, 20))


def test_missed_turns_compares_the_engine_answers_with_the_records():
    records = [_record("a", ["red", "small", "left of"]), _record("b", ["粉色圆形", "pink"])]

    class Engine:
        def answer(self, images, boxes, questions):
            said = {"q0 <region1>?": "red", "q1 <region1>?": "large", "q2 <region1>?": "left of"}
            assert len(images) == len(boxes) == 2 and [i for i, _ in questions] == [0, 0, 0, 1, 1]
            return [SimpleNamespace(text=said.get(q, "")) for _, q in questions]

    assert missed_turns(Engine(), records) == {"a": [1], "b": [0, 1]}


def test_focus_turns_setting_is_checked():
    assert Settings.from_env({}).train_focus_turns == 0  # off unless asked (docs/training.md)
    assert Settings.from_env({"TRAIN_FOCUS_TURNS": "3"}).train_focus_turns == 3
    assert Settings.from_env({"TRAIN_FOCUS_TURNS": "0"}).train_focus_turns == 0
    with pytest.raises(SettingsError, match="TRAIN_FOCUS_TURNS"):
        Settings.from_env({"TRAIN_FOCUS_TURNS": "5", "TRAIN_MAX_TURNS": "4"})
