"""End to end: questions about regions typed in the labeling UI, answered within Label Studio's own
interactive request (``/api/ml/{id}/interactive-annotating``) against a real Label Studio 1.23.2.

The project uses ``label_config/region_qa.xml``; the context carries the drawn boxes and the
``question`` TextArea (every turn so far, newest last), as the editor sends them with Auto-Annotation
on.  The backend answers each turn in the ``answer`` TextArea: known kinds with the model's answer,
anything else with ``cannot answer this``.

Run: ``bash scripts/setup_label_studio.sh && .venv/bin/pytest -m e2e tests/test_e2e_region_qa.py``
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import requests

from backend.region_qa import CANNOT_ANSWER
from model.inference.image_input import encode_image
from model.tasks import RELATION_LABELS
from tools.ls.harness import LabelStudio, start_backend, start_label_studio
from tools.ls.payloads import rectangle_result
from toyworld.scenes import SceneSpec, make_scene

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "model" / "default"
TRAINED = (DEFAULT_MODEL / "version.json").exists()
SEED = 8_700_000  # far from the training and evaluation seeds
SCENES = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    work = tmp_path_factory.mktemp("e2e-qa")
    model = DEFAULT_MODEL if TRAINED else request.getfixturevalue("tiny_checkpoint")
    ls = start_label_studio(work / "ls")
    try:
        backend = start_backend(work / "backend", ls.url, model)
    except BaseException:
        ls.stop()
        raise
    yield {"ls": ls, "backend": backend, "client": LabelStudio(ls.url)}
    backend.stop()
    ls.stop()


def test_a_typed_question_about_boxes_is_answered_interactively(stack):
    ls: LabelStudio = stack["client"]
    project = ls.create_project("e2e region questions", (REPO / "label_config" / "region_qa.xml").read_text())
    scenes = [
        make_scene(random.Random(SEED + i), SceneSpec(min_objects=2, max_objects=3)) for i in range(SCENES)
    ]
    tasks = ls.upload_images(project, [(f"qa-{i}.png", encode_image(s.image)) for i, s in enumerate(scenes)])
    ml = ls.connect_backend(project, stack["backend"].url)
    assert ml["state"] == "CO", ml
    turns = [
        "What colour is box 2?",
        "And what shape is it?",
        "Where is region 1 relative to region 2?",
        "What is <region1> doing with box 2?",
    ]
    for i, scene in enumerate(scenes):
        boxes = [{**rectangle_result(f"qa{i}b{k}", o.box, scene.width, scene.height), "origin": "manual"}
                 for k, o in enumerate(scene.objects)]  # fmt: skip
        question = {
            "id": f"qa{i}q", "from_name": "question", "to_name": "image", "type": "textarea",
            "origin": "manual", "value": {"text": turns},
        }  # fmt: skip
        data = ls.interactive(ml["id"], tasks[f"qa-{i}.png"]["id"], {"result": [*boxes, question]})["data"]
        (answer,) = [r for r in data["result"] if r["from_name"] == "answer"]
        assert answer["type"] == "textarea" and answer["to_name"] == "image"
        colour, shape, relation, refused = answer["value"]["text"]
        assert refused == CANNOT_ANSWER  # never a made-up shape for a question it was not taught
        assert CANNOT_ANSWER not in (colour, shape, relation)
        if TRAINED:
            assert (colour, shape) == (scene.objects[1].color, scene.objects[1].shape), answer
            words = [w.strip() for w in relation.split(",")]
            assert relation == "near" or all(w in RELATION_LABELS for w in words), relation
    log = stack["backend"].log.read_text()
    assert "region question not answered" in log
    assert requests.get(f"{stack['backend'].url}/health", timeout=5).ok
