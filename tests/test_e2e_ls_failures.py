"""What goes wrong, against a real Label Studio 1.23.2 (its own ``.venv-ls``, started headless here).

Issue 15, items 1, 2, 3 and 7, as a new annotation team meets them, with uploaded images:

* one bad box never sinks a batch: a zero-width box, a box wholly outside the image and a tiny box
  in one task, a task whose only box is zero-width, a box partly outside (clipped) and a task whose
  image is gone - the valid tasks and boxes still get predictions in Label Studio;
* a task with only a draft gets *no* stored prediction, and a later *Retrieve predictions* (after
  its boxes are submitted) asks the backend for it again;
* the second label config ``label_config/unknown_choices.xml`` (two images, colours and a relation
  the model does not know): ``/setup`` answers the mapping and the warnings and logs them, and a
  correction choosing ``Crimson`` / ``touches`` is stored as new vocabulary;
* a refused config and a missing API key: Label Studio shows only "400 Client Error ... check the ML
  backend server console logs"; the reason is in the backend's log (the file the harness writes).

Every box or task left out is a WARNING JSON line with project, task, region and reason, and a
``/metrics`` counter by reason.

Run: ``bash scripts/setup_label_studio.sh && .venv/bin/pytest -m e2e tests/test_e2e_ls_failures.py``
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import requests

from backend.label_config import parse_label_config
from backend.store import CorrectionStore
from model.inference.image_input import encode_image
from tools.ls.harness import LabelStudio, Server, start_backend, start_label_studio
from tools.ls.payloads import rectangle_result, region_items, relation_item
from toyworld.scenes import Scene, SceneSpec, make_scene

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "model" / "default"
TRAINED = (DEFAULT_MODEL / "version.json").exists()
CAPTION_XML = (REPO / "label_config" / "region_caption.xml").read_text()
UNKNOWN_XML = (REPO / "label_config" / "unknown_choices.xml").read_text()
NOTHING_TO_FILL_XML = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="bbox" toName="image"><Label value="Object"/></RectangleLabels></View>'
)
SEED = 8_700_000  # far from the training, evaluation and other e2e seeds


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    """One Label Studio and one backend for the module; stopped afterwards."""
    work = tmp_path_factory.mktemp("e2e-failures")
    model = DEFAULT_MODEL if TRAINED else request.getfixturevalue("tiny_checkpoint")
    ls = start_label_studio(work / "ls")
    try:
        backend = start_backend(work / "backend", ls.url, model)
    except BaseException:
        ls.stop()
        raise
    version = requests.get(f"{backend.url}/health", timeout=5).json()["model_version"]
    yield {"ls": ls, "backend": backend, "client": LabelStudio(ls.url), "version": version, "model": model,
           "work": work}  # fmt: skip
    backend.stop()
    ls.stop()


def scenes(offset: int, count: int) -> list[Scene]:
    spec = SceneSpec(min_objects=2, max_objects=3)
    return [make_scene(random.Random(SEED + offset + i), spec) for i in range(count)]


def upload(ls: LabelStudio, project: int, prefix: str, pictures: list[Scene]) -> list[dict]:
    """Upload the scenes as image files (one task each), tasks in scene order."""
    tasks = ls.upload_images(
        project, [(f"{prefix}-{i}.png", encode_image(s.image)) for i, s in enumerate(pictures)]
    )
    return [tasks[f"{prefix}-{i}.png"] for i in range(len(pictures))]


def metric(server: Server, name: str, **labels: str) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def logged(server: Server, message: str, **fields) -> list[dict]:
    """The backend's JSON log records with this message and these field values."""
    return [
        r
        for r in server.log_records()
        if r.get("message") == message and all(r.get(k) == v for k, v in fields.items())
    ]


def ours(ls: LabelStudio, project: int, version: str) -> dict[int, dict]:
    """Predictions Label Studio stored from the backend, by task."""
    return {p["task"]: p for p in ls.predictions(project) if p["model_version"] == version}


def region_ids(prediction: dict) -> set[str]:
    return {r["id"] for r in prediction["result"] if r.get("type") != "relation"}


def wait_for(check, timeout: float = 60.0):
    """Poll ``check`` until it returns something truthy (webhooks are delivered by Label Studio)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_one_bad_box_never_sinks_the_batch(stack):
    ls: LabelStudio = stack["client"]
    backend: Server = stack["backend"]
    version = stack["version"]
    project = ls.create_project("e2e bad boxes", CAPTION_XML)
    pictures = scenes(0, 4)
    tasks = upload(ls, project, "bad", pictures)
    (gone,) = [t for t in ls.import_tasks(project, [{"image": f"/data/upload/{project}/gone.png"}])
               if t["id"] not in {x["id"] for x in tasks}]  # fmt: skip
    ids = [t["id"] for t in tasks]

    def good(k: int, prefix: str = "g") -> list[dict]:
        sc = pictures[k]
        return [
            rectangle_result(f"{prefix}{ids[k]}o{n}", o.box, sc.width, sc.height)
            for n, o in enumerate(sc.objects)
        ]

    sc1, sc3 = pictures[1], pictures[3]
    zero = rectangle_result("zero", (10, 10, 10, 40), sc1.width, sc1.height)
    outside = rectangle_result("outside", (0, 0, 10, 10), sc1.width, sc1.height)
    outside["value"]["x"] = 150.0
    tiny = rectangle_result("tiny", (20, 20, 22, 40), sc1.width, sc1.height)  # 2 px wide < MIN_BOX_PX 4
    lone_zero = rectangle_result("lonezero", (5, 5, 30, 5), pictures[2].width, pictures[2].height)
    obj = sc3.objects[0]
    partly = rectangle_result(
        "partly", (obj.box[0] - 1000, obj.box[1], obj.box[2], obj.box[3]), sc3.width, sc3.height
    )
    ls.add_prediction(ids[0], good(0), "boxes")
    ls.add_prediction(ids[1], [good(1)[0], zero, outside, tiny, *good(1)[1:]], "boxes")
    ls.add_prediction(ids[2], [lone_zero], "boxes")
    ls.add_prediction(ids[3], [partly], "boxes")
    ls.add_prediction(gone["id"], good(0, "lost"), "boxes")
    counted = {("regions", "zero_area"): 2, ("regions", "outside_image"): 1, ("regions", "tiny_box"): 1,
               ("tasks", "no_usable_box"): 1, ("tasks", "image"): 1}  # fmt: skip
    before = {key: metric(backend, f"roi_{key[0]}_skipped_total", reason=key[1]) for key in counted}
    clipped = metric(backend, "roi_regions_clipped_total")

    assert ls.connect_backend(project, backend.url)["state"] == "CO"
    assert ls.retrieve_predictions(project)["processed_items"] == 5
    stored = ours(ls, project, version)

    assert set(stored) == {ids[0], ids[1], ids[3]}, "the valid tasks got predictions; bad ones none"
    assert region_ids(stored[ids[0]]) == {r["id"] for r in good(0)}
    assert region_ids(stored[ids[1]]) == {r["id"] for r in good(1)}, "bad boxes left out, the rest answered"
    (rect,) = [r for r in stored[ids[3]]["result"] if r["type"] == "rectanglelabels"]
    assert rect["id"] == "partly" and rect["value"] == partly["value"], "the box as Label Studio sent it"
    captions = [r for r in stored[ids[3]]["result"] if r["type"] == "textarea"]
    assert (
        len(captions) == 1
        and captions[0]["value"]["text"][0]
        and captions[0]["value"]["x"] == rect["value"]["x"]
    )

    expected = {
        ("region skipped", ids[1], "zero"): ("zero_area", "zero or negative area"),
        ("region skipped", ids[1], "outside"): ("outside_image", "lies outside"),
        ("region skipped", ids[1], "tiny"): ("tiny_box", "4-pixel minimum"),
        ("region skipped", ids[2], "lonezero"): ("zero_area", "zero or negative area"),
        ("task skipped", ids[2], None): ("no_usable_box", "every box was skipped"),
        ("task skipped", gone["id"], None): (
            "image",
            "gone.png answered HTTP",
        ),  # Label Studio 1.23.2 answers 500
    }
    for (message, task, region), (code, needle) in expected.items():
        (record,) = logged(backend, message, project=project, task=task, region=region)
        assert record["level"] == "WARNING" and record["code"] == code, record
        assert needle in record["reason"] and f"task {task}" in record["reason"], record
    for (kind, reason), value in before.items():
        grown = metric(backend, f"roi_{kind}_skipped_total", reason=reason) - value
        assert grown == counted[(kind, reason)], (kind, reason, grown)
    # Toy objects may overhang their image too; every overhanging box answered is clipped.
    answered = [(b, pictures[k]) for k in (0, 1) for b in (o.box for o in pictures[k].objects)]
    answered.append(((obj.box[0] - 1000, *obj.box[1:]), sc3))
    overhanging = sum(min(b[:2]) < 0 or b[2] > sc.width or b[3] > sc.height for b, sc in answered)
    assert metric(backend, "roi_regions_clipped_total") == clipped + overhanging


def test_task_with_only_a_draft_gets_no_prediction_and_is_asked_again(stack):
    """Label Studio sends no drafts to /predict: the task has no boxes, so the backend answers ``[]``
    for it and Label Studio stores nothing - once the boxes are submitted, it asks again."""
    ls: LabelStudio = stack["client"]
    backend: Server = stack["backend"]
    version = stack["version"]
    project = ls.create_project("e2e draft", CAPTION_XML)
    pictures = scenes(100, 2)
    with_boxes, draft_only = upload(ls, project, "draft", pictures)
    boxes = [rectangle_result(f"b{n}", o.box, pictures[0].width, pictures[0].height)
             for n, o in enumerate(pictures[0].objects)]  # fmt: skip
    ls.add_prediction(with_boxes["id"], boxes, "boxes")
    sc = pictures[1]
    drawn = [rectangle_result(f"d{n}", o.box, sc.width, sc.height) for n, o in enumerate(sc.objects)]
    ls.create_draft(draft_only["id"], drawn)

    assert ls.connect_backend(project, backend.url)["state"] == "CO"
    ls.retrieve_predictions(project)
    stored = ours(ls, project, version)
    assert set(stored) == {with_boxes["id"]}, "no prediction stored for the draft-only task"
    assert not [p for p in ls.predictions(project) if p["task"] == draft_only["id"]]
    (record,) = logged(backend, "task skipped", project=project, task=draft_only["id"])
    assert record["level"] == "WARNING" and record["code"] == "no_boxes" and "no boxes" in record["reason"]

    ls.create_annotation(draft_only["id"], drawn)  # the reviewer submits the draft
    asked = len(logged(backend, "predicted", project=project))
    ls.retrieve_predictions(project)
    stored = ours(ls, project, version)
    assert set(stored) == {with_boxes["id"], draft_only["id"]}, "asked again: now it has a prediction"
    assert region_ids(stored[draft_only["id"]]) == {r["id"] for r in drawn}
    calls = logged(backend, "predicted", project=project)
    assert len(calls) == asked + 1 and calls[-1]["tasks"] == 1, "only the task without our prediction"


def test_second_label_config_setup_answers_mapping_and_warnings(stack):
    ls: LabelStudio = stack["client"]
    backend: Server = stack["backend"]
    version = stack["version"]
    uploads = ls.create_project("e2e uploads for the second config", CAPTION_XML)
    pictures = scenes(200, 2)
    urls = [t["data"]["image"] for t in upload(ls, uploads, "two", pictures)]
    project = ls.create_project("e2e unknown choices", UNKNOWN_XML)
    tasks = ls.import_tasks(
        project, [{"image": urls[0], "reference": urls[1]}, {"image": urls[1], "reference": urls[0]}]
    )
    config = parse_label_config(UNKNOWN_XML)

    assert ls.connect_backend(project, backend.url)["state"] == "CO"  # warnings do not refuse
    warned = {r["reason"] for r in logged(backend, "label config warning", project=project)}
    assert warned == set(config.warnings) and len(warned) == 4
    assert all(r["level"] == "WARNING" for r in logged(backend, "label config warning", project=project))
    setup = requests.post(
        f"{backend.url}/setup",
        json={"project": f"{project}.1795583044", "schema": UNKNOWN_XML, "hostname": ls.url,
              "access_token": "x", "extra_params": None},
        timeout=30,
    )  # fmt: skip
    answer = setup.json()
    assert setup.status_code == 200 and answer["model_version"] == version
    assert answer["mapping"] == config.summary() and answer["warnings"] == list(config.warnings)
    assert answer["mapping"]["attributes"]["color"]["color"]["new"] == ["Crimson", "Teal"]
    assert answer["mapping"]["relations"]["new"] == ["touches"]

    sc = pictures[0]
    boxes = [rectangle_result(f"u{n}", o.box, sc.width, sc.height) for n, o in enumerate(sc.objects)]
    ls.add_prediction(tasks[0]["id"], boxes, "boxes")
    ls.retrieve_predictions(project)
    (prediction,) = ours(ls, project, version).values()
    choices = {
        c for r in prediction["result"] if r.get("from_name") == "color" for c in r["value"]["choices"]
    }
    assert choices <= {"red", "green", "blue", "yellow", "Crimson", "Teal"} and "condition" not in {
        r.get("from_name") for r in prediction["result"]
    }
    relations = [r for r in prediction["result"] if r["type"] == "relation"]
    assert all(set(r["labels"]) <= {"left_of", "right_of", "above", "below", "touches"} for r in relations)
    if TRAINED:
        assert choices and relations

    # A reviewer's correction with a colour and a relation the model does not know yet: stored.
    a, b = sc.objects[0], sc.objects[1]
    result = region_items("ca", a.box, sc.width, sc.height, "a crimson thing") + region_items(
        "cb", b.box, sc.width, sc.height
    )
    geometry = {k: v for k, v in result[0]["value"].items() if k != "rectanglelabels"}
    color = {
        **result[0],
        "from_name": "color",
        "type": "choices",
        "value": {**geometry, "choices": ["Crimson"]},
    }
    ls.create_annotation(tasks[0]["id"], [*result, color, relation_item("ca", "cb", ["touches"])])
    store = CorrectionStore(backend.log.parent / "data")
    stored = wait_for(lambda: store.annotations(project_id=project))
    assert stored, "the webhook stored the correction"
    regions = {r.region_id: r for r in stored[0].regions}
    assert regions["ca"].attributes == {"color": "crimson"} and regions["ca"].caption == "a crimson thing"
    assert [(r.target, r.labels) for r in regions["ca"].relations] == [("cb", ("touches",))]


def test_refused_config_reason_is_in_the_backend_log_not_in_label_studio(stack):
    ls: LabelStudio = stack["client"]
    backend: Server = stack["backend"]
    project = ls.create_project("e2e refused config", NOTHING_TO_FILL_XML)
    before = metric(backend, "roi_refusals_total", endpoint="/setup", reason="label_config")
    resp = ls.try_connect_backend(project, backend.url)
    reason = "nothing for the backend to fill in"
    assert resp.status_code == 400 and "400 Client Error" in resp.text
    assert reason not in resp.text, "Label Studio 1.23.2 drops the body of a 4xx answer"
    (record,) = logged(backend, "refused", path="/setup", project=project)
    assert record["level"] == "WARNING" and record["status"] == 400 and record["code"] == "label_config"
    assert reason in record["reason"]
    assert metric(backend, "roi_refusals_total", endpoint="/setup", reason="label_config") == before + 1


def test_missing_api_key_reason_is_in_the_backend_log(stack):
    """A backend started without LABEL_STUDIO_API_KEY cannot download uploaded images: Label Studio
    says "Retrieved 2 predictions" and stores none; the backend's log says why, per task."""
    ls: LabelStudio = stack["client"]
    keyless = start_backend(stack["work"] / "keyless", stack["ls"].url, stack["model"],
                            extra_env={"LABEL_STUDIO_API_KEY": ""})  # fmt: skip
    try:
        project = ls.create_project("e2e no api key", CAPTION_XML)
        pictures = scenes(300, 2)
        tasks = upload(ls, project, "nokey", pictures)
        for task, sc in zip(tasks, pictures):
            box = rectangle_result(f"k{task['id']}", sc.objects[0].box, sc.width, sc.height)
            ls.add_prediction(task["id"], [box], "boxes")
        assert ls.connect_backend(project, keyless.url)["state"] == "CO"
        retrieved = ls.retrieve_predictions(project)
        assert retrieved["detail"] == "Retrieved 2 predictions"  # what Label Studio's user reads
        assert not [p for p in ls.predictions(project) if p["model_version"] != "boxes"]
        hint = "answered HTTP 401 (check LABEL_STUDIO_API_KEY)"
        for task in tasks:
            (record,) = logged(keyless, "task skipped", project=project, task=task["id"])
            assert record["level"] == "WARNING" and record["code"] == "image" and hint in record["reason"]
        (refusal,) = logged(keyless, "refused", path="/predict", project=project)
        assert refusal["status"] == 422 and hint in refusal["reason"] and refusal["task"] == tasks[0]["id"]
        assert metric(keyless, "roi_tasks_skipped_total", reason="image") == 2
        assert metric(keyless, "roi_refusals_total", endpoint="/predict", reason="image") == 1
    finally:
        keyless.stop()
