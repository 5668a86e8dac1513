"""Label Studio webhook payloads for tests, shaped like the ones LS 1.23.2 sends (protocol §1.7)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from model.geometry import pixels_to_percent

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="bbox" toName="image"><Label value="Object"/></RectangleLabels>
  <TextArea name="caption" toName="image" perRegion="true" editable="true"/>
  <Choices name="attributes" toName="image" perRegion="true" choice="multiple">
    <Choice value="pink"/><Choice value="red"/><Choice value="circle"/><Choice value="small"/>
  </Choices>
  <Relations><Relation value="left_of"/><Relation value="right_of"/><Relation value="above"/>
    <Relation value="below"/><Relation value="larger_than"/><Relation value="smaller_than"/></Relations>
</View>"""

BASE_TIME = datetime(2025, 1, 1, tzinfo=timezone.utc)


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
) -> list[dict[str, Any]]:
    """A rectangle and its per-region TextArea / Choices results (same id, same geometry)."""
    value = {**pixels_to_percent(box, width, height), "rotation": 0}
    common = {"id": rid, "to_name": "image", "original_width": width, "original_height": height}
    items = [{**common, "from_name": "bbox", "type": "rectanglelabels",
              "value": {**value, "rectanglelabels": ["Object"]}}]  # fmt: skip
    if caption is not None:
        items.append(
            {**common, "from_name": "caption", "type": "textarea", "value": {**value, "text": [caption]}}
        )
    if choices:
        items.append(
            {
                **common,
                "from_name": "attributes",
                "type": "choices",
                "value": {**value, "choices": list(choices)},
            }
        )
    return items


def relation_item(src: str, dst: str, labels: Sequence[str], direction: str = "right") -> dict[str, Any]:
    return {"type": "relation", "from_id": src, "to_id": dst, "direction": direction, "labels": list(labels)}


def annotation_payload(
    annotation_id: int,
    result: list[dict[str, Any]],
    updated_at: str,
    project_id: int = 1,
    task_id: int | None = None,
    image: str = "/data/upload/1/img.png",
    action: str = "ANNOTATION_CREATED",
) -> dict[str, Any]:
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
        "project": {"id": project_id, "title": "corrections", "label_config": LABEL_CONFIG},
    }


def deleted_payload(annotation_ids: Sequence[int], project_id: int = 1) -> dict[str, Any]:
    return {
        "action": "ANNOTATIONS_DELETED",
        "annotations": [{"id": a} for a in annotation_ids],
        "project": {"id": project_id, "label_config": LABEL_CONFIG},
    }


def start_training_payload(project_id: int = 1) -> dict[str, Any]:
    return {"action": "START_TRAINING", "project": {"id": project_id, "label_config": LABEL_CONFIG}}
