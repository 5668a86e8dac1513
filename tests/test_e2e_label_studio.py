"""End to end against a real Label Studio 1.23.2 (its own ``.venv-ls``, started headless here).

For each shipped label config: create a project, upload synthetic scenes (true objects known),
pre-draw their boxes as a prediction, connect the backend (gunicorn), run the Data Manager action
``retrieve_tasks_predictions`` and check what Label Studio stored: captions, attributes and
relations attached to the right box ids, and — with the embedded default model ``model/default`` —
correct for the true objects.  Also: the interactive smart-tool call returns the caption of a new
box, and creating an annotation delivers a webhook to the backend.

Run: ``bash scripts/setup_label_studio.sh && .venv/bin/pytest -m e2e tests/test_e2e_label_studio.py``
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import requests

from model.geometry import pixels_to_percent
from model.inference.image_input import encode_image
from model.tasks import relation_labels
from tools.ls.harness import LabelStudio, start_backend, start_label_studio
from tools.ls.payloads import rectangle_result
from toyworld.scenes import Scene, SceneSpec, make_scene

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "model" / "default"
TRAINED = (DEFAULT_MODEL / "version.json").exists()
needs_trained = pytest.mark.skipif(
    not TRAINED, reason="model/default (the trained default model) is not there"
)
CONFIGS = ("region_caption", "caption_attributes", "caption_relations")
SCENES_PER_PROJECT = 5
SEED = 8_500_000  # far from the training and evaluation seeds
MIN_CAPTION_ACCURACY = 0.9
MIN_ATTRIBUTE_ACCURACY = 0.9
MIN_RELATION_ACCURACY = 0.85


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    """Label Studio + backend processes for the module; stopped afterwards."""
    work = tmp_path_factory.mktemp("e2e")
    model = DEFAULT_MODEL if TRAINED else request.getfixturevalue("tiny_checkpoint")
    ls = start_label_studio(work / "ls")
    try:
        backend = start_backend(work / "backend", ls.url, model)
    except BaseException:
        ls.stop()
        raise
    version = requests.get(f"{backend.url}/health", timeout=5).json()["model_version"]
    yield {"ls": ls, "backend": backend, "client": LabelStudio(ls.url), "version": version}
    backend.stop()
    ls.stop()


def scenes_for(project_index: int) -> list[Scene]:
    return [
        make_scene(random.Random(SEED + 1000 * project_index + i), SceneSpec(min_objects=2, max_objects=4))
        for i in range(SCENES_PER_PROJECT)
    ]


def box_result(rid: str, box, scene: Scene) -> dict:
    return rectangle_result(rid, box, scene.width, scene.height)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def projects(stack):
    """Every config: project, tasks with pre-drawn boxes, backend connected, predictions retrieved."""
    ls: LabelStudio = stack["client"]
    out = {}
    for index, name in enumerate(CONFIGS):
        xml = (REPO / "label_config" / f"{name}.xml").read_text()
        project = ls.create_project(f"e2e {name}", xml)
        scenes = scenes_for(index)
        tasks = ls.upload_images(
            project, [(f"scene-{i}.png", encode_image(s.image)) for i, s in enumerate(scenes)]
        )
        truth: dict[int, tuple[Scene, list[str]]] = {}
        for i, scene in enumerate(scenes):
            task = tasks[f"scene-{i}.png"]
            ids = [f"t{task['id']}b{k}" for k in range(len(scene.objects))]
            ls.add_prediction(
                task["id"], [box_result(r, o.box, scene) for r, o in zip(ids, scene.objects)], "boxes"
            )
            truth[task["id"]] = (scene, ids)
        ml = ls.connect_backend(project, stack["backend"].url)
        assert ml["state"] == "CO", ml
        retrieved = ls.retrieve_predictions(project)
        assert retrieved["processed_items"] == SCENES_PER_PROJECT, retrieved
        stored = [p for p in ls.predictions(project) if p["model_version"] == stack["version"]]
        out[name] = {"project": project, "ml": ml["id"], "truth": truth, "predictions": stored}
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_predictions_attach_to_the_right_boxes(projects, stack, name):
    info = projects[name]
    by_task = {p["task"]: p for p in info["predictions"]}
    assert set(by_task) == set(info["truth"]), "one stored prediction per task"
    for task_id, (scene, ids) in info["truth"].items():
        pred = by_task[task_id]
        assert 0.0 <= pred["score"] <= 1.0
        regions = [r for r in pred["result"] if r["type"] != "relation"]
        assert {r["id"] for r in regions} == set(ids)
        for rid, obj in zip(ids, scene.objects):
            mine = {r["from_name"]: r for r in regions if r["id"] == rid}
            expected = pixels_to_percent(obj.box, scene.width, scene.height)
            for key in ("x", "y", "width", "height"):
                assert mine["bbox"]["value"][key] == pytest.approx(expected[key], abs=1e-6)
                assert mine["caption"]["value"][key] == pytest.approx(expected[key], abs=1e-6)
            assert mine["caption"]["type"] == "textarea" and len(mine["caption"]["value"]["text"]) == 1
            if name == "caption_attributes":
                assert set(mine) <= {"bbox", "caption", "color", "shape", "size"}
        relations = [r for r in pred["result"] if r["type"] == "relation"]
        if name == "caption_relations":
            assert relations or not TRAINED, "the relations config gets relations"
            for rel in relations:
                assert {rel["from_id"], rel["to_id"]} <= set(ids) and rel["from_id"] != rel["to_id"]
                assert rel["labels"] and rel["direction"] == "right"
        else:
            assert not relations


@needs_trained
@pytest.mark.parametrize("name", CONFIGS)
def test_predictions_are_correct_for_the_true_objects(projects, name):
    info = projects[name]
    by_task = {p["task"]: p for p in info["predictions"]}
    captions = attributes = relations = 0
    right = {"caption": 0, "attribute": 0, "relation": 0}
    for task_id, (scene, ids) in info["truth"].items():
        result = by_task[task_id]["result"]
        texts = {(r["id"], r["from_name"]): r["value"] for r in result if r["type"] != "relation"}
        for rid, obj in zip(ids, scene.objects):
            captions += 1
            right["caption"] += texts[(rid, "caption")]["text"] == [obj.caption]
            if name == "caption_attributes":
                for attr in ("color", "shape", "size"):
                    attributes += 1
                    right["attribute"] += texts.get((rid, attr), {}).get("choices") == [getattr(obj, attr)]
        if name == "caption_relations":
            got = {(r["from_id"], r["to_id"]): sorted(r["labels"]) for r in result if r["type"] == "relation"}
            for a, oa in enumerate(scene.objects):
                for b, ob in enumerate(scene.objects):
                    if a != b:
                        relations += 1
                        want = sorted(relation_labels(oa.box, ob.box, scene.width, scene.height))
                        right["relation"] += got.get((ids[a], ids[b]), []) == want
    assert right["caption"] / captions >= MIN_CAPTION_ACCURACY, (right, captions)
    if attributes:
        assert right["attribute"] / attributes >= MIN_ATTRIBUTE_ACCURACY, (right, attributes)
    if relations:
        assert right["relation"] / relations >= MIN_RELATION_ACCURACY, (right, relations)


def test_interactive_annotating_returns_the_new_box_caption(projects, stack):
    info = projects["caption_attributes"]
    task_id, (scene, _) = next(iter(info["truth"].items()))
    obj = scene.objects[-1]
    new_box = {**box_result("e2eNewBox", obj.box, scene), "origin": "manual"}
    answer = stack["client"].interactive(info["ml"], task_id, {"result": [new_box]})
    data = answer["data"]
    assert data["model_version"] == stack["version"] and isinstance(data["score"], float)
    caption = [r for r in data["result"] if r["id"] == "e2eNewBox" and r["from_name"] == "caption"]
    assert len(caption) == 1 and {r["id"] for r in data["result"]} == {"e2eNewBox"}
    if TRAINED:
        assert caption[0]["value"]["text"] == [obj.caption]


def test_annotation_webhook_reaches_the_backend(projects, stack):
    info = projects["region_caption"]
    task_id, (scene, ids) = next(iter(info["truth"].items()))
    before = requests.get(f"{stack['backend'].url}/metrics", timeout=5).text
    result = [box_result(rid, o.box, scene) for rid, o in zip(ids, scene.objects)]
    result += [
        {**box_result(rid, o.box, scene), "from_name": "caption", "type": "textarea",
         "value": {**box_result(rid, o.box, scene)["value"], "text": [o.caption]}}
        for rid, o in zip(ids, scene.objects)
    ]  # fmt: skip
    for item in result[len(ids) :]:
        item["value"].pop("rectanglelabels")
    stack["client"].create_annotation(task_id, result)
    after = requests.get(f"{stack['backend'].url}/metrics", timeout=5).text
    name = "roi_webhooks_total"
    assert (
        metric(after, name, action="ANNOTATION_CREATED")
        == metric(before, name, action="ANNOTATION_CREATED") + 1
    )
    log = stack["backend"].log.read_text()
    assert re.search(r'"message": "webhook", "action": "ANNOTATION_CREATED"', log)
    # The correction was stored durably, each caption on its box (the backend's DATA_DIR).
    from backend.store import CorrectionStore

    (stored,) = CorrectionStore(stack["backend"].log.parent / "data").annotations(project_id=info["project"])
    assert stored.task_id == task_id
    assert {r.region_id: r.caption for r in stored.regions} == {
        rid: o.caption for rid, o in zip(ids, scene.objects)
    }
    assert "0123456789abcdef0123456789abcdef01234567" not in log  # the API key is never logged


def test_project_model_version_update_makes_scores_sortable(projects, stack):
    """What a promoted fine-tuning job does: set the project's model_version in Label Studio; the Data
    Manager then shows the backend's prediction scores (it filters them by that version)."""
    from backend.label_studio import set_project_model_version
    from backend.settings import Settings
    from tools.ls.harness import LS_TOKEN

    ls: LabelStudio = stack["client"]
    info = projects["caption_attributes"]
    settings = Settings(label_studio_url=ls.url, label_studio_api_key=LS_TOKEN)
    assert set_project_model_version(settings, info["project"], stack["version"]) == "updated"
    assert ls.call("GET", f"/api/projects/{info['project']}")["model_version"] == stack["version"]
    scores = {t["id"]: t.get("predictions_score") for t in ls.tasks(info["project"])}
    assert set(scores) == set(info["truth"])
    expected = {p["task"]: p["score"] for p in info["predictions"]}
    for task_id, score in scores.items():
        assert score == pytest.approx(expected[task_id], abs=1e-4), (task_id, score)


NON_ASCII_CAPTIONS = [
    "粉红色的圆形",  # Chinese
    "دائرة وردية كبيرة",  # Arabic (right to left)
    "👩\u200d💻 a pink 🟣 circle",  # emoji with a zero-width joiner
    "a pin\u0301k ci\u0308rcle",  # combining marks (not normalised away)
]


def test_non_ascii_corrections_are_stored_exactly(projects, stack):
    """Reviewer captions in Chinese, Arabic, emoji and combining marks go through Label Studio's
    webhook into the corrections store unchanged (the fine-tuning data), each on its own box."""
    info = projects["caption_relations"]
    task_id, (scene, ids) = list(info["truth"].items())[1]
    captions = {rid: NON_ASCII_CAPTIONS[k % len(NON_ASCII_CAPTIONS)] for k, rid in enumerate(ids)}
    result = [box_result(rid, o.box, scene) for rid, o in zip(ids, scene.objects)]
    for rid, o in zip(ids, scene.objects):
        item = box_result(rid, o.box, scene)
        item["value"].pop("rectanglelabels")
        result.append({**item, "from_name": "caption", "type": "textarea",
                       "value": {**item["value"], "text": [captions[rid]]}})  # fmt: skip
    stack["client"].create_annotation(task_id, result)
    from backend.store import CorrectionStore

    store = CorrectionStore(stack["backend"].log.parent / "data")
    (stored,) = [a for a in store.annotations(project_id=info["project"]) if a.task_id == task_id]
    assert {r.region_id: r.caption for r in stored.regions} == captions


def team_config() -> tuple[str, dict[str, str]]:
    """A config as a team writes it: a nested image field, a label-less ``<Rectangle>`` labelled by
    a separate ``<Labels>``, colours under aliases, a control named in camelCase, and shapes asked
    only on Car boxes.  -> (XML, colour -> alias)."""
    from toyworld.scenes import COLORS, SHAPES

    aliases = {c: f"c{k}" for k, c in enumerate(COLORS)}
    colours = "".join(f'<Choice value="{c.title()}" alias="{a}"/>' for c, a in aliases.items())
    shapes = "".join(f'<Choice value="{s}"/>' for s in SHAPES)
    xml = (
        '<View><Image name="photo" value="$meta.url"/>'
        '<Labels name="kind" toName="photo"><Label value="Car"/><Label value="Person"/></Labels>'
        '<Rectangle name="bbox" toName="photo"/>'
        '<TextArea name="caption" toName="photo" perRegion="true"/>'
        f'<Choices name="objColor" toName="photo" perRegion="true">{colours}</Choices>'
        f'<Choices name="shape" toName="photo" perRegion="true" whenLabelValue="Car">{shapes}</Choices>'
        "</View>"
    )
    return xml, aliases


def test_a_team_config_with_aliases_nested_fields_and_conditional_controls(stack):
    """Through a real Label Studio: predictions name colours by their aliases (what Label Studio
    selects by), tasks whose image is ``data.meta.url`` are answered, each box keeps its label from
    the separate ``<Labels>``, and the shape control shown only on Car boxes is filled only there."""
    ls: LabelStudio = stack["client"]
    xml, aliases = team_config()
    uploads = ls.create_project("e2e uploads", (REPO / "label_config" / "region_caption.xml").read_text())
    scenes = scenes_for(7)[:3]
    uploaded = ls.upload_images(
        uploads, [(f"team-{i}.png", encode_image(s.image)) for i, s in enumerate(scenes)]
    )
    project = ls.create_project("e2e team config", xml)
    tasks = ls.import_tasks(
        project, [{"meta": {"url": uploaded[f"team-{i}.png"]["data"]["image"]}} for i in range(3)]
    )
    labels: dict[str, str] = {}
    truth: dict[str, tuple[str, str]] = {}
    for task, scene in zip(tasks, scenes):
        result = []
        for k, obj in enumerate(scene.objects):
            rid = f"t{task['id']}b{k}"
            labels[rid] = "Car" if k % 2 == 0 else "Person"
            truth[rid] = (obj.color, obj.shape)
            item = box_result(rid, obj.box, scene)
            item["to_name"], item["type"] = "photo", "rectangle"
            item["value"].pop("rectanglelabels", None)
            kind = {
                **item,
                "from_name": "kind",
                "type": "labels",
                "value": {**item["value"], "labels": [labels[rid]]},
            }
            result += [item, kind]
        ls.add_prediction(task["id"], result, "boxes")
    assert ls.connect_backend(project, stack["backend"].url)["state"] == "CO"
    assert ls.retrieve_predictions(project)["processed_items"] == 3
    stored = [p for p in ls.predictions(project) if p["model_version"] == stack["version"]]
    assert len(stored) == 3, "every task with a nested image field is answered"
    colours_right = 0
    for pred in stored:
        by = {(r["id"], r["from_name"]): r for r in pred["result"] if r["type"] != "relation"}
        rids = {rid for rid, _ in by}
        for rid in rids:
            assert (rid, "caption") in by and by[(rid, "bbox")]["type"] == "rectangle"
            assert by[(rid, "kind")]["value"]["labels"] == [labels[rid]]  # accepting keeps the label
            colour = by[(rid, "objColor")]["value"]["choices"]
            assert set(colour) <= set(aliases.values()), colour  # aliases, never the displayed values
            colours_right += colour == [aliases[truth[rid][0]]]
            assert ((rid, "shape") in by) == (labels[rid] == "Car")
    if TRAINED:
        assert colours_right >= 0.9 * len(truth)
