"""describe_regions on the shipped default: a box on empty background is reported empty, with no
invented attributes or relations, while the objects beside it keep theirs."""

from __future__ import annotations

import random

import pytest
import torch

from model.checkpoint import DEFAULT_DIR, load_model
from model.geometry import boxes_tensor
from model.inference.describe import ATTRIBUTES, describe_regions
from model.inference.engine import Answer, InferenceEngine
from model.tasks import ATTRIBUTE_QUESTION, CAPTION_QUESTION, NO_OBJECT
from toyworld.scenes import SceneSpec, make_scene


def empty_box(scene, side: float) -> tuple[float, float, float, float]:
    """A ``side``-px square of the scene's background touching no object (first found on a grid)."""
    for y in range(0, int(scene.height - side), 4):
        for x in range(0, int(scene.width - side), 4):
            box = (x, y, x + side, y + side)
            if all(
                box[0] >= o.box[2] or o.box[0] >= box[2] or box[1] >= o.box[3] or o.box[1] >= box[3]
                for o in scene.objects
            ):
                return box
    raise AssertionError("no empty spot")


@pytest.fixture(scope="module")
def case():
    scene = make_scene(random.Random(41), SceneSpec())
    boxes = [o.box for o in scene.objects] + [empty_box(scene, min(scene.width, scene.height) * 0.2)]
    engine = InferenceEngine(load_model(DEFAULT_DIR), "t")
    return scene, boxes_tensor(boxes, scene.width, scene.height), engine


def test_empty_box_gets_no_attributes_or_relations(case):
    scene, boxes, engine = case
    empty = len(boxes) - 1
    (report,) = describe_regions(engine, [scene.image], [boxes])
    region = report.regions[empty]
    assert region.caption is not None and region.caption.text == NO_OBJECT
    assert region.empty and region.attributes == {}
    assert all(empty not in (r.source, r.target) for r in report.relations)
    for obj, other in zip(scene.objects, report.regions):
        assert not other.empty and other.caption.text == obj.caption
        assert set(other.attributes) == set(ATTRIBUTES)
    n = len(scene.objects)
    assert len(report.relations) == n * (n - 1)  # every pair of objects is still asked


def test_presence_is_checked_without_a_caption_question(case):
    """A config with attribute choices only: the caption is asked for the check, not reported."""
    scene, boxes, engine = case
    empty = len(boxes) - 1
    (report,) = describe_regions(engine, [scene.image], [boxes], caption=False, relations=False)
    assert all(r.caption is None for r in report.regions)
    assert report.regions[empty].empty and report.regions[empty].attributes == {}
    assert all(set(r.attributes) == set(ATTRIBUTES) for r in report.regions[:empty])
    (only,) = describe_regions(engine, [scene.image], [boxes], caption=False, attributes=(), relations=False)
    assert only.regions[empty].caption is None and not only.regions[empty].empty  # nothing asked at all


def ATTRIBUTE_QUESTION_OF(kind: str, box: int) -> str:  # noqa: N802 - reads like the template
    return ATTRIBUTE_QUESTION[kind].format(a=f"<region{box}>")


class ScriptedEngine:
    """Answers by question kind; boxes in ``empty`` (0-based) hold nothing.  Keeps every query."""

    def __init__(self, empty: set[int]) -> None:
        self.empty, self.queries = empty, []

    def answer(self, images, boxes, queries, masks=None):
        self.queries += [q for _, q in queries]
        out = []
        for _, q in queries:
            first = int(q.split("<region")[1].split(">")[0]) - 1
            if q == CAPTION_QUESTION.format(a=f"<region{first + 1}>"):
                text = NO_OBJECT if first in self.empty else "a small red circle"
            elif "<region" in q.split(">", 1)[1]:
                text = "left of"
            else:
                text = "red"
            out.append(Answer(text, 0.5 if text == NO_OBJECT else 0.9, 2))
        return out


def _boxes(n: int) -> torch.Tensor:
    return torch.tensor([[0.01 * k, 0.0, 0.01 * k + 0.05, 0.05] for k in range(n)])


def test_only_checks_the_focus_boxes_and_their_relation_partners():
    """A new box (``only``) in an image of 10 boxes: the presence check covers it and the partners
    it is paired with (the first MAX_RELATION_BOXES), a relation to an empty partner is dropped."""
    engine = ScriptedEngine(empty={3})
    (report,) = describe_regions(engine, [None], [_boxes(10)], only=[[1]])
    checked = {q for q in engine.queries if q.startswith("What is")}
    assert checked == {CAPTION_QUESTION.format(a=f"<region{k + 1}>") for k in range(8)}
    assert {(r.source, r.target) for r in report.relations} == {
        p for k in range(8) if k not in (1, 3) for p in ((1, k), (k, 1))
    }
    new = report.regions[1]
    assert new.caption.text == "a small red circle" and set(new.attributes) == set(ATTRIBUTES)
    assert report.regions[3].empty and report.regions[3].caption is None  # a partner: checked, not reported
    assert report.regions[3].presence.text == NO_OBJECT and report.regions[9].presence is None


def test_relations_alone_check_presence_and_scores_count_it():
    engine = ScriptedEngine(empty={0})
    (report,) = describe_regions(engine, [None], [_boxes(3)], caption=False, attributes=())
    assert all(r.caption is None and r.attributes == {} for r in report.regions)
    assert [r.empty for r in report.regions] == [True, False, False]
    assert {(r.source, r.target) for r in report.relations} == {(1, 2), (2, 1)}
    # every answer asked counts in the image's score, the presence checks too: (0.5 + 0.9 * 4) / 5
    assert report.score == pytest.approx((0.5 + 0.9 + 0.9 + 0.9 + 0.9) / 5)


def test_answer_with_presence_checks_the_named_boxes_once_in_one_call():
    """The helper model.predict and the backend's typed questions share: each question's boxes are
    checked, a question about an empty box gets its check's "no object" (and names the box), a
    caption question that is also a check, or a repeated question, is decoded once."""
    from model.inference.describe import answer_with_presence

    engine = ScriptedEngine(empty={1, 2})
    colour = ATTRIBUTE_QUESTION_OF("color", 1)
    relation = "How is <region1> related to <region3>?"
    asked = [(colour, [0]), (relation, [0, 2]), (CAPTION_QUESTION.format(a="<region2>"), [1]),
             (ATTRIBUTE_QUESTION_OF("shape", 2), [1, 1]), (colour, [0]),
             (ATTRIBUTE_QUESTION_OF("size", 3), [])]  # fmt: skip
    out = answer_with_presence(engine, None, _boxes(3), asked)
    assert [(a.text, empty) for a, empty in out] == [
        ("red", []),
        (NO_OBJECT, [2]),
        (NO_OBJECT, [1]),
        (NO_OBJECT, [1]),
        ("red", []),
        ("red", []),
    ]
    assert out[1][0].score == 0.5  # the check's own score
    # 5 distinct questions (box 2's caption among them) + the checks of boxes 1 and 3; box 3 is not
    # checked for the size question that names no refs.
    assert len(engine.queries) == len(set(engine.queries)) == 7


def test_evaluation_counts_what_an_object_called_empty_lost_as_wrong(monkeypatch):
    """score_scenes: an object answered "no object" loses its attributes and relations, and each
    counts as a wrong answer, not as one never asked."""
    import toyworld.evaluate as ev

    scene = make_scene(random.Random(3), SceneSpec())
    n = len(scene.objects)
    truth = ev.score_scenes(ScriptedEngine(empty=set()), [scene])
    lost = ev.score_scenes(ScriptedEngine(empty={0}), [scene])
    assert lost["counts"] == truth["counts"]  # the same questions count
    assert lost["counts"]["relation_questions"] == n * (n - 1)
    assert lost["attribute_accuracy"] < truth["attribute_accuracy"] or truth["attribute_accuracy"] == 0


def test_predict_cli_question_about_an_empty_box_says_no_object(case, tmp_path, capsys):
    """``python -m model.predict`` with a question: a box the model calls empty gets the caption
    question's "no object" (stderr names it), not an invented colour; an object's is answered."""
    from model.predict import main as predict_main

    scene, boxes, _ = case
    path = tmp_path / "scene.png"
    scene.image.save(path)
    pixel_boxes = [o.box for o in scene.objects] + [empty_box(scene, min(scene.width, scene.height) * 0.2)]
    args = [str(path), *(a for b in pixel_boxes for a in ("--box", ",".join(f"{v:.1f}" for v in b)))]
    empty = len(pixel_boxes)
    assert predict_main([*args, f"What colour is <region{empty}>?"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == NO_OBJECT and f"no object in region {empty}" in out.err
    assert predict_main([*args, f"How is <region1> related to <region{empty}>?"]) == 0
    assert capsys.readouterr().out.strip() == NO_OBJECT
    assert predict_main([*args, "What colour is <region1>?"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == scene.objects[0].color and "no object" not in out.err
