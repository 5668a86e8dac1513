"""End to end against a real Label Studio 1.23.2: regions drawn with other tools than the rectangle.

One project with every image region tool (:data:`tools.ls.region_tools.REGION_TOOLS_CONFIG`);
synthetic scenes with three objects each, drawn as a polygon, a keypoint and a brush mask (the
RLE written by Label Studio's own encoder, ``label_studio_sdk.converter.brush.encode_rle`` in
``.venv-ls``).  *Retrieve predictions* captions each region on its id, with items Label Studio's
SDK validates for that config; the smart keypoint is captioned interactively; an annotation with a
rotated rectangle (and a brush and a keypoint) reaches the backend's webhook and is stored as the
pixel boxes the model describes.

Run: ``bash scripts/setup_label_studio.sh && .venv/bin/pytest -m e2e tests/test_e2e_region_tools.py``
"""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from model.geometry import KEYPOINT_BOX_FRACTION, check_pixel_box
from model.inference.image_input import encode_image
from tests.test_e2e_label_studio import TRAINED, stack  # noqa: F401 (the module's stack fixture)
from tools.ls.harness import LS_VENV, LabelStudio, ensure_ls_venv
from tools.ls.region_tools import (
    REGION_TOOLS_CONFIG,
    brush_result,
    keypoint_result,
    polygon_result,
    rotated_rectangle_result,
    with_caption,
)
from toyworld.scenes import Scene, SceneSpec, make_scene

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SCENES = 6
SEED = 8_700_000  # far from the training and evaluation seeds
MIN_CAPTION_ACCURACY = 0.8  # polygon and brush regions: the box is the object's own
TOOLS = ("poly", "point", "brush")


def ls_python(code: str, payload: object) -> object:
    """Run ``code`` with Label Studio's own Python (``.venv-ls``): JSON in on stdin, JSON out."""
    ensure_ls_venv()
    done = subprocess.run(
        [str(LS_VENV / "bin" / "python"), "-c", code],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(done.stdout)


OFFICIAL_RLE = """
import json, sys
import numpy as np
from label_studio_sdk.converter.brush import encode_rle
out = []
for w, h, (x0, y0, x1, y1) in json.load(sys.stdin):
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[y0:y1, x0:x1] = (255, 0, 0, 255)
    out.append([int(v) for v in encode_rle(rgba.flatten())])
print(json.dumps(out))
"""

VALIDATE = """
import json, sys
from label_studio_sdk.label_interface import LabelInterface
config, predictions = json.load(sys.stdin)
li = LabelInterface(config)
print(json.dumps([li.validate_prediction(p, return_errors=True) for p in predictions]))
"""


def inside(scene: Scene) -> list[tuple[float, float, float, float]]:
    """The objects' boxes clipped to the image (where a reviewer can draw)."""
    return [check_pixel_box(o.box, scene.width, scene.height) for o in scene.objects]


def painted(box) -> tuple[int, int, int, int]:
    """Whole pixels a brush paints over ``box``."""
    return tuple(int(round(v)) for v in box)  # type: ignore[return-value]


def centre(box) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


@pytest.fixture(scope="module")
def project(stack):  # noqa: F811 (the imported fixture)
    ls: LabelStudio = stack["client"]
    pid = ls.create_project("e2e region tools", REGION_TOOLS_CONFIG)
    scenes = [
        make_scene(random.Random(SEED + i), SceneSpec(min_objects=3, max_objects=3)) for i in range(SCENES)
    ]
    tasks = ls.upload_images(pid, [(f"scene-{i}.png", encode_image(s.image)) for i, s in enumerate(scenes)])
    masks = [(s.width, s.height, painted(inside(s)[2])) for s in scenes]
    rles = ls_python(OFFICIAL_RLE, masks)
    truth = {}
    for i, (sc, rle) in enumerate(zip(scenes, rles)):
        task = tasks[f"scene-{i}.png"]["id"]
        boxes = inside(sc)
        regions = [
            polygon_result(f"t{task}poly", boxes[0], sc.width, sc.height),
            keypoint_result(f"t{task}point", centre(boxes[1]), sc.width, sc.height),
            brush_result(f"t{task}brush", rle, sc.width, sc.height),
        ]
        ls.add_prediction(task, regions, "drawn")
        truth[task] = (sc, regions)
    ml = ls.connect_backend(pid, stack["backend"].url)
    assert ml["state"] == "CO", ml
    retrieved = ls.retrieve_predictions(pid)
    assert retrieved["processed_items"] == SCENES, retrieved
    stored = {p["task"]: p for p in ls.predictions(pid) if p["model_version"] == stack["version"]}
    return {"project": pid, "ml": ml["id"], "truth": truth, "predictions": stored}


def test_polygon_keypoint_and_brush_regions_are_captioned(project):
    assert set(project["predictions"]) == set(project["truth"]), "one stored prediction per task"
    right = {tool: 0 for tool in TOOLS}
    colour_shape = {tool: 0 for tool in TOOLS}
    for task, (sc, regions) in project["truth"].items():
        result = project["predictions"][task]["result"]
        assert {r["id"] for r in result} == {r["id"] for r in regions}
        for k, (tool, region) in enumerate(zip(TOOLS, regions)):
            mine = {r["from_name"]: r for r in result if r["id"] == region["id"]}
            assert set(mine) == {tool, "caption"}
            assert mine[tool]["type"] == region["type"] and mine[tool]["value"] == region["value"]
            caption = mine["caption"]["value"]
            assert mine["caption"]["type"] == "textarea" and len(caption["text"]) == 1
            assert {key: caption[key] for key in region["value"] if not key.endswith("labels")} == {
                key: v for key, v in region["value"].items() if not key.endswith("labels")
            }
            right[tool] += caption["text"] == [sc.objects[k].caption]
            # "a <size> <colour> <shape>": a keypoint's square is smaller than its object
            colour_shape[tool] += caption["text"][0].split()[2:] == sc.objects[k].caption.split()[2:]
    print(
        "captions right per tool:",
        right,
        "colour and shape right:",
        colour_shape,
        "of",
        len(project["truth"]),
    )
    if TRAINED:
        for tool in ("poly", "brush"):
            assert right[tool] / len(project["truth"]) >= MIN_CAPTION_ACCURACY, right


def test_stored_predictions_are_valid_for_the_config(project):
    """Label Studio's own SDK checks every stored result item against the project's config."""
    stored = [{"result": p["result"]} for p in project["predictions"].values()]
    errors = ls_python(VALIDATE, [REGION_TOOLS_CONFIG, stored])
    assert errors == [[] for _ in stored]


def test_smart_keypoint_is_captioned_interactively(project, stack):  # noqa: F811
    task, (sc, _) = next(iter(project["truth"].items()))
    box = inside(sc)[0]
    point = {**keypoint_result("e2eNewPoint", centre(box), sc.width, sc.height)}
    answer = stack["client"].interactive(project["ml"], task, {"result": [point]})["data"]
    assert {r["id"] for r in answer["result"]} == {"e2eNewPoint"}
    (caption,) = [r for r in answer["result"] if r["from_name"] == "caption"]
    assert len(caption["value"]["text"]) == 1 and caption["value"]["text"][0]
    print("interactive keypoint caption:", caption["value"]["text"], "object:", sc.objects[0].caption)


def test_rotated_rectangle_correction_is_stored(project, stack):  # noqa: F811
    from backend.store import CorrectionStore

    task, (sc, regions) = next(iter(project["truth"].items()))
    w, h = sc.width, sc.height
    boxes = inside(sc)
    result = [
        *with_caption(rotated_rectangle_result("rot", boxes[0], w, h), "a rotated " + sc.objects[0].caption),
        *with_caption(regions[2], sc.objects[2].caption),  # the brush, as predicted
        *with_caption(keypoint_result("pt", centre(boxes[1]), w, h), sc.objects[1].caption),
    ]
    stack["client"].create_annotation(task, result)
    data = stack["backend"].log.parent / "data"
    (stored,) = [
        a for a in CorrectionStore(data).annotations(project_id=project["project"]) if a.task_id == task
    ]
    by_id = {r.region_id: r for r in stored.regions}
    assert set(by_id) == {"rot", regions[2]["id"], "pt"}
    assert by_id["rot"].caption == "a rotated " + sc.objects[0].caption
    assert by_id["rot"].box == pytest.approx(boxes[0], abs=0.01)  # the box around the rotated rectangle
    assert by_id[regions[2]["id"]].box == pytest.approx(painted(boxes[2]), abs=0.01)
    half = KEYPOINT_BOX_FRACTION * min(w, h) / 2
    cx, cy = centre(boxes[1])
    want = check_pixel_box((cx - half, cy - half, cx + half, cy + half), w, h)
    assert by_id["pt"].box == pytest.approx(want, abs=0.01)
