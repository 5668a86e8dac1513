"""Tasks -> boxes -> batched describe -> Label Studio results (shapes of protocol §1.7)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

import backend.predictions as predictions
from backend.images import ImageError
from backend.label_config import parse_label_config
from backend.predictions import PredictionError, Skip, plan_task, predict_tasks
from backend.settings import Settings
from model.checkpoint import load_model
from model.geometry import BoxError, check_pixel_box, pixels_to_percent
from model.inference.describe import ImageReport, RegionReport, RelationReport
from model.inference.engine import Answer, InferenceEngine
from model.inference.image_input import EncodedImage
from model.tasks import caption_text, relation_labels
from tests.model_helpers import png_bytes
from toyworld.scenes import SceneSpec, make_scene

CONFIGS = Path(__file__).resolve().parents[1] / "label_config"
SETTINGS = Settings(max_regions=6, max_relation_regions=8)


def config(name: str):
    return parse_label_config((CONFIGS / f"{name}.xml").read_text())


class DictFetcher:
    """Stands in for ImageFetcher: image references are keys of a dict; images are served as
    PNG files (lossless), as a server receives them."""

    def __init__(self, images: dict[str, Image.Image]) -> None:
        self.images = images
        self.calls: list[str] = []

    def fetch_encoded(self, ref, task_id=None) -> EncodedImage:
        self.calls.append(ref)
        if ref not in self.images:  # as Label Studio answers a missing upload
            raise ImageError(f"image URL {ref} answered HTTP 404 (task {task_id})", 422)
        return EncodedImage(png_bytes(self.images[ref]))


def scene(seed: int):
    return make_scene(random.Random(seed), SceneSpec(min_objects=3, max_objects=3))


def ls_rect(rid: str, box, w: int, h: int, label: str = "Object") -> dict:
    """A rectangle result as Label Studio stores it."""
    value = {**pixels_to_percent(box, w, h), "rotation": 0, "rectanglelabels": [label]}
    return {
        "id": rid,
        "from_name": "bbox",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": value,
        "origin": "manual",
    }


def ls_task(task_id: int, image: str, **extra) -> dict:
    """A task as Label Studio 1.23 sends it in a batch /predict."""
    task = {
        "id": task_id,
        "data": {"image": image},
        "meta": {},
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "is_labeled": False,
        "overlap": 1,
        "inner_id": task_id,
        "total_annotations": 0,
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "project": 1,
        "file_upload": "x.png",
        "annotations": [],
        "predictions": [],
    }
    task.update(extra)
    return task


class OracleDescribe:
    """Fake describe_regions that answers from the true scene objects matched by box position."""

    def __init__(self, scenes: dict[tuple, object]) -> None:
        self.scenes = scenes  # image size -> scene
        self.calls: list[dict] = []

    def __call__(self, engine, images, boxes, **kw):
        seen = [row for b in boxes for row in b.tolist()]
        self.calls.append({"images": len(images), "boxes": [len(b) for b in boxes], "boxes_seen": seen, **kw})
        reports = []
        for i, (image, b) in enumerate(zip(images, boxes)):
            sc = self.scenes[image.size]
            w, h = image.size
            objs = [self._match(sc, row, w, h) for row in b.tolist()]
            focus = range(len(objs)) if not kw.get("only") or kw["only"][i] is None else kw["only"][i]
            regions = [RegionReport(None) for _ in objs]
            for k in focus:
                o = objs[k]
                regions[k].caption = Answer(caption_text(o.size, o.color, o.shape), 0.9, 5)
                regions[k].attributes = {a: Answer(getattr(o, a), 0.8, 1) for a in kw["attributes"]}
            rels = []
            if kw["relations"]:
                for a in range(len(objs)):
                    for c in range(len(objs)):
                        if a != c and (a in focus or c in focus):
                            labels = relation_labels(objs[a].box, objs[c].box, w, h)
                            rels.append(
                                RelationReport(a, c, labels, Answer(", ".join(labels) or "near", 0.7, 3))
                            )
            reports.append(ImageReport(regions, rels))
        return reports

    @staticmethod
    def _match(sc, row, w, h):
        cx, cy = (row[0] + row[2]) / 2 * w, (row[1] + row[3]) / 2 * h
        return min(
            sc.objects,
            key=lambda o: ((o.box[0] + o.box[2]) / 2 - cx) ** 2 + ((o.box[1] + o.box[3]) / 2 - cy) ** 2,
        )


@pytest.fixture()
def two_scenes(monkeypatch):
    scenes = [scene(1), scene(2)]
    assert scenes[0].image.size != scenes[1].image.size
    oracle = OracleDescribe({s.image.size: s for s in scenes})
    monkeypatch.setattr(predictions, "describe_regions", oracle)
    fetcher = DictFetcher({f"/data/upload/1/s{i}.png": s.image for i, s in enumerate(scenes)})
    return scenes, oracle, fetcher


def by_id(results: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["id"], r["from_name"]): r for r in results if r.get("type") != "relation"}


def test_batch_from_annotations_attaches_caption_and_attributes_to_box_ids(two_scenes):
    scenes, oracle, fetcher = two_scenes
    tasks = []
    for i, sc in enumerate(scenes):
        result = [ls_rect(f"t{i}o{k}", o.box, sc.width, sc.height) for k, o in enumerate(sc.objects)]
        ann = {"id": 10 + i, "result": result, "was_cancelled": False, "created_at": "2026-01-02T00:00:00Z"}
        tasks.append(ls_task(i + 1, f"/data/upload/1/s{i}.png", annotations=[ann]))
    cfg = config("caption_attributes")
    results, stats = predict_tasks(tasks, cfg, None, None, "1.2.0", fetcher, SETTINGS)
    assert len(oracle.calls) == 1 and oracle.calls[0]["images"] == 2  # one batched call for all tasks
    assert oracle.calls[0]["attributes"] == ("color", "shape", "size") and oracle.calls[0]["only"] is None
    assert stats.regions == 6 and stats.sources == {"annotation": 2}
    for i, sc in enumerate(scenes):
        pred = results[i]
        assert pred["model_version"] == "1.2.0" and 0 < pred["score"] <= 1
        items = by_id(pred["result"])
        for k, obj in enumerate(sc.objects):
            rid = f"t{i}o{k}"
            rect = items[(rid, "bbox")]
            src = tasks[i]["annotations"][0]["result"][k]
            assert rect["value"] == {**src["value"]} and rect["type"] == "rectanglelabels"
            cap = items[(rid, "caption")]
            assert cap["type"] == "textarea" and cap["value"]["text"] == [obj.caption]
            assert {k2: cap["value"][k2] for k2 in ("x", "y", "width", "height")} == {
                k2: src["value"][k2] for k2 in ("x", "y", "width", "height")
            }
            assert (cap["original_width"], cap["original_height"]) == (sc.width, sc.height)
            for attr in ("color", "shape", "size"):
                assert items[(rid, attr)]["value"]["choices"] == [getattr(obj, attr)]
                assert items[(rid, attr)]["type"] == "choices"


def test_relations_use_config_labels_and_box_ids(two_scenes):
    scenes, _, fetcher = two_scenes
    sc = scenes[0]
    xml = (CONFIGS / "caption_relations.xml").read_text().replace('value="left of"', 'value="left_of"')
    cfg = parse_label_config(xml)
    boxes = [list(o.box) for o in sc.objects]
    results, _ = predict_tasks(
        [ls_task(1, "/data/upload/1/s0.png", data={"image": "/data/upload/1/s0.png", "boxes": boxes})],
        cfg,
        None,
        None,
        "v",
        fetcher,
        SETTINGS,
    )
    rels = [r for r in results[0]["result"] if r["type"] == "relation"]
    ids = [f"box{k + 1}" for k in range(3)]
    expected = {}
    for a in range(3):
        for c in range(3):
            labels = relation_labels(sc.objects[a].box, sc.objects[c].box, sc.width, sc.height)
            if a != c and labels:
                expected[(ids[a], ids[c])] = ["left_of" if x == "left of" else x for x in labels]
    assert {(r["from_id"], r["to_id"]): r["labels"] for r in rels} == expected
    assert all(r["direction"] == "right" for r in rels)
    # data.boxes in pixels -> percent geometry computed from the image size
    rect = by_id(results[0]["result"])[("box1", "bbox")]
    assert rect["value"]["x"] == pytest.approx(boxes[0][0] / sc.width * 100)
    assert rect["value"]["rectanglelabels"] == ["Object"]


def test_relation_text_fallback(two_scenes):
    scenes, _, fetcher = two_scenes
    xml = (
        (CONFIGS / "region_caption.xml")
        .read_text()
        .replace("</View>\n", '<TextArea name="relations" toName="image" rows="4"/></View>\n')
    )
    cfg = parse_label_config(xml)
    sc = scenes[0]
    task = ls_task(
        1,
        "/data/upload/1/s0.png",
        data={"image": "/data/upload/1/s0.png", "boxes": [list(o.box) for o in sc.objects]},
    )
    results, _ = predict_tasks([task], cfg, None, None, "v", fetcher, SETTINGS)
    (text,) = [r for r in results[0]["result"] if r["from_name"] == "relations"]
    assert text["type"] == "textarea" and len(text["value"]["text"]) == 6
    assert "x" not in text["value"]  # not a per-region result


def test_interactive_describes_only_the_newest_box(two_scenes):
    scenes, oracle, fetcher = two_scenes
    sc = scenes[1]
    ctx = {"result": [ls_rect(f"u{k}", o.box, sc.width, sc.height) for k, o in enumerate(sc.objects)]}
    task = ls_task(2, "/data/upload/1/s1.png", drafts=[], allow_skip=True)
    cfg = config("caption_relations")
    results, stats = predict_tasks([task], cfg, ctx, None, "v", fetcher, SETTINGS)
    assert oracle.calls[-1]["only"] == [[0]]  # the newest box is moved first and is the only one asked
    items = results[0]["result"]
    regions = {r["id"] for r in items if r["type"] != "relation"}
    assert regions == {"u2"} and stats.regions == 1
    assert by_id(items)[("u2", "caption")]["value"]["text"] == [sc.objects[2].caption]
    for r in (r for r in items if r["type"] == "relation"):
        assert "u2" in (r["from_id"], r["to_id"])


def test_source_priority(two_scenes):
    scenes, _, _ = two_scenes
    sc = scenes[0]
    w, h = sc.width, sc.height
    cfg = config("region_caption")
    old = {"id": 1, "result": [ls_rect("old", sc.objects[0].box, w, h)], "created_at": "2026-01-01T00:00:00Z"}
    new_draft = {
        "id": 2,
        "result": [ls_rect("draft", sc.objects[1].box, w, h)],
        "created_at": "2026-01-03T00:00:00Z",
    }
    cancelled = {
        "id": 3,
        "result": [ls_rect("cancel", sc.objects[2].box, w, h)],
        "was_cancelled": True,
        "created_at": "2026-01-09T00:00:00Z",
    }
    pred = {
        "id": 4,
        "result": [ls_rect("pred", sc.objects[2].box, w, h)],
        "created_at": "2026-01-05T00:00:00Z",
    }
    task = ls_task(
        1,
        "img",
        annotations=[old, cancelled],
        drafts=[new_draft],
        predictions=[pred],
        data={"image": "img", "boxes": [[1, 1, 5, 5]]},
    )
    assert [r.id for r in plan_task(task, cfg, None, SETTINGS).regions] == ["draft"]
    task["drafts"] = []
    assert [r.id for r in plan_task(task, cfg, None, SETTINGS).regions] == ["old"]
    task["annotations"] = []
    assert [r.id for r in plan_task(task, cfg, None, SETTINGS).regions] == ["pred"]
    task["predictions"] = []
    plan = plan_task(task, cfg, None, SETTINGS)
    assert plan.source == "data" and plan.regions[0].pixels == (1, 1, 5, 5)
    ctx = {"result": [ls_rect("ctx", sc.objects[0].box, w, h)]}
    assert [r.id for r in plan_task(task, cfg, ctx, SETTINGS).regions] == ["ctx"]


def test_task_without_boxes_gets_no_prediction(two_scenes):
    """``[]`` for the task: Label Studio 1.23.2 stores nothing for it (a ``{"result": []}`` would be
    stored and never asked again; tests/test_e2e_ls_failures.py proves both against the real one)."""
    _, oracle, fetcher = two_scenes
    skips: list[Skip] = []
    results, stats = predict_tasks(
        [ls_task(1, "/data/upload/1/s0.png")], config("region_caption"), None, None, "v", fetcher, SETTINGS,
        skips.append,
    )  # fmt: skip
    assert results == [[]] and oracle.calls == [] and fetcher.calls == []
    assert (stats.tasks, stats.skipped_tasks) == (0, 1)
    (skip,) = skips
    assert (skip.task, skip.region, skip.code, skip.error) == (1, None, "no_boxes", None)
    assert "task 1 has no boxes" in skip.reason


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda t, c: t["data"].pop("image"), "no image"),
        (lambda t, c: t["data"].update(boxes=[[0, 0, 0, 10]]), "zero or negative area"),
        (lambda t, c: t["data"].update(boxes=[[float("nan"), 0, 5, 10]]), "NaN"),
        (lambda t, c: t["data"].update(boxes=[[5000, 5000, 6000, 6000]]), "outside"),
        (lambda t, c: t["data"].update(boxes=[[0, 0, 5, 5]] * 7), "at most 6"),
        (lambda t, c: t["data"].update(boxes=[{"x": "a", "y": 1, "width": 2, "height": 3}]), "number"),
        (lambda t, c: t["data"].update(boxes=[[1, 2, 3]]), "4 numbers"),
        (lambda t, c: t["data"].update(boxes="nope"), "list"),
    ],
)
def test_bad_boxes_are_clear_4xx(two_scenes, mutate, needle):
    _, _, fetcher = two_scenes
    task = ls_task(9, "/data/upload/1/s0.png")
    task["data"]["boxes"] = [[1, 1, 20, 20]]
    mutate(task, None)
    with pytest.raises(PredictionError) as info:
        predict_tasks([task], config("region_caption"), None, None, "v", fetcher, SETTINGS)
    assert info.value.status == 400 and needle in info.value.message


def regions_of(prediction: dict) -> set[str]:
    return {r["id"] for r in prediction["result"] if r.get("type") != "relation"}


def test_one_bad_box_never_sinks_the_batch(two_scenes):
    """Bad boxes are left out of their task, tasks without a usable box or image get no prediction,
    every other task and box is answered; each one left out is reported with its reason."""
    scenes, oracle, fetcher = two_scenes
    sc = scenes[0]
    w, h = sc.width, sc.height
    good = [ls_rect(f"g{k}", o.box, w, h) for k, o in enumerate(sc.objects)]
    zero = ls_rect("zero", (10, 10, 10, 40), w, h)
    outside = {**ls_rect("outside", (0, 0, 10, 10), w, h)}
    outside["value"] = {**outside["value"], "x": 150.0}
    tiny = ls_rect("tiny", (5, 5, 7, 30), w, h)  # 2 px wide < MIN_BOX_PX 4
    nan = ls_rect("nan", (1, 1, 9, 9), w, h)
    nan["value"] = {**nan["value"], "y": float("nan")}
    malformed = {**ls_rect("malformed", (1, 1, 9, 9), w, h), "value": {"x": 1}}

    def annotated(task_id: int, result: list[dict], image: str = "/data/upload/1/s0.png") -> dict:
        ann = {"id": task_id * 10, "result": result, "created_at": "2026-01-02T00:00:00Z"}
        return ls_task(task_id, image, annotations=[ann])

    tasks = [
        annotated(1, good),
        annotated(2, [good[0], zero, outside, tiny, nan, malformed, good[1]]),
        annotated(3, [zero]),
        annotated(4, good, image="/data/upload/1/missing.png"),
        ls_task(5, "/data/upload/1/s1.png"),  # boxes only in a draft Label Studio did not send
    ]
    skips: list[Skip] = []
    results, stats = predict_tasks(
        tasks, config("region_caption"), None, None, "v", fetcher, SETTINGS, skips.append
    )
    assert regions_of(results[0]) == {"g0", "g1", "g2"}
    assert regions_of(results[1]) == {"g0", "g1"}
    assert results[2:] == [[], [], []]
    assert (stats.tasks, stats.regions, stats.skipped_tasks, stats.skipped_regions) == (2, 5, 3, 6)
    found = {(s.task, s.region): s for s in skips}
    expected = {
        (2, "zero"): ("zero_area", "zero or negative area"),
        (2, "outside"): ("outside_image", "outside"),
        (2, "tiny"): ("tiny_box", "4-pixel minimum"),
        (2, "nan"): ("not_finite", "NaN"),
        (2, "malformed"): ("bad_region", "lacks"),
        (3, "zero"): ("zero_area", "zero or negative area"),
        (3, None): ("no_usable_box", "zero or negative area"),
        (4, None): ("image", "HTTP 404"),
        (5, None): ("no_boxes", "no boxes"),
    }
    assert set(found) == set(expected)
    for key, (code, needle) in expected.items():
        assert found[key].code == code and needle in found[key].reason, found[key]
        assert f"task {key[0]}" in found[key].reason
        if key[1] is not None:
            assert key[1] in found[key].reason
    assert found[(5, None)].error is None  # nothing wrong: no prediction, no fault
    assert isinstance(found[(4, None)].error, ImageError) and found[(4, None)].error.task == 4
    assert sum(c["images"] for c in oracle.calls) == 2


def test_box_partly_outside_is_clipped_and_described(two_scenes):
    scenes, oracle, fetcher = two_scenes
    sc = scenes[0]
    w, h = sc.width, sc.height
    obj = sc.objects[0]
    over = (obj.box[0] - 500, obj.box[1] - 500, obj.box[2], obj.box[3])  # overhangs the top left
    task = ls_task(1, "/data/upload/1/s0.png", data={"image": "/data/upload/1/s0.png", "boxes": [list(over)]})
    results, stats = predict_tasks([task], config("region_caption"), None, None, "v", fetcher, SETTINGS)
    assert stats.clipped == 1 and stats.regions == 1
    (boxes,) = oracle.calls[-1]["boxes_seen"]  # the model is handed the clipped box
    assert boxes == pytest.approx([0.0, 0.0, obj.box[2] / w, obj.box[3] / h])
    rect = by_id(results[0]["result"])[("box1", "bbox")]  # the box as it was given: same id, same geometry
    expected = pixels_to_percent(over, w, h)
    for key in ("x", "y", "width", "height"):
        assert rect["value"][key] == pytest.approx(expected[key])


def test_min_box_px_is_a_setting(two_scenes):
    _, _, fetcher = two_scenes
    task = ls_task(
        1, "/data/upload/1/s0.png", data={"image": "/data/upload/1/s0.png", "boxes": [[5, 5, 8, 30]]}
    )
    with pytest.raises(PredictionError, match="4-pixel minimum") as info:
        predict_tasks([task], config("region_caption"), None, None, "v", fetcher, SETTINGS)
    assert (info.value.code, info.value.task, info.value.region) == ("no_usable_box", 1, "box1")
    results, stats = predict_tasks(
        [task], config("region_caption"), None, None, "v", fetcher, replace(SETTINGS, min_box_px=2)
    )
    assert regions_of(results[0]) == {"box1"} and stats.skipped_regions == 0


def test_interactive_box_must_be_usable_other_context_boxes_are_skipped(two_scenes):
    scenes, oracle, fetcher = two_scenes
    sc = scenes[1]
    w, h = sc.width, sc.height
    newest = ls_rect("new", sc.objects[0].box, w, h)
    bad = ls_rect("old", (3, 3, 3, 9), w, h)
    task = ls_task(2, "/data/upload/1/s1.png")
    skips: list[Skip] = []
    results, _ = predict_tasks(
        [task],
        config("region_caption"),
        {"result": [bad, newest]},
        None,
        "v",
        fetcher,
        SETTINGS,
        skips.append,
    )
    assert regions_of(results[0]) == {"new"}
    assert [(s.region, s.code) for s in skips] == [("old", "zero_area")]
    skips.clear()
    with pytest.raises(PredictionError, match="the box to describe was skipped") as info:
        predict_tasks(
            [task],
            config("region_caption"),
            {"result": [newest, bad]},
            None,
            "v",
            fetcher,
            SETTINGS,
            skips.append,
        )
    assert info.value.region == "old" and info.value.task == 2
    assert [(s.region, s.code) for s in skips] == [("old", "zero_area"), (None, "no_usable_box")]


def test_request_with_nothing_answerable_is_refused_with_the_first_fault(two_scenes):
    _, _, fetcher = two_scenes
    tasks = [
        ls_task(
            1, "/data/upload/1/gone.png", data={"image": "/data/upload/1/gone.png", "boxes": [[1, 1, 20, 20]]}
        ),
        ls_task(
            2, "/data/upload/1/s0.png", data={"image": "/data/upload/1/s0.png", "boxes": [[1, 1, 1, 20]]}
        ),
        ls_task(3, "/data/upload/1/s0.png"),
    ]
    skips: list[Skip] = []
    with pytest.raises(ImageError, match="HTTP 404") as info:
        predict_tasks(tasks, config("region_caption"), None, None, "v", fetcher, SETTINGS, skips.append)
    assert info.value.task == 1 and info.value.status == 422
    assert [(s.task, s.code) for s in skips if s.region is None] == [
        (1, "image"),
        (2, "no_usable_box"),
        (3, "no_boxes"),
    ]
    results, _ = predict_tasks(tasks[2:], config("region_caption"), None, None, "v", fetcher, SETTINGS)
    assert results == [[]]  # no fault, nothing to answer: not a refusal


def test_unknown_from_name_in_context_rejected(two_scenes):
    _, _, fetcher = two_scenes
    rect = ls_rect("a", (1, 1, 20, 20), 100, 100)
    rect["from_name"] = "label"  # not in the config
    with pytest.raises(PredictionError) as info:
        predict_tasks(
            [ls_task(1, "/data/upload/1/s0.png")],
            config("region_caption"),
            {"result": [rect]},
            None,
            "v",
            fetcher,
            SETTINGS,
        )
    assert "from_name 'label'" in info.value.message


def test_taxonomy_and_values_in_config_only(two_scenes):
    scenes, _, fetcher = two_scenes
    sc = scenes[0]
    xml = (
        '<View><Image name="image" value="$image"/><RectangleLabels name="bbox" toName="image">'
        '<Label value="Object"/></RectangleLabels><Taxonomy name="tax" toName="image" perRegion="true">'
        '<Choice value="Colour">'
        + "".join(f'<Choice value="{o.color}"/>' for o in sc.objects[:1])
        + "</Choice>"
        '<Choice value="Shape"><Choice value="circle"/><Choice value="square"/><Choice value="triangle"/>'
        '<Choice value="diamond"/></Choice></Taxonomy></View>'
    )
    cfg = parse_label_config(xml)
    task = ls_task(
        1,
        "/data/upload/1/s0.png",
        data={"image": "/data/upload/1/s0.png", "boxes": [list(o.box) for o in sc.objects]},
    )
    results, _ = predict_tasks([task], cfg, None, None, "v", fetcher, SETTINGS)
    tax = {r["id"]: r["value"]["taxonomy"] for r in results[0]["result"] if r["type"] == "taxonomy"}
    first = sc.objects[0]
    assert tax["box1"] == [["Colour", first.color], ["Shape", first.shape]]
    for k, obj in enumerate(sc.objects[1:], start=2):
        expected = ([["Colour", obj.color]] if obj.color == first.color else []) + [["Shape", obj.shape]]
        assert tax[f"box{k}"] == expected  # colours the config does not declare are never returned


def test_with_a_real_engine_one_encode_per_image(tiny_checkpoint):
    """Real (random) tiny model: result shapes hold, and a second box on a seen image hits the cache."""
    engine = InferenceEngine(load_model(tiny_checkpoint), "1.0.0", max_new_tokens=4)
    sc = scene(3)
    fetcher = DictFetcher({"img": sc.image})
    cfg = config("caption_attributes")
    rects = [ls_rect(f"n{k}", o.box, sc.width, sc.height) for k, o in enumerate(sc.objects)]
    settings = replace(SETTINGS, max_new_tokens=4)
    first, _ = predict_tasks(
        [ls_task(1, "img")], cfg, {"result": rects[:1]}, engine, "1.0.0", fetcher, settings
    )
    assert engine.stats.image_cache_misses == 1
    second, _ = predict_tasks(
        [ls_task(1, "img")], cfg, {"result": rects[:2]}, engine, "1.0.0", fetcher, settings
    )
    assert engine.stats.image_cache_misses == 1 and engine.stats.image_cache_hits == 1
    for pred, rid in ((first[0], "n0"), (second[0], "n1")):
        assert {r["id"] for r in pred["result"]} == {rid}
        assert isinstance(pred["score"], float)
        caption = by_id(pred["result"])[(rid, "caption")]
        assert isinstance(caption["value"]["text"][0], str) and caption["score"] >= 0


@pytest.mark.parametrize(
    "box, kind",
    [
        ((1, 1, float("inf"), 5), "not_finite"),
        ((10, 10, 10, 40), "zero_area"),
        ((10, 10, 5, 40), "zero_area"),
        ((400, 0, 500, 50), "outside_image"),
        ((0, 0, 3, 50), "tiny"),
        ((-10, 0, 2, 50), "tiny"),  # 12 px wide, 2 px of it inside the image
        ((1, 2, 3), "invalid"),
    ],
)
def test_check_pixel_box_names_why_a_box_is_unusable(box, kind):
    with pytest.raises(BoxError) as info:
        check_pixel_box(box, 320, 180, min_side=4)
    assert info.value.kind == kind


def test_check_pixel_box_min_side_counts_the_part_inside_and_messages_round():
    assert check_pixel_box((-10, 0, 4, 50), 320, 180, min_side=4) == (0.0, 0.0, 4.0, 50.0)
    with pytest.raises(BoxError, match=r"box \[10.0, 10.0, 10.0, 40.0\] has zero or negative area"):
        check_pixel_box((9.999999999999998 + 1e-15, 10, 9.999999999999998 + 1e-15, 40), 320, 180)


# ---------------------------------------------------------------------- the app: logged, counted, answered
@pytest.fixture()
def app_client(tmp_path, tiny_checkpoint):
    from backend.app import create_app
    from backend.serving import ModelHolder
    from tests.test_backend_app import make_settings

    settings = make_settings(tmp_path, tiny_checkpoint)
    return create_app(settings, ModelHolder(settings)).test_client()


@pytest.fixture()
def json_lines():
    """The ``backend`` loggers' records as the JSON lines the app writes."""
    import logging

    from backend.observability import JsonFormatter

    lines: list[dict] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(JsonFormatter().format(record)))

    handler = Capture()
    logging.getLogger("backend").addHandler(handler)
    yield lines
    logging.getLogger("backend").removeHandler(handler)


def metric_value(client, name: str, **labels: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_app_logs_and_counts_every_box_and_task_it_leaves_out(app_client, json_lines):
    from tests.test_backend_app import SCENE, detail, predict_payload, rect
    from tests.test_backend_app import ls_task as app_task

    good = rect("good", SCENE.objects[0].box)
    tasks = [
        app_task(1, [good, rect("zero", (10, 10, 10, 30)), rect("tiny", (5, 5, 7, 30))]),
        app_task(2, [rect("lone", (5, 5, 40, 5))]),
        app_task(3, [good], image="/data/upload/1/never.png"),  # no LABEL_STUDIO_URL: refused
        app_task(4),
    ]
    resp = app_client.post("/predict", json=predict_payload(tasks))
    assert resp.status_code == 200, resp.data[:300]
    results = resp.get_json()["results"]
    assert regions_of(results[0]) == {"good"} and results[1:] == [[], [], []]
    skipped = [r for r in json_lines if r["message"] in ("region skipped", "task skipped")]
    assert [(r["message"], r["task"], r["region"], r["code"]) for r in skipped] == [
        ("region skipped", 1, "zero", "zero_area"),
        ("region skipped", 1, "tiny", "tiny_box"),
        ("region skipped", 2, "lone", "zero_area"),
        ("task skipped", 2, None, "no_usable_box"),
        ("task skipped", 3, None, "image"),
        ("task skipped", 4, None, "no_boxes"),
    ]
    assert all(r["level"] == "WARNING" and r["project"] == 1 and r["reason"] for r in skipped)
    assert metric_value(app_client, "roi_regions_skipped_total", reason="zero_area") == 2
    assert metric_value(app_client, "roi_regions_skipped_total", reason="tiny_box") == 1
    assert metric_value(app_client, "roi_tasks_skipped_total", reason="image") == 1
    assert metric_value(app_client, "roi_image_errors_total") == 1
    (predicted,) = [r for r in json_lines if r["message"] == "predicted"]
    assert (predicted["tasks"], predicted["skipped_tasks"], predicted["skipped_regions"]) == (1, 3, 3)

    # Nothing answerable and a fault: refused with the first fault, its task and region in the log.
    json_lines.clear()
    resp = app_client.post("/predict", json=predict_payload([app_task(7, [rect("z", (10, 10, 10, 30))])]))
    assert resp.status_code == 400 and "zero or negative area" in detail(resp)
    (refused,) = [r for r in json_lines if r["message"] == "refused"]
    assert (refused["project"], refused["task"], refused["region"], refused["code"]) == (
        1,
        7,
        "z",
        "no_usable_box",
    )
    assert refused["reason"] == detail(resp) and refused["level"] == "WARNING"
    assert metric_value(app_client, "roi_refusals_total", endpoint="/predict", reason="no_usable_box") == 1


def test_app_setup_answers_the_mapping_and_warnings_and_logs_them(app_client, json_lines):
    xml = (CONFIGS / "unknown_choices.xml").read_text()
    payload = {"project": "12.1795583044", "schema": xml, "hostname": "http://ls", "access_token": "t"}
    resp = app_client.post("/setup", json=payload)
    body = resp.get_json()
    cfg = parse_label_config(xml)
    assert resp.status_code == 200 and body["model_version"] == "1.0.0"
    assert (
        body["mapping"] == cfg.summary() and body["warnings"] == list(cfg.warnings) and len(cfg.warnings) == 4
    )
    warned = [r for r in json_lines if r["message"] == "label config warning"]
    assert [r["reason"] for r in warned] == list(cfg.warnings)
    assert all(r["level"] == "WARNING" and r["project"] == 12 for r in warned)
    nothing = '<View><Image name="i" value="$image"/><RectangleLabels name="b" toName="i"/></View>'
    refused = app_client.post("/setup", json={**payload, "schema": nothing})
    assert refused.status_code == 400
    (line,) = [r for r in json_lines if r["message"] == "refused"]
    assert (
        line["project"] == 12
        and line["code"] == "label_config"
        and "nothing for the backend" in line["reason"]
    )
    assert metric_value(app_client, "roi_refusals_total", endpoint="/setup", reason="label_config") == 1


def test_app_webhook_refusal_names_project_task_and_is_counted(app_client, json_lines):
    from tools.ls.payloads import annotation_payload, region_items, timestamp

    items = region_items("r1", (10, 10, 40, 40), 100, 100, "x" * 3000)  # over MAX_TEXT_CHARS (2000)
    resp = app_client.post(
        "/webhook", json=annotation_payload(5, items, timestamp(1), project_id=3, task_id=9)
    )
    assert resp.status_code == 422 and resp.get_json()["code"] == "correction"
    (line,) = [r for r in json_lines if r["message"] == "webhook refused"]
    assert (line["level"], line["project"], line["task"], line["annotation"]) == ("WARNING", 3, 9, 5)
    assert line["reason"] == resp.get_json()["detail"] and "MAX_TEXT_CHARS" in line["reason"]
    assert metric_value(app_client, "roi_refusals_total", endpoint="/webhook", reason="correction") == 1


def test_controls_shown_only_for_some_labels_are_filled_only_there(two_scenes):
    """``whenLabelValue="Car"``: Label Studio shows the colour only on Car boxes; a value on a Person
    box would be submitted without the annotator ever seeing it."""
    scenes, _, fetcher = two_scenes
    sc = scenes[0]
    xml = (CONFIGS / "caption_attributes.xml").read_text()
    xml = xml.replace(
        '<Choices name="color" toName="image"', '<Choices name="color" toName="image" whenLabelValue="Car"'
    )
    cfg = parse_label_config(xml)
    assert any('whenLabelValue="Car"' in w and "filled only there" in w for w in cfg.warnings)
    labels = ["Car", "Person", "Car"]
    result = [ls_rect(f"o{k}", o.box, sc.width, sc.height, labels[k % 3]) for k, o in enumerate(sc.objects)]
    ann = {"id": 10, "result": result, "was_cancelled": False, "created_at": "2026-01-02T00:00:00Z"}
    results, _ = predict_tasks(
        [ls_task(1, "/data/upload/1/s0.png", annotations=[ann])], cfg, None, None, "1", fetcher, SETTINGS
    )
    items = by_id(results[0]["result"])
    for k in range(len(sc.objects)):
        assert ((f"o{k}", "color") in items) == (labels[k % 3] == "Car")
        assert (f"o{k}", "shape") in items and (f"o{k}", "caption") in items  # unconditional controls


def test_labels_beside_a_label_less_rectangle_are_kept_and_read_by_conditions(two_scenes):
    """``<Labels>`` + ``<Rectangle>``: Label Studio stores a region as a ``rectangle`` item and a
    ``labels`` item with the same id.  The prediction keeps the labels item (accepting it must not
    drop "Car") and ``whenLabelValue`` reads it; the labels are never predicted."""
    scenes, _, fetcher = two_scenes
    sc = scenes[0]
    xml = (CONFIGS / "caption_attributes.xml").read_text()
    xml = xml.replace(
        '<RectangleLabels name="bbox" toName="image" smart="true" strokeWidth="2">\n'
        '    <Label value="Object" background="#1f77b4"/>\n  </RectangleLabels>',
        '<Labels name="kind" toName="image"><Label value="Car"/><Label value="Person"/></Labels>'
        '<Rectangle name="bbox" toName="image"/>',
    ).replace(
        '<Choices name="color" toName="image"', '<Choices name="color" toName="image" whenLabelValue="Car"'
    )
    cfg = parse_label_config(xml)
    assert cfg.label_controls == {"kind"} and cfg.rect("bbox").type == "rectangle"
    assert any('name="kind"' in w and "kept in its prediction" in w for w in cfg.warnings)
    result, kinds = [], ["Car", "Person", None]
    for k, o in enumerate(sc.objects):
        rect = ls_rect(f"o{k}", o.box, sc.width, sc.height)
        rect["type"], rect["value"] = (
            "rectangle",
            {x: v for x, v in rect["value"].items() if x != "rectanglelabels"},
        )
        result.append(rect)
        if kinds[k % 3]:
            result.append({**rect, "from_name": "kind", "type": "labels",
                           "value": {**rect["value"], "labels": [kinds[k % 3]]}})  # fmt: skip
    ann = {"id": 10, "result": result, "was_cancelled": False, "created_at": "2026-01-02T00:00:00Z"}
    results, _ = predict_tasks(
        [ls_task(1, "/data/upload/1/s0.png", annotations=[ann])], cfg, None, None, "1", fetcher, SETTINGS
    )
    items = by_id(results[0]["result"])
    for k in range(len(sc.objects)):
        kind = kinds[k % 3]
        assert "rectanglelabels" not in items[(f"o{k}", "bbox")]["value"]
        if kind is None:
            assert (f"o{k}", "kind") not in items
        else:
            labels = items[(f"o{k}", "kind")]
            assert labels["type"] == "labels" and labels["value"]["labels"] == [kind]
            assert {x: labels["value"][x] for x in ("x", "y", "width", "height")} == {
                x: items[(f"o{k}", "bbox")]["value"][x] for x in ("x", "y", "width", "height")
            }
        assert ((f"o{k}", "color") in items) == (kind == "Car")
        assert (f"o{k}", "caption") in items
