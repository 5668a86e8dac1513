"""Questions typed about regions: box references, question kinds, the answer TextArea result."""

from __future__ import annotations

from dataclasses import replace

import pytest

from backend.label_config import parse_label_config
from backend.predictions import predict_tasks
from backend.region_qa import (
    CANNOT_ANSWER,
    canonical_question,
    classify,
    context_questions,
    plan_turns,
    resolve_references,
)
from backend.results import Region
from model.checkpoint import load_model
from model.inference.engine import InferenceEngine
from model.tasks import ATTRIBUTE_QUESTIONS, CAPTION_QUESTIONS, POSITION_QUESTIONS, RELATION_QUESTIONS
from tests.test_predictions import CONFIGS, SETTINGS, DictFetcher, ls_rect, ls_task, scene

REGIONS = [
    Region("a", "bbox", "rectanglelabels", ["Object"]),
    Region("b", "bbox", "rectanglelabels", ["Car"]),
    Region("c", "bbox", "rectanglelabels", ["Red car"]),
]
QA = parse_label_config((CONFIGS / "region_qa.xml").read_text())


def question_item(*texts: str) -> dict:
    return {
        "id": "q",
        "from_name": "question",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": list(texts)},
    }


@pytest.mark.parametrize(
    "question, text, refs",
    [
        ("What colour is box 2?", "What colour is <region1>?", [1]),
        ("How is <region3> related to region 1?", "How is <region1> related to <region2>?", [2, 0]),
        ("Is the Car left of box #1?", "Is <region1> left of <region2>?", [1, 0]),
        ("what is the red car", "what is <region1>", [2]),  # the longer label wins over "car"
        ("What is Region 2 doing with region 2?", "What is <region1> doing with <region1>?", [1]),
        ("How are you?", "How are you?", []),
    ],
)
def test_references_become_region_tokens_in_order_of_mention(question, text, refs):
    assert resolve_references(question, REGIONS) == (text, refs)


@pytest.mark.parametrize("question", ["What is box 4?", "What is <region0>?"])
def test_a_reference_to_no_box_is_an_error(question):
    with pytest.raises(ValueError, match="names no box"):
        resolve_references(question, REGIONS)


def test_a_label_on_several_boxes_is_ambiguous():
    regions = [Region("a", "bbox", "rectanglelabels", ["Object"])] * 2
    with pytest.raises(ValueError, match="on 2 boxes"):
        resolve_references("What colour is the Object?", regions)


def test_every_training_template_is_its_own_kind():
    a, b = "<region1>", "<region2>"
    for template in CAPTION_QUESTIONS:
        assert classify(template.format(a=a)) == "caption"
    for attr, templates in ATTRIBUTE_QUESTIONS.items():
        assert all(classify(t.format(a=a)) == attr for t in templates)
    assert all(classify(t.format(a=a)) == "position" for t in POSITION_QUESTIONS)
    assert all(classify(t.format(a=a, b=b)) == "relation" for t in RELATION_QUESTIONS)


@pytest.mark.parametrize(
    "question, kind",
    [
        ("describe <region1>", "caption"),
        ("Tell me about <region1>.", "caption"),
        ("What's in <region1>?", "caption"),
        ("Which color does <region1> have?", "color"),
        ("and what colour is <region1>", "color"),
        ("What kind of shape is <region1>?", "shape"),
        ("How large is <region1>?", "size"),
        ("Where is <region1> in the picture?", "position"),
        ("Where in the image is <region1>?", "position"),
        ("What is the relationship between <region1> and <region2>?", "relation"),
        ("Where is <region1> compared to <region2>?", "relation"),
        ("What is <region1> doing with <region2>?", None),
        ("Is <region1> left of <region2>?", None),
        ("How many objects are there?", None),
        ("What colour is the sky behind <region1>?", None),
    ],
)
def test_paraphrases_are_classified_and_the_rest_is_not(question, kind):
    assert classify(question) == kind


def test_canonical_question_names_the_referenced_boxes():
    assert canonical_question("color", [1]) == ATTRIBUTE_QUESTIONS["color"][0].format(a="<region2>")
    assert canonical_question("relation", [2, 0]) == RELATION_QUESTIONS[0].format(
        a="<region3>", b="<region1>"
    )
    assert canonical_question("position", [0]) == POSITION_QUESTIONS[0].format(a="<region1>")


def test_turns_keep_the_boxes_of_the_turn_before():
    turns = plan_turns(
        [
            "What colour is the Car?",
            "And what shape is it?",
            "How big is it?",
            "What is it doing?",
            "What is it?",
        ],
        REGIONS,
    )
    assert [t.refs for t in turns] == [[1], [1], [1], [1], [1]]
    assert [t.kind for t in turns] == ["color", "shape", "size", None, "caption"]
    assert turns[1].asked == canonical_question("shape", [1])
    assert turns[3].asked is None and "not a question kind" in (turns[3].reason or "")


def test_unanswerable_turns_say_why():
    first, second, third = plan_turns(
        ["What is it?", "Where is box 1 relative to box 1?", "How is box 1 related to box 9?"], REGIONS
    )
    assert "names no box" in (first.reason or "") and first.asked is None
    assert second.kind == "relation" and second.asked is None
    assert "about 2 box(es), not 1" in (second.reason or "")
    assert "names no box" in (third.reason or "")


def test_region_qa_config_has_question_and_answer():
    assert (QA.question, QA.answer, QA.caption) == ("question", "answer", "caption")
    assert QA.warnings == ()
    assert QA.summary()["questions"] == {"question": "question", "answer": "answer"}
    assert "questions" not in parse_label_config((CONFIGS / "region_caption.xml").read_text()).summary()


def test_a_question_without_answer_area_is_not_answered():
    xml = (
        '<View><Image name="img" value="$picture"/>'
        '<RectangleLabels name="box" toName="img"><Label value="A"/></RectangleLabels>'
        '<TextArea name="caption" toName="img" perRegion="true"/>'
        '<TextArea name="question" toName="img"/></View>'
    )
    c = parse_label_config(xml)
    assert c.question is None and c.answer is None and any("question and an answer" in w for w in c.warnings)
    assert context_questions({"result": [question_item("What is box 1?")]}, c) == []


def test_context_questions_reads_every_turn_newest_last():
    context = {
        "result": [
            {"from_name": "bbox"},
            question_item(" What is box 1? ", ""),
            question_item("How big is it?"),
        ]
    }
    assert context_questions(context, QA) == ["What is box 1?", "How big is it?"]


def test_a_flood_of_questions_is_cut_to_the_newest_and_logged(caplog):
    """Label Studio resends every earlier question; a body may hold 400k of them: the newest
    MAX_QUESTIONS are answered, the rest dropped with a WARNING, a huge one is not asked."""
    from backend.region_qa import MAX_QUESTION_CHARS, MAX_QUESTIONS

    texts = [f"What colour is box {k % 2 + 1}?" for k in range(5000)] + ["What is box 2?"]
    with caplog.at_level("WARNING", logger="backend.region_qa"):
        found = context_questions({"result": [question_item(*texts)]}, QA)
    assert len(found) == len(texts) and found[-1] == "What is box 2?"
    assert any(r.getMessage() == "region questions dropped" for r in caplog.records)
    turns = plan_turns(found, REGIONS)
    assert len(turns) == len(texts)  # one answer line per question, in order
    asked = [t for t in turns if t.asked is not None]
    assert len(asked) == MAX_QUESTIONS and asked[-1].kind == "caption"
    assert "only the newest" in (turns[0].reason or "")
    (turn,) = plan_turns(["What is box 1? " + "x" * MAX_QUESTION_CHARS], REGIONS)
    assert turn.asked is None and "longer than" in (turn.reason or "")


class RecordingEngine(InferenceEngine):
    """A real engine that keeps the questions it was asked."""

    asked: list[str]

    def answer(self, images, boxes, queries, masks=None):
        self.asked = [*getattr(self, "asked", []), *(q for _, q in queries)]
        self.masks = masks
        return super().answer(images, boxes, queries, masks)


def test_interactive_request_answers_typed_questions_in_the_answer_area(tiny_checkpoint):
    engine = RecordingEngine(load_model(tiny_checkpoint), "1.0.0", max_new_tokens=4)
    sc = scene(5)
    rects = [ls_rect(f"n{k}", o.box, sc.width, sc.height) for k, o in enumerate(sc.objects)]
    turns = [
        "What colour is box 3?",
        "And what shape is it?",
        "Where is box 1 relative to box 3?",
        "What is box 1 doing?",
    ]
    context = {"result": [*rects, question_item(*turns)]}
    (pred,), _ = predict_tasks(
        [ls_task(7, "img")],
        QA,
        context,
        engine,
        "1.0.0",
        DictFetcher({"img": sc.image}),
        replace(SETTINGS, max_new_tokens=4),
    )
    (answer,) = [r for r in pred["result"] if r["from_name"] == "answer"]
    assert {k: answer[k] for k in ("id", "to_name", "type")} == {
        "id": "answer-7",
        "to_name": "image",
        "type": "textarea",
    }
    lines = answer["value"]["text"]
    assert len(lines) == 4 and lines[3] == CANNOT_ANSWER and 0 <= answer["score"] <= 1
    # box 3 is the newest (the plan puts it first); the model is asked about it by drawing order
    assert engine.asked[-5:] == [
        canonical_question("color", [2]),
        canonical_question("shape", [2]),
        canonical_question("relation", [0, 2]),
        canonical_question("caption", [0]),  # the presence check of every box asked beyond its caption
        canonical_question("caption", [2]),
    ]
    assert {r["id"] for r in pred["result"] if r["from_name"] != "answer"} == {"n2"}


def test_a_question_about_an_empty_box_is_answered_no_object(caplog):
    """The shipped default, a box drawn on empty background: asked its colour, the backend answers
    ``no object`` (the box named in the log) instead of the colour of the canvas."""
    from model.checkpoint import DEFAULT_DIR
    from model.tasks import NO_OBJECT
    from tests.test_describe import empty_box

    sc = scene(5)
    obj = sc.objects[0]
    rects = [
        ls_rect("obj", obj.box, sc.width, sc.height),
        ls_rect("empty", empty_box(sc, min(sc.width, sc.height) * 0.2), sc.width, sc.height),
    ]
    questions = ["What colour is box 2?", "Where is box 1 relative to box 2?", "What colour is box 1?"]
    context = {"result": [*rects, question_item(*questions)]}
    engine = InferenceEngine(load_model(DEFAULT_DIR), "d")
    with caplog.at_level("INFO", logger="backend.region_qa"):
        (pred,), _ = predict_tasks(
            [ls_task(8, "img")], QA, context, engine, "d", DictFetcher({"img": sc.image}), SETTINGS
        )
    (answer,) = [r for r in pred["result"] if r["from_name"] == "answer"]
    assert answer["value"]["text"] == [NO_OBJECT, NO_OBJECT, obj.color]
    logged = [r for r in caplog.records if r.getMessage() == "region question about an empty box"]
    assert [r.empty_boxes for r in logged] == [[2], [2]]
