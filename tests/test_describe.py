"""describe_regions on the shipped default: a box on empty background is reported empty, with no
invented attributes or relations, while the objects beside it keep theirs."""

from __future__ import annotations

import random

import pytest

from model.checkpoint import DEFAULT_DIR, load_model
from model.geometry import boxes_tensor
from model.inference.describe import ATTRIBUTES, describe_regions
from model.inference.engine import InferenceEngine
from model.tasks import NO_OBJECT
from toyworld.scenes import SceneSpec, make_scene


def _empty_box(scene, side: float) -> tuple[float, float, float, float]:
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
    boxes = [o.box for o in scene.objects] + [_empty_box(scene, min(scene.width, scene.height) * 0.2)]
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
