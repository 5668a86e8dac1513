"""Label Studio JSON as Label Studio 1.23.2 sends it (protocol reference §1.7): label configs, region
results, relations, annotations and the webhook bodies built from them.

The one place tests, the active-learning demo and the Label Studio harness build these payloads.
Boxes are pixel ``xyxy``; results carry them in percent of ``original_width`` /
``original_height`` like Label Studio does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from model.geometry import pixels_to_percent
from model.tasks import ATTRIBUTE_VALUES, RELATION_LABELS, relation_labels
from toyworld.scenes import Scene

__all__ = [
    "BASE_TIME",
    "LABEL_CONFIG",
    "SCENE_LABEL_CONFIG",
    "annotation_payload",
    "deleted_payload",
    "label_config",
    "rectangle_result",
    "region_items",
    "relation_item",
    "scene_payload",
    "scene_result",
    "start_training_payload",
    "timestamp",
]

BASE_TIME = datetime(2025, 1, 1, tzinfo=timezone.utc)


def label_config(choices: Sequence[str], smart: bool = False) -> str:
    """A project config with the controls these payloads fill: rectangles ``bbox`` (label
    ``Object``), a per-region TextArea ``caption``, one per-region multiple-choice ``attributes``
    offering ``choices``, and the six relation labels of ``model.tasks``."""
    choice_tags = "".join(f'<Choice value="{c}"/>' for c in choices)
    relation_tags = "".join(f'<Relation value="{r.replace(" ", "_")}"/>' for r in RELATION_LABELS)
    smart_attr = ' smart="true"' if smart else ""
    return f"""<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="bbox" toName="image"{smart_attr}><Label value="Object"/></RectangleLabels>
  <TextArea name="caption" toName="image" perRegion="true" editable="true"/>
  <Choices name="attributes" toName="image" perRegion="true" choice="multiple">{choice_tags}</Choices>
  <Relations>{relation_tags}</Relations>
</View>"""


# A few attribute choices, enough for the webhook tests (answers outside them are dropped).
LABEL_CONFIG = label_config(("pink", "red", "circle", "small"))
# Every colour, shape and size word the default model answers, for annotations of whole scenes.
SCENE_LABEL_CONFIG = label_config(
    (*ATTRIBUTE_VALUES["color"], *ATTRIBUTE_VALUES["shape"], *ATTRIBUTE_VALUES["size"]), smart=True
)


def timestamp(seconds: float) -> str:
    """An LS-style ``updated_at`` string ``seconds`` after a fixed base time."""
    return (BASE_TIME + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def region_items(
    rid: str,
    box: Sequence[float],
    width: int,
    height: int,
    caption: str | None = None,
    choices: Sequence[str] = (),
    label: str = "Object",
    origin: str | None = None,
) -> list[dict[str, Any]]:
    """A rectangle and its per-region TextArea / Choices results (same id, same geometry).

    ``box``: pixel ``xyxy`` on a ``width`` x ``height`` image.  ``origin`` (``"manual"`` for a box
    drawn in the labeling UI) is set on every item when given."""
    value = {**pixels_to_percent(box, width, height), "rotation": 0}
    common = {"id": rid, "to_name": "image", "original_width": width, "original_height": height,
              "image_rotation": 0, **({"origin": origin} if origin else {})}  # fmt: skip
    items = [{**common, "from_name": "bbox", "type": "rectanglelabels",
              "value": {**value, "rectanglelabels": [label]}}]  # fmt: skip
    if caption is not None:
        items.append(
            {**common, "from_name": "caption", "type": "textarea", "value": {**value, "text": [caption]}}
        )
    if choices:
        attributes = {**value, "choices": list(choices)}
        items.append({**common, "from_name": "attributes", "type": "choices", "value": attributes})
    return items


def rectangle_result(rid: str, box: Sequence[float], width: int, height: int, label: str = "Object") -> dict:
    """The ``rectanglelabels`` result (control ``bbox``) of a pixel ``xyxy`` box."""
    return region_items(rid, box, width, height, label=label)[0]


def relation_item(src: str, dst: str, labels: Sequence[str], direction: str = "right") -> dict[str, Any]:
    """A relation between the regions ``src`` and ``dst`` (``direction="right"``: arrow src -> dst)."""
    return {"type": "relation", "from_id": src, "to_id": dst, "direction": direction, "labels": list(labels)}


def scene_result(scene: Scene, prefix: str = "r") -> list[dict[str, Any]]:
    """A reviewer's complete annotation of a synthetic scene (for :data:`SCENE_LABEL_CONFIG`): every
    object boxed, captioned, its colour, shape and size chosen, and the spatial relations between
    consecutive objects drawn."""
    w, h = scene.width, scene.height
    items: list[dict[str, Any]] = []
    for k, obj in enumerate(scene.objects):
        items += region_items(f"{prefix}{k}", obj.box, w, h, obj.caption, (obj.color, obj.shape, obj.size),
                              origin="manual")  # fmt: skip
    n = len(scene.objects)
    for k in range(n):
        a, b = scene.objects[k], scene.objects[(k + 1) % n]
        labels = [lbl.replace(" ", "_") for lbl in relation_labels(a.box, b.box, w, h)]
        if labels and n > 1:
            items.append(relation_item(f"{prefix}{k}", f"{prefix}{(k + 1) % n}", labels))
    return items


def annotation_payload(
    annotation_id: int,
    result: list[dict[str, Any]],
    updated_at: str,
    project_id: int = 1,
    task_id: int | None = None,
    image: str = "/data/upload/1/img.png",
    action: str = "ANNOTATION_CREATED",
    label_config: str = LABEL_CONFIG,
) -> dict[str, Any]:
    """The ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` webhook body of one annotation."""
    task_id = annotation_id + 1000 if task_id is None else task_id
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "task": task_id,
            "project": project_id,
            "result": result,
            "completed_by": 1,
            "was_cancelled": False,
            "ground_truth": False,
            "created_at": updated_at,
            "updated_at": updated_at,
            "lead_time": 3.2,
        },
        "task": {"id": task_id, "data": {"image": image}, "meta": {}, "project": project_id},
        "project": {"id": project_id, "title": "corrections", "label_config": label_config},
    }


def scene_payload(
    scene: Scene,
    annotation_id: int,
    image: str,
    updated_at: str,
    project_id: int = 1,
    task_id: int | None = None,
) -> dict[str, Any]:
    """The ``ANNOTATION_CREATED`` webhook body of a reviewer's annotation of ``scene`` (stored at
    ``image``, a task data URL such as ``/data/local-files/?d=<name>``)."""
    return annotation_payload(
        annotation_id, scene_result(scene), updated_at, project_id, task_id, image,
        label_config=SCENE_LABEL_CONFIG,
    )  # fmt: skip


def deleted_payload(annotation_ids: Sequence[int], project_id: int = 1) -> dict[str, Any]:
    """The ``ANNOTATIONS_DELETED`` webhook body."""
    return {
        "action": "ANNOTATIONS_DELETED",
        "annotations": [{"id": a} for a in annotation_ids],
        "project": {"id": project_id, "label_config": LABEL_CONFIG},
    }


def start_training_payload(project_id: int = 1) -> dict[str, Any]:
    """The ``START_TRAINING`` webhook body (*Start Training* in the project's model settings)."""
    return {"action": "START_TRAINING", "project": {"id": project_id, "label_config": LABEL_CONFIG}}
