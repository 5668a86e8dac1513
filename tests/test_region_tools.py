"""Every Label Studio image region tool: geometry -> pixel box, predictions answering each tool's
region with items of that region, corrections stored from each tool (issue 18, part 3)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import backend.predictions as predictions
from backend.corrections import parse_result
from backend.label_config import ConfigError, parse_label_config
from backend.predicted import region_texts
from backend.predictions import predict_tasks
from backend.region_shapes import ShapeError, region_geometry, region_pixel_box
from model.geometry import (
    KEYPOINT_BOX_FRACTION,
    BoxError,
    RLEError,
    boxes_tensor,
    check_pixel_box,
    ellipse_to_pixels,
    keypoint_to_pixels,
    mask_to_pixels,
    percent_to_pixels,
    polygon_to_pixels,
    rle_decode,
    rotated_rect_to_pixels,
)
from model.inference.engine import InferenceEngine
from model.region_encoder import RegionEncoder, RegionFeatureExtractor, mask_roi_weights
from tests.model_helpers import tiny_model, tiny_records, tiny_region_config
from tests.test_predictions import SETTINGS, DictFetcher, OracleDescribe, ls_rect, ls_task, scene
from tools.ls.region_tools import (
    REGION_TOOLS_CONFIG,
    brush_result,
    ellipse_result,
    keypoint_result,
    polygon_result,
    rle_encode,
    rotated_rectangle_result,
    with_caption,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "brush"


# ---------------------------------------------------------------------- geometry
def test_rotated_rectangle_is_the_box_around_its_rotated_corners():
    # no rotation: exactly the plain conversion
    assert rotated_rect_to_pixels(10, 20, 30, 40, 0, 200, 100) == percent_to_pixels(10, 20, 30, 40, 200, 100)
    assert rotated_rect_to_pixels(10, 20, 30, 40, 360, 200, 100) == percent_to_pixels(
        10, 20, 30, 40, 200, 100
    )
    # 90 degrees clockwise about the top-left corner (20, 20) px: 60 px wide along +y, 40 px tall along -x
    box = rotated_rect_to_pixels(10, 20, 30, 40, 90, 200, 100)
    assert box == pytest.approx((20 - 40, 20, 20, 20 + 60))
    # a 40 px square turned 45 degrees: a diamond hanging from its corner
    d = 40 / math.sqrt(2)
    box = rotated_rect_to_pixels(50, 10, 40, 40, 45, 100, 100)
    assert box == pytest.approx((50 - d, 10, 50 + d, 10 + 2 * d))
    # -90 (counter-clockwise): the width runs up the image
    assert rotated_rect_to_pixels(50, 50, 10, 20, -90, 100, 100) == pytest.approx((50, 40, 70, 50))


def test_polygon_box_and_malformed_polygons():
    points = [[10, 20], [50, 5], [40, 60], [5, 30]]
    assert polygon_to_pixels(points, 200, 100) == pytest.approx((10, 5, 100, 60))
    with pytest.raises(BoxError, match="at least 3"):
        polygon_to_pixels([[1, 1], [2, 2]], 10, 10)
    with pytest.raises(BoxError, match="2 numbers"):
        polygon_to_pixels([[1, 1], [2, 2], [3]], 10, 10)


def test_ellipse_box_follows_rotation():
    # radiusX is in percent of the width, radiusY of the height: 40 x 10 px radii around (100, 50)
    assert ellipse_to_pixels(50, 50, 20, 10, 0, 200, 100) == pytest.approx((60, 40, 140, 60))
    assert ellipse_to_pixels(50, 50, 20, 10, 90, 200, 100) == pytest.approx((90, 10, 110, 90))
    # 45 degrees: half extents sqrt((a^2 + b^2) / 2) both ways
    half = math.sqrt((40**2 + 10**2) / 2)
    assert ellipse_to_pixels(50, 50, 20, 10, 45, 200, 100) == pytest.approx(
        (100 - half, 50 - half, 100 + half, 50 + half)
    )
    # a circle is the same box at any rotation
    assert ellipse_to_pixels(50, 50, 10, 20, 33, 200, 100) == pytest.approx((80, 30, 120, 70))


def test_keypoint_becomes_a_small_square_clipped_to_the_image():
    half = KEYPOINT_BOX_FRACTION * 100 / 2
    assert keypoint_to_pixels(50, 50, 200, 100) == pytest.approx(
        (100 - half, 50 - half, 100 + half, 50 + half)
    )
    # a keypoint drawn larger than the square: its own radius (percent of the width)
    assert keypoint_to_pixels(50, 50, 200, 100, width=10) == pytest.approx((80, 30, 120, 70))
    # on the corner: the square is clipped to the quarter inside the image
    corner = keypoint_to_pixels(0, 0, 200, 100)
    assert check_pixel_box(corner, 200, 100) == pytest.approx((0, 0, half, half))


def rects_mask(h: int, w: int, rects, dots=()) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    for r0, r1, c0, c1 in rects:
        mask[r0:r1, c0:c1] = True
    for r, c in dots:
        mask[r, c] = True
    return mask


def test_rle_decode_reads_label_studios_own_encoder():
    """The fixture was written by label_studio_sdk's encoder (see its ``_how``)."""
    fx = json.loads((FIXTURES / "official_rle.json").read_text())
    expected = rects_mask(fx["height"], fx["width"], fx["paint"], fx["dots"])
    mask = rle_decode(fx["rle"], fx["width"], fx["height"])
    assert mask.dtype == torch.bool and mask.shape == (fx["height"], fx["width"])
    assert np.array_equal(mask.numpy(), expected)
    rows, cols = np.nonzero(expected)
    assert mask_to_pixels(mask) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


@pytest.mark.parametrize("alpha", [255, 1])
def test_rle_decode_round_trip_with_literal_and_long_runs(alpha):
    rng = np.random.default_rng(0)
    mask = rects_mask(300, 260, [(10, 290, 5, 250)])  # runs longer than 2**16 values
    mask[100:120, 40:200] = rng.random((20, 160)) < 0.5  # lone pixels: literal chunks
    rle = rle_encode(mask, alpha=alpha)
    assert np.array_equal(rle_decode(rle, 260, 300).numpy(), mask)


def test_rle_decode_refuses_what_it_cannot_read():
    rle = rle_encode(rects_mask(10, 12, [(2, 5, 3, 9)]))
    with pytest.raises(RLEError, match="holds 480 values, not the 10x10x4"):
        rle_decode(rle, 10, 10)
    with pytest.raises(RLEError, match="ends early"):
        rle_decode(rle[: len(rle) // 2], 12, 10)
    with pytest.raises(RLEError, match="byte values"):
        rle_decode([*rle[:-1], 300], 12, 10)
    with pytest.raises(BoxError, match="paints no pixel") as err:
        mask_to_pixels(torch.zeros(4, 4, dtype=torch.bool))
    assert err.value.kind == "zero_area"


def test_region_pixel_box_for_every_tool_and_brush_scaling():
    w, h, box = 200, 100, (40.0, 20.0, 120.0, 60.0)
    items = [
        polygon_result("p", box, w, h),
        ellipse_result("e", box, w, h),
        ellipse_result("e90", box, w, h, rotation=90),
        rotated_rectangle_result("r", box, w, h),
        ls_rect("plain", box, w, h),
    ]
    for item in items:
        geo = region_geometry(item["type"], item["value"])
        assert region_pixel_box(item["type"], geo, w, h) == pytest.approx(box), item["id"]
    # a brush RLE is in pixels of the image Label Studio annotated; on a twice larger image it scales
    rle = rle_encode(rects_mask(h, w, [(20, 60, 40, 120)]))
    geo = region_geometry("brushlabels", {"format": "rle", "rle": rle, "brushlabels": ["x"]})
    assert region_pixel_box("brushlabels", geo, w, h, (w, h)) == box
    assert region_pixel_box("brushlabels", geo, 2 * w, 2 * h, (w, h)) == tuple(2 * v for v in box)
    kp = keypoint_result("k", (80, 40), w, h)
    half = KEYPOINT_BOX_FRACTION * h / 2
    got = region_pixel_box("keypointlabels", region_geometry("keypointlabels", kp["value"]), w, h)
    assert got == pytest.approx((80 - half, 40 - half, 80 + half, 40 + half))
    # labels and other keys are not geometry
    assert set(region_geometry("polygonlabels", items[0]["value"])) == {"points", "closed"}


@pytest.mark.parametrize(
    "kind, value, needle",
    [
        ("polygonlabels", {"points": [[1, 1], [2, 2]]}, "at least 3"),
        ("polygonlabels", {"points": [[1, 1], [2, "a"], [3, 3]]}, "must be a number"),
        ("ellipselabels", {"x": 1, "y": 1, "radiusX": 2}, "lacks ['radiusY']"),
        ("keypointlabels", {"x": 1}, "lacks ['y']"),
        ("brushlabels", {"format": "png", "rle": [1]}, "format 'rle'"),
        ("brushlabels", {"format": "rle", "rle": [1, -2]}, "byte values"),
        ("rectanglelabels", [1, 2], "must be an object"),
    ],
)
def test_region_geometry_refuses_malformed_values(kind, value, needle):
    with pytest.raises(ShapeError) as err:
        region_geometry(kind, value)
    assert needle in str(err.value)


def test_nan_geometry_is_not_finite():
    geo = region_geometry("polygon", {"points": [[1, 1], [float("nan"), 2], [3, 3]]})
    with pytest.raises(BoxError) as err:
        region_pixel_box("polygon", geo, 10, 10)
    assert err.value.kind == "not_finite"


# ---------------------------------------------------------------------- label config
def test_label_config_accepts_every_region_tool():
    cfg = parse_label_config(REGION_TOOLS_CONFIG)
    assert {(r.name, r.type) for r in cfg.rects} == {
        ("bbox", "rectanglelabels"),
        ("poly", "polygonlabels"),
        ("ellipse", "ellipselabels"),
        ("point", "keypointlabels"),
        ("brush", "brushlabels"),
    }
    assert cfg.warnings == () and cfg.caption == "caption"
    plain = parse_label_config(
        '<View><Image name="img" value="$pic"/><Polygon name="p" toName="img"/>'
        '<KeyPoint name="k" toName="img"/><Brush name="b" toName="img"/>'
        '<TextArea name="t" toName="img" perRegion="true"/></View>'
    )
    assert {(r.name, r.type) for r in plain.rects} == {("p", "polygon"), ("k", "keypoint"), ("b", "brush")}
    with pytest.raises(ConfigError, match="no region control"):
        parse_label_config(
            '<View><Image name="img" value="$pic"/><TextArea name="t" toName="img" perRegion="true"/></View>'
        )


# ---------------------------------------------------------------------- predictions
@pytest.fixture()
def scene_fetch(monkeypatch):
    sc = scene(3)
    oracle = OracleDescribe({sc.image.size: sc})
    monkeypatch.setattr(predictions, "describe_regions", oracle)
    return sc, oracle, DictFetcher({"/data/upload/1/s.png": sc.image})


def brush_mask(sc) -> np.ndarray:
    """The brush of :func:`tool_items`: the scene's third object's box painted, ``(H, W)``."""
    x0, y0, x1, y1 = (int(v) for v in sc.objects[2].box)
    return rects_mask(sc.height, sc.width, [(y0, y1, x0, x1)])


def tool_items(sc) -> tuple[list[dict], list[tuple[float, float, float, float]]]:
    """One region per object, each with another tool, and the pixel box the model should see."""
    w, h = sc.width, sc.height
    boxes = [o.box for o in sc.objects]
    mask = brush_mask(sc)
    cx, cy = (boxes[1][0] + boxes[1][2]) / 2, (boxes[1][1] + boxes[1][3]) / 2
    half = KEYPOINT_BOX_FRACTION * min(w, h) / 2
    items = [
        polygon_result("poly0", boxes[0], w, h),
        keypoint_result("point1", (cx, cy), w, h),
        brush_result("brush2", rle_encode(mask), w, h),
    ]
    seen = [
        tuple(boxes[0]),
        (cx - half, cy - half, cx + half, cy + half),
        (int(boxes[2][0]), int(boxes[2][1]), int(boxes[2][2]), int(boxes[2][3])),
    ]
    return items, seen


def test_prediction_answers_each_tool_with_its_own_region_items(scene_fetch):
    sc, oracle, fetcher = scene_fetch
    items, seen = tool_items(sc)
    items.append(ellipse_result("ell3", sc.objects[0].box, sc.width, sc.height, rotation=90))
    seen.append(tuple(sc.objects[0].box))
    items.append(rotated_rectangle_result("rot4", sc.objects[1].box, sc.width, sc.height))
    seen.append(tuple(sc.objects[1].box))
    ann = {"id": 5, "result": items, "was_cancelled": False, "created_at": "2026-01-02T00:00:00Z"}
    cfg = parse_label_config(REGION_TOOLS_CONFIG)
    results, stats = predict_tasks(
        [ls_task(1, "/data/upload/1/s.png", annotations=[ann])], cfg, None, None, "v", fetcher, SETTINGS
    )
    assert stats.regions == len(items) and stats.skipped_regions == 0
    w, h = sc.width, sc.height
    boxes_seen = oracle.calls[0]["boxes_seen"]
    for got, want in zip(boxes_seen, seen):
        clipped = check_pixel_box(want, w, h)
        assert got == pytest.approx(
            [clipped[0] / w, clipped[1] / h, clipped[2] / w, clipped[3] / h], abs=1e-6
        )
    # The brush's painted pixels reach the model with its box (mask pooling); the other tools none.
    (masks,) = oracle.calls[0]["masks"]
    assert [m is None for m in masks] == [True, True, False, True, True]
    assert torch.equal(masks[2], torch.from_numpy(brush_mask(sc)))
    answer = results[0]["result"]
    objects = [0, 1, 2, 0, 1]
    for item, k in zip(items, objects):
        mine = [r for r in answer if r.get("id") == item["id"]]
        region, caption = mine  # the region itself, then its caption
        assert region["type"] == item["type"] and region["from_name"] == item["from_name"]
        assert region["value"] == item["value"]  # the geometry as given, with its labels
        assert caption["type"] == "textarea" and caption["value"]["text"] == [sc.objects[k].caption]
        geometry = {key: v for key, v in item["value"].items() if not key.endswith("labels")}
        assert {key: caption["value"][key] for key in geometry} == geometry
        assert (region["original_width"], region["original_height"]) == (w, h)


def test_interactive_keypoint_is_described(scene_fetch):
    sc, oracle, fetcher = scene_fetch
    items, _ = tool_items(sc)
    ctx = {"result": [items[0], items[1]]}  # the keypoint is the newest
    cfg = parse_label_config(REGION_TOOLS_CONFIG)
    results, _ = predict_tasks(
        [ls_task(1, "/data/upload/1/s.png", drafts=[])], cfg, ctx, None, "v", fetcher, SETTINGS
    )
    answer = results[0]["result"]
    assert {r["id"] for r in answer} == {"point1"}
    caption = next(r for r in answer if r["type"] == "textarea")
    assert caption["value"]["text"] == [sc.objects[1].caption]


def test_bad_brush_and_polygon_are_left_out_with_their_reason(scene_fetch):
    sc, _, fetcher = scene_fetch
    items, _ = tool_items(sc)
    empty = brush_result("empty", rle_encode(np.zeros((sc.height, sc.width), bool)), sc.width, sc.height)
    wrong = brush_result("wrong", rle_encode(np.ones((3, 3), bool)), sc.width, sc.height)
    flat = polygon_result("flat", (10, 10, 40, 10), sc.width, sc.height)
    two = {**polygon_result("two", (10, 10, 40, 40), sc.width, sc.height)}
    two["value"] = {**two["value"], "points": two["value"]["points"][:2]}
    ann = {"id": 5, "result": [*items, empty, wrong, flat, two], "created_at": "2026-01-02T00:00:00Z"}
    skips = []
    cfg = parse_label_config(REGION_TOOLS_CONFIG)
    results, _ = predict_tasks(
        [ls_task(1, "/data/upload/1/s.png", annotations=[ann])],
        cfg,
        None,
        None,
        "v",
        fetcher,
        SETTINGS,
        skips.append,
    )
    assert {r["id"] for r in results[0]["result"]} == {"poly0", "point1", "brush2"}
    codes = {s.region: s.code for s in skips}
    assert codes == {"empty": "zero_area", "wrong": "bad_region", "flat": "zero_area", "two": "bad_region"}
    assert "paints no pixel" in next(s.reason for s in skips if s.region == "empty")
    assert "RLE" in next(s.reason for s in skips if s.region == "wrong")


def test_region_labels_are_not_counted_as_texts_the_model_said():
    items = with_caption(polygon_result("p", (1, 1, 9, 9), 10, 10), "a red circle")
    assert region_texts(items) == {"p": [json.dumps(["caption", "textarea", "a red circle"])]}


# ---------------------------------------------------------------------- corrections
def test_corrections_are_stored_from_every_tool():
    w, h = 200, 100
    box = (40.0, 20.0, 120.0, 60.0)
    mask = rects_mask(h, w, [(20, 60, 40, 120)])
    result = [
        *with_caption(polygon_result("p", box, w, h), "a small red circle"),
        *with_caption(ellipse_result("e", box, w, h, rotation=90), "a large blue square"),
        *with_caption(keypoint_result("k", (80, 40), w, h), "a small pink circle"),
        *with_caption(brush_result("b", rle_encode(mask), w, h), "a large green triangle"),
        *with_caption(rotated_rectangle_result("r", box, w, h), "a small yellow square"),
    ]
    parsed = parse_result(result, image_name="image", caption_control="caption")
    assert parsed.skipped == [] and (parsed.width, parsed.height) == (w, h)
    by_id = {r.region_id: r for r in parsed.regions}
    half = KEYPOINT_BOX_FRACTION * h / 2
    expected = {"p": box, "e": box, "b": box, "r": box, "k": (80 - half, 40 - half, 80 + half, 40 + half)}
    for rid, want in expected.items():
        assert by_id[rid].box == pytest.approx(want, abs=0.01), rid
    assert by_id["b"].caption == "a large green triangle" and by_id["r"].caption == "a small yellow square"


def test_corrections_skip_unreadable_regions_with_the_reason():
    w, h = 50, 40
    bad_rle = brush_result("b", rle_encode(np.ones((4, 4), bool)), w, h)
    short = polygon_result("p", (1, 1, 20, 20), w, h)
    short["value"]["points"] = short["value"]["points"][:2]
    parsed = parse_result([*with_caption(bad_rle, "x"), *with_caption(short, "y")])
    assert parsed.regions == []
    reasons = "\n".join(parsed.skipped)
    assert (
        "brush 'b'" in reasons and "RLE" in reasons and "polygon 'p'" in reasons and "at least 3" in reasons
    )


# ---------------------------------------------------------------------- mask-weighted pooling
def test_mask_roi_weights_are_the_mask_at_roi_aligns_samples():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[4:16, 4:10] = True  # the left half of the box (4, 4, 16, 16)
    weights = mask_roi_weights(mask, (4.0, 4.0, 16.0, 16.0), output_size=2, sampling_ratio=2)
    assert weights.shape == (1, 2, 2)
    assert torch.equal(weights, torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))


def test_masked_pooling_reads_only_the_painted_part_and_no_mask_changes_nothing():
    torch.manual_seed(0)
    enc = RegionFeatureExtractor(tiny_region_config(), input_size=32).eval()
    maps = [torch.randn(1, 8, 8, 8)]
    boxes = [torch.tensor([[0.25, 0.25, 0.75, 0.75]])]  # feature columns 2..5, two bins of two
    with torch.no_grad():
        plain = enc.pool(maps, boxes)
        assert torch.equal(enc.pool(maps, boxes, [None]), plain)
        assert torch.equal(enc.pool(maps, boxes, [torch.ones(1, 1, 2, 2)]), plain)
        left = [torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])]
        masked = enc.pool(maps, boxes, left)
        assert not torch.allclose(masked, plain)
        changed = [maps[0].clone()]
        changed[0][:, :, :, 4:] += 5.0  # only what the right bins sample
        assert torch.equal(enc.pool(changed, boxes, left), masked)  # the painted part alone counts
        assert not torch.allclose(enc.pool(changed, boxes), plain)


def test_rle_decode_of_junk_raises_only_rle_errors_and_huge_masks_are_refused():
    rng = np.random.default_rng(1)
    good = rle_encode(rects_mask(6, 5, [(1, 4, 1, 3)]))
    for _ in range(300):
        junk = [*good[:4], *rng.integers(0, 256, int(rng.integers(0, 40))).tolist()]
        try:
            mask = rle_decode(junk, 5, 6)
        except RLEError:
            continue
        assert mask.shape == (6, 5)
    # a few bytes may claim any size: the original size is checked before anything is allocated
    huge = region_geometry("brush", {"format": "rle", "rle": good})
    with pytest.raises(BoxError, match="not decoded"):
        region_pixel_box("brush", huge, 100, 100, (200_000, 200_000))
    item = brush_result("b", good, 200_000, 200_000)
    parsed = parse_result(with_caption(item, "x"))
    assert parsed.regions == [] and "not decoded" in parsed.skipped[0]


def test_mask_weights_lift_unpainted_bins_to_the_floor_and_leave_maskless_boxes_whole():
    cfg = tiny_region_config(mask_floor=0.25)
    enc = RegionEncoder(8, 16, input_size=32, cfg=cfg)
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[4:16, 4:10] = True  # the left half of the box (4, 4, 16, 16) px = (0.2, 0.2, 0.8, 0.8)
    boxes = torch.tensor([[0.2, 0.2, 0.8, 0.8], [0.0, 0.0, 0.5, 0.5]])
    grid = enc.mask_weights(boxes, [mask, None])
    assert grid is not None and grid.shape == (2, 1, 2, 2)
    assert torch.equal(grid[0], torch.tensor([[[1.0, 0.25], [1.0, 0.25]]]))
    assert torch.equal(grid[1], torch.ones(1, 2, 2))
    # a mask at another resolution of the same image weighs the same bins (its size is its frame)
    big = mask.repeat_interleave(3, 0).repeat_interleave(3, 1)
    assert torch.equal(enc.mask_weights(boxes[:1], [big]), grid[:1])
    assert enc.mask_weights(boxes, [None, None]) is None
    with pytest.raises(ValueError, match="mask_floor"):
        tiny_region_config(mask_floor=1.5)


def test_engine_pools_a_region_by_its_mask_and_a_full_mask_changes_nothing():
    m = tiny_model(seed=2).eval()
    rec = tiny_records(1, seed=5)[0]
    image, w, h = rec["image"], rec["width"], rec["height"]
    boxes = boxes_tensor(rec["boxes"][:2], w, h)
    queries = [(0, "What is <region1>?"), (0, "What colour is <region2>?")]
    engine = InferenceEngine(m, "t", max_new_tokens=6)
    plain = engine.answer([image], [boxes], queries)
    full = torch.ones(h, w, dtype=torch.bool)
    assert engine.answer([image], [boxes], queries, [[full, None]]) == plain
    assert engine.answer([image], [boxes], queries, [None]) == plain
    states = engine.image_states([image])
    x0, y0, x1, y1 = (int(v) for v in rec["boxes"][0])
    half = torch.zeros(h, w, dtype=torch.bool)
    half[y0:y1, x0 : (x0 + x1) // 2] = True
    with torch.inference_mode():
        base = engine._region_features(states, [boxes], [{0, 1}])[0]
        masked = engine._region_features(states, [boxes], [{0, 1}], [[half, None]])[0]
    assert not torch.allclose(masked[0], base[0])  # the masked box's token changes
    assert torch.equal(masked[1], base[1])  # the other box's token does not
    # A warm engine (its image's questions cached for the unmasked box) answers the masked box as
    # a fresh engine does: what it keeps per question follows the region token, not the box alone.
    fresh = InferenceEngine(m, "t", max_new_tokens=6).answer([image], [boxes], queries, [[half, None]])
    assert engine.answer([image], [boxes], queries, [[half, None]]) == fresh
    with pytest.raises(ValueError, match="mask lists"):
        engine.answer([image], [boxes], queries, [None, None])


def test_rle_decode_keeps_one_byte_per_pixel_whatever_the_rle_claims():
    """A few kB of RLE may describe a 40 M-pixel image: the decoder holds the alpha channel only,
    never the w x h x 4 values (a 42 kB RLE cost 1.4 GB when it did)."""
    import tracemalloc

    w, h = 2000, 1500
    mask = rects_mask(h, w, [(100, 120, 50, 90)])
    rle = rle_encode(mask)
    assert len(rle) < 20_000
    tracemalloc.start()
    try:
        decoded = rle_decode(rle, w, h)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(decoded.numpy(), mask)
    assert peak < 2 * w * h, f"decoding peaked at {peak / (w * h):.1f} bytes per pixel"
