"""The promotion gate scores each question kind and script apart and rejects malformed answers."""

from __future__ import annotations

import math

import pytest

from backend.finetune.gate import (
    gate,
    gate_decision,
    malformed_reason,
    question_kind,
    score_answers,
    script_of,
)

CAP, ATTR, REL = "What is <region1>?", "What colour is <region1>?", "How is <region1> related to <region2>?"
METRICS = ("caption_exact_match",)
BASE = {"caption_exact_match": 0.9}


def _scores(items):
    return {"base": BASE, "corrections": score_answers(items)}


# Held-out corrections: (question, reference); the answers below are what parent/candidate said.
HELD_OUT = [
    (CAP, "一个红色的圆"),
    (CAP, "دائرة حمراء"),
    (CAP, "a small red circle"),
    (ATTR, "红色"),
    (ATTR, "red"),
    (REL, "left of, smaller than"),
    (CAP, "a cat 🐈\u200d⬛"),
]


def _answers(answers):
    return [(q, ref, ans) for (q, ref), ans in zip(HELD_OUT, answers)]


def test_question_kinds_and_scripts():
    assert [question_kind(q) for q in (CAP, ATTR, REL, "Which part of the image is <region1> in?")] == [
        "caption",
        "attribute",
        "relation",
        "other",
    ]
    assert script_of("a small red circle") == "latin"
    assert script_of("e\u0301te\u0301") == "latin"  # combining marks follow their base letter
    assert script_of("a 小 red 三角形") == "cjk"
    assert script_of("ひらがな") == "cjk"
    assert script_of("دائرة حمراء") == "arabic"
    assert script_of("красный") == "other"
    assert script_of("🐈\u200d⬛ 42") == "other"


def test_malformed_answers():
    assert malformed_reason("caption", "a small red circle") is None
    assert malformed_reason("caption", "a 䄄\ufffd\ufffdo\ufffdottom left of, smaller than").startswith(
        "U+FFFD"
    )
    assert "relation words" in malformed_reason("caption", "a red circle left of")
    assert "relation words" in malformed_reason("attribute", "smaller than")
    assert malformed_reason("relation", "left of, smaller than") is None
    assert malformed_reason("caption", "a cup left of the plate", reference="a cup left of the plate") is None
    assert malformed_reason("caption", "a\ufffd", reference="a\ufffd") is None  # the character itself
    assert malformed_reason("caption", "red\x07circle").startswith("control character U+0007")
    # Joiners, RTL text and combining marks are well formed.
    assert malformed_reason("caption", "👩\u200d💻 دائرة e\u0301") is None
    assert malformed_reason("caption", "leftover smallest") is None  # word bounded


def test_score_answers_per_kind_and_script():
    refs = [ref for _, ref in HELD_OUT]
    got = score_answers(_answers(refs[:4] + ["blue", refs[5], "a cat"]))
    assert got["questions"] == 7 and got["accuracy"] == pytest.approx(5 / 7)
    assert got["caption_accuracy"] == pytest.approx(3 / 4) and got["caption_questions"] == 4
    assert got["attribute_accuracy"] == 0.5 and got["relation_accuracy"] == 1.0
    assert got["script_cjk_accuracy"] == 1.0 and got["script_cjk_questions"] == 2
    assert got["script_arabic_accuracy"] == 1.0
    assert got["script_latin_accuracy"] == 0.5 and got["script_latin_questions"] == 4
    assert got["malformed"] == 0 and got["malformed_examples"] == []
    assert "other_accuracy" not in got and "script_other_accuracy" not in got
    assert math.isnan(score_answers([])["accuracy"])


def test_candidate_with_a_malformed_answer_is_rejected():
    refs = [ref for _, ref in HELD_OUT]
    parent = _scores(_answers(["a red circle"] * 7))
    broken = refs.copy()
    broken[0] = "一个红\ufffd"
    candidate = _scores(_answers(broken))
    assert candidate["corrections"]["accuracy"] > parent["corrections"]["accuracy"]  # better, but broken
    decision = gate_decision(parent, candidate, 0.02, METRICS)
    assert not decision["accepted"]
    assert decision["reasons"][0].startswith("1 malformed answers on held-out corrections (U+FFFD")
    assert decision["malformed"] == {"parent": 0, "candidate": 1}
    mixed = refs.copy()
    mixed[2] = "a 䄄 bottom left of, smaller than"
    reasons = gate(parent, _scores(_answers(mixed)), 0.02, METRICS)[1]
    assert "relation words in a caption answer: left of, smaller than" in reasons[0]


def test_each_kind_and_script_is_compared_on_its_own():
    refs = [ref for _, ref in HELD_OUT]
    parent = _scores(_answers(refs[:5] + ["right of", refs[6]]))
    # The same overall score: the relation answer got right, a Chinese caption got wrong.
    candidate = _scores(_answers(["一个蓝色的圆"] + refs[1:]))
    decision = gate_decision(parent, candidate, 0.02, METRICS)
    assert decision["kinds"]["caption"] == {"parent": 1.0, "candidate": 0.75, "questions": 4}
    assert decision["kinds"]["relation"]["candidate"] == 1.0
    assert decision["scripts"]["cjk"] == {"parent": 1.0, "candidate": 0.5, "questions": 2}
    assert not decision["accepted"]
    assert any(r.startswith("held-out caption 0.7500 < parent 1.0000") for r in decision["reasons"])
    assert any(r.startswith("held-out script cjk 0.5000 < parent 1.0000") for r in decision["reasons"])
    assert not any(r.startswith("held-out corrections") for r in decision["reasons"])  # overall is equal
    assert gate_decision(parent, parent, 0.02, METRICS) | {"kinds": None, "scripts": None} == {
        "accepted": True,
        "reasons": [],
        "kinds": None,
        "scripts": None,
        "malformed": {"parent": 0, "candidate": 0},
    }


def test_old_style_figures_still_gate():
    """Figures without per-kind or malformed counts (stored by older versions) are compared as before."""
    parent = {"base": BASE, "corrections": {"accuracy": 0.5}}
    assert gate(parent, {"base": BASE, "corrections": {"accuracy": 0.5}}, 0.02, METRICS) == (True, [])
    assert not gate(parent, {"base": BASE, "corrections": {"accuracy": 0.4}}, 0.02, METRICS)[0]
