"""Label Studio webhook events -> durable corrections store -> fine-tuning jobs.

Interface used by ``backend.app``: :func:`handle_webhook` returns ``(http_status, json_body)``.

Label Studio waits about 1 s for a webhook, so the request only parses, commits one SQLite
transaction (the correction, and a training request in the outbox when the project has
``TRAIN_MIN_CORRECTIONS`` new corrected regions) and then tries to hand pending requests to Redis
with sub-second timeouts.  No model is loaded and nothing is trained here; if Redis is down the
answer is still 201 (the correction is stored) and the request waits in the outbox.

* ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``: the annotation's regions replace its previous
  version, if newer (replays and out-of-order deliveries change nothing).
* ``ANNOTATIONS_DELETED``: the annotations and their regions are removed.
* ``START_TRAINING``: a training request for the project, whatever the count.
* any other action: 200 ``{"status": "Unknown event"}``; a malformed payload: 400 with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from backend.corrections import image_reference, parse_result
from backend.errors import ClientError
from backend.jobs import flush_outbox
from backend.label_config import ConfigError, parse_label_config
from backend.settings import Settings
from backend.store import open_store

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")


class PayloadError(ClientError):
    """A webhook payload missing what its action needs (answered with 400)."""


def _id(value: Any, what: str) -> int:
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PayloadError(f"{what} must be an integer id, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise PayloadError(f"{what} must be an integer id, got {value!r}") from None


def _project_id(payload: Mapping[str, Any]) -> int:
    project = payload.get("project")
    if project is None and isinstance(payload.get("annotation"), Mapping):
        project = payload["annotation"].get("project")
    if project is None:
        raise PayloadError("payload has no 'project'")
    return _id(project, "project id")


def _label_config(payload: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """``(image_var, image_name, caption_control)`` from the project's config, when it is usable."""
    project = payload.get("project")
    xml = project.get("label_config") if isinstance(project, Mapping) else None
    if not isinstance(xml, str) or not xml.strip():
        return None, None, None
    try:
        cfg = parse_label_config(xml)
    except ConfigError:
        return None, None, None  # corrections can still be read from the result items alone
    return cfg.image_var, cfg.image_name, cfg.caption


def _on_annotation(payload: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    annotation = payload.get("annotation")
    if not isinstance(annotation, Mapping):
        raise PayloadError(f"{payload['action']} needs an 'annotation' object")
    task = payload.get("task")
    if not isinstance(task, Mapping):
        raise PayloadError(f"{payload['action']} needs a 'task' object")
    project_id = _project_id(payload)
    annotation_id = _id(annotation.get("id"), "annotation.id")
    updated_at = annotation.get("updated_at") or annotation.get("created_at")
    if updated_at is None:
        raise PayloadError("annotation has no 'updated_at' (needed to order deliveries)")
    image_var, image_name, caption = _label_config(payload)
    parsed = parse_result(annotation.get("result"), image_name=image_name, caption_control=caption)
    if annotation.get("was_cancelled"):
        parsed.regions = []  # a skipped task corrects nothing; drop what an earlier version said
    image = image_reference(task.get("data"), image_var)
    store = open_store(settings.data_dir)
    written = store.apply_annotation(
        project_id,
        annotation_id,
        updated_at,
        image,
        parsed.width,
        parsed.height,
        parsed.regions,
        task_id=_id(task.get("id"), "task.id") if task.get("id") is not None else None,
        train_threshold=settings.train_min_corrections,
    )
    if parsed.skipped:
        log.info("annotation %s: skipped %s", annotation_id, "; ".join(parsed.skipped[:10]))
    return {
        "annotation": annotation_id,
        "project": project_id,
        "stored": written.status,
        "regions": written.regions,
        "new_corrections": written.new_corrections,
        "training_requested": written.training_requested,
        "skipped": parsed.skipped,
    }


def _on_deleted(payload: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    items = payload.get("annotations")
    if not isinstance(items, list):
        raise PayloadError("ANNOTATIONS_DELETED needs an 'annotations' list")
    ids = [_id(item, "annotations[].id") for item in items]
    project_id = _project_id(payload)
    removed = open_store(settings.data_dir).delete_annotations(project_id, ids)
    return {"project": project_id, "deleted": removed}


def _on_start_training(payload: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    project_id = _project_id(payload)
    open_store(settings.data_dir).request_training(project_id, "START_TRAINING")
    return {"project": project_id, "training_requested": True}


HANDLERS = {
    "ANNOTATION_CREATED": _on_annotation,
    "ANNOTATION_UPDATED": _on_annotation,
    "ANNOTATIONS_DELETED": _on_deleted,
    "START_TRAINING": _on_start_training,
}


def handle_webhook(payload: dict[str, Any], settings: Settings) -> tuple[int, dict[str, Any]]:
    """Process one webhook delivery: persist first, then try to enqueue (see module doc)."""
    if not isinstance(payload, Mapping):
        return 400, {"status": "error", "detail": "webhook body must be a JSON object"}
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        return 400, {"status": "error", "detail": "webhook body has no 'action'"}
    handler = HANDLERS.get(action)
    if handler is None:
        return 200, {"status": "Unknown event", "action": action}
    try:
        result = handler(payload, settings)
    except ClientError as exc:
        log.warning("webhook refused", extra={"action": action, "status": exc.status, "reason": exc.message})
        return exc.status, {"status": "error", "action": action, "detail": exc.message}
    # The correction is committed; a Redis failure below only delays the job (outbox).
    result["jobs"] = flush_outbox(settings, open_store(settings.data_dir))
    return 201, {"status": "ok", "action": action, "result": result}
