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
* ``START_TRAINING``: a training request for the project, whatever the count, when
  ``TRAIN_TRIGGER`` includes ``manual`` (else 409, nothing requested).
* ``TASKS_CREATED``: with ``PREANNOTATE_ON_IMPORT`` on, the new tasks are pre-annotated by chunk
  jobs (:mod:`backend.preannotate`); off (the default), nothing happens.

Training trigger: a region counts towards ``TRAIN_MIN_CORRECTIONS`` only when the reviewer gave it
text that the model did not (:mod:`backend.predicted`), and the count requests training only when
``TRAIN_TRIGGER`` includes ``threshold``.
* any other action: 200 ``{"status": "Unknown event"}``; a malformed payload: 400 with the reason.

Trust (every refusal is answered with its status and reason and logged at WARNING):

* ``WEBHOOK_SECRET`` set: the ``X-Webhook-Secret`` header must equal it (constant-time compare),
  else 401.  ``START_TRAINING`` carries no data and Label Studio's "Start Training" button sends it
  over the ML backend connection, which can send basic auth but no custom header: with
  ``BASIC_AUTH_*`` configured (the app has checked it) it needs no secret.
* An annotation id belongs to the project that first stored it: an update or delete naming another
  project is refused (409) and changes nothing; the body's project ids must agree (400).
* ``updated_at`` more than ``WEBHOOK_MAX_SKEW_SECONDS`` ahead of this server's clock is refused
  (422), so a forged far-future time cannot pin a record against the reviewer's real edits.
* ``WEBHOOK_VERIFY``: the annotation is fetched from Label Studio and that is stored
  (:mod:`backend.webhook_verify`).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from backend import webhook_verify
from backend.corrections import Region, image_reference, parse_result
from backend.errors import ClientError
from backend.jobs import flush_outbox, redis_connection
from backend.label_config import ConfigError, LabelConfig, parse_label_config
from backend.predicted import corrected_regions, open_prediction_log
from backend.settings import Settings
from backend.store import open_store, parse_timestamp

__all__ = ["HANDLERS", "SECRET_HEADER", "PayloadError", "handle_webhook"]

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
SECRET_HEADER = "X-Webhook-Secret"
MAX_ID = 2**63 - 1  # Label Studio's ids are positive 64-bit integers, as SQLite stores them


class PayloadError(ClientError):
    """A webhook payload missing what its action needs, or naming what it may not (4xx)."""


def _authenticate(action: str, secret: str | None, settings: Settings, basic_auth: bool) -> None:
    """401 unless the delivery carries ``WEBHOOK_SECRET`` (see the module docstring)."""
    if not settings.webhook_secret:
        return
    given = (secret or "").encode()
    if hmac.compare_digest(given, settings.webhook_secret.encode()):
        return
    if action == "START_TRAINING" and basic_auth:
        return
    why = "missing" if secret is None else "wrong"
    raise PayloadError(f"webhook refused: header {SECRET_HEADER} is {why} (WEBHOOK_SECRET is set)", 401)


def _id(value: Any, what: str) -> int:
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PayloadError(f"{what} must be an integer id, got {value!r:.80}")
    try:
        number = int(value)
    except ValueError:
        raise PayloadError(f"{what} must be an integer id, got {value!r:.80}") from None
    if not 1 <= number <= MAX_ID:
        raise PayloadError(f"{what} must be an integer id between 1 and 2**63-1, got {value!r:.80}")
    return number


def _project_id(payload: Mapping[str, Any]) -> int:
    """The delivery's project; every place the body names one must agree."""
    named = []
    for where, holder in (("project", payload), ("annotation.project", payload.get("annotation")),
                          ("task.project", payload.get("task"))):  # fmt: skip
        if isinstance(holder, Mapping) and holder.get("project") is not None:
            named.append((where, _id(holder["project"], f"{where} id")))
    if not [where for where, _ in named if where != "task.project"]:
        raise PayloadError("payload has no 'project'")
    if len({pid for _, pid in named}) > 1:
        raise PayloadError(f"payload names different projects: {', '.join(f'{w}={p}' for w, p in named)}")
    return named[0][1]


def _check_not_future(updated_at: Any, settings: Settings) -> None:
    """422 for a time beyond this server's clock plus ``WEBHOOK_MAX_SKEW_SECONDS``."""
    ahead = parse_timestamp(updated_at) / 1e6 - time.time()
    if ahead > settings.webhook_max_skew_seconds:
        raise PayloadError(
            f"annotation updated_at {str(updated_at)[:40]!r} is in the future ({ahead:.0f} s ahead of this "
            f"server's clock; at most {settings.webhook_max_skew_seconds:g} s allowed, "
            "WEBHOOK_MAX_SKEW_SECONDS)",
            422,
        )


def _label_config(payload: Mapping[str, Any]) -> LabelConfig | None:
    """The project's config, when it is usable."""
    project = payload.get("project")
    xml = project.get("label_config") if isinstance(project, Mapping) else None
    if not isinstance(xml, str) or not xml.strip():
        return None
    try:
        return parse_label_config(xml)
    except ConfigError:
        return None  # corrections can still be read from the result items alone


def _corrections(
    regions: list[Region],
    annotation: Mapping[str, Any],
    project_id: int,
    task_id: int | None,
    settings: Settings,
) -> set[str]:
    """Ids of the regions that count as corrections: text the model did not give."""
    with_text = [r.region_id for r in regions if r.has_text]
    if not with_text:
        return set()
    said = open_prediction_log(settings.data_dir).predicted_for(project_id, task_id, annotation)
    return corrected_regions(annotation.get("result"), with_text, said)


def _on_annotation(payload: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    annotation = payload.get("annotation")
    if not isinstance(annotation, Mapping):
        raise PayloadError(f"{payload['action']} needs an 'annotation' object")
    task = payload.get("task")
    if not isinstance(task, Mapping):
        raise PayloadError(f"{payload['action']} needs a 'task' object")
    project_id = _project_id(payload)
    annotation_id = _id(annotation.get("id"), "annotation.id")
    if settings.webhook_verify:
        annotation, task = webhook_verify.verified_annotation(settings, annotation_id, project_id)
    updated_at = annotation.get("updated_at") or annotation.get("created_at")
    if updated_at is None:
        raise PayloadError("annotation has no 'updated_at' (needed to order deliveries)")
    _check_not_future(updated_at, settings)
    cfg = _label_config(payload)
    image_var = cfg.image_var if cfg else None
    parsed = parse_result(
        annotation.get("result"),
        image_name=cfg.image_name if cfg else None,
        caption_control=cfg.caption if cfg else None,
        max_text_chars=settings.max_text_chars,
        open_controls=cfg.open_controls if cfg else None,  # new choice values are new vocabulary
        new_relations=tuple(cfg.new_relation_labels) if cfg else (),
        aliases=cfg.choice_aliases if cfg else None,
    )
    if annotation.get("was_cancelled"):
        parsed.regions = []  # a skipped task corrects nothing; drop what an earlier version said
    image = image_reference(task.get("data"), image_var)
    task_id = _id(task.get("id"), "task.id") if task.get("id") is not None else None
    corrected = _corrections(parsed.regions, annotation, project_id, task_id, settings)
    store = open_store(settings.data_dir)
    written = store.apply_annotation(
        project_id,
        annotation_id,
        updated_at,
        image,
        parsed.width,
        parsed.height,
        parsed.regions,
        task_id=task_id,
        train_threshold=settings.train_min_corrections if "threshold" in settings.train_triggers else None,
        corrections=corrected,
    )
    if parsed.skipped:
        log.info("annotation %s: skipped %s", annotation_id, "; ".join(parsed.skipped[:10]))
    return {
        "annotation": annotation_id,
        "project": project_id,
        "stored": written.status,
        "regions": written.regions,
        "corrections": len(corrected),
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
    if settings.webhook_verify:
        webhook_verify.verify_deleted(settings, ids)
    removed = open_store(settings.data_dir).delete_annotations(project_id, ids)
    return {"project": project_id, "deleted": removed}


def _on_start_training(payload: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    project_id = _project_id(payload)
    if "manual" not in settings.train_triggers:
        raise PayloadError(
            f"START_TRAINING ignored: TRAIN_TRIGGER={settings.train_trigger} does not include manual", 409
        )
    open_store(settings.data_dir).request_training(project_id, "START_TRAINING")
    return {"project": project_id, "training_requested": True}


def _on_tasks_created(payload: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """Pre-annotate the imported tasks when ``PREANNOTATE_ON_IMPORT`` is on (chunk jobs on RQ)."""
    project_id = _project_id(payload)
    if not settings.preannotate_on_import:
        return {"project": project_id, "preannotate": "off (PREANNOTATE_ON_IMPORT)"}
    tasks = payload.get("tasks")
    if not isinstance(tasks, list):
        raise PayloadError("TASKS_CREATED needs a 'tasks' list")
    ids = [_id(task, "tasks[].id") for task in tasks]
    from backend import preannotate  # the model stack, only when asked for

    try:
        status = preannotate.start_run(
            settings, redis_connection(settings, fast=True), project_id, preannotate.Selection(tuple(ids)),
            task_ids=ids,
        )  # fmt: skip
    except (RedisError, OSError) as exc:  # Label Studio does not retry: say so in the log and the answer
        log.warning(
            "pre-annotation not enqueued",
            extra={"project": project_id, "tasks": len(ids), "reason": str(exc)},
        )
        return {"project": project_id, "preannotate": f"error: {exc}"}
    return {"project": project_id, "preannotate": status["run"], "tasks": status["total"]}


HANDLERS = {
    "TASKS_CREATED": _on_tasks_created,
    "ANNOTATION_CREATED": _on_annotation,
    "ANNOTATION_UPDATED": _on_annotation,
    "ANNOTATIONS_DELETED": _on_deleted,
    "START_TRAINING": _on_start_training,
}


def _context(payload: Any) -> dict[str, Any]:
    """Project, task and annotation ids a delivery names, for its refusal's log line (as given)."""
    out: dict[str, Any] = {}
    if not isinstance(payload, Mapping):
        return out
    for key in ("project", "task", "annotation"):
        holder = payload.get(key)
        value = holder.get("id") if isinstance(holder, Mapping) else holder
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            out[key] = value if isinstance(value, int) else value[:40]
    return out


def handle_webhook(
    payload: dict[str, Any], settings: Settings, secret: str | None = None, basic_auth: bool = False
) -> tuple[int, dict[str, Any]]:
    """Process one webhook delivery: persist first, then try to enqueue (see module doc).

    ``secret``: the request's ``X-Webhook-Secret`` header (None when absent); ``basic_auth``: the
    request passed the app's HTTP basic auth.
    """
    action = payload.get("action") if isinstance(payload, Mapping) else None
    try:
        _authenticate(action if isinstance(action, str) else "", secret, settings, basic_auth)
        if not isinstance(payload, Mapping):
            raise PayloadError("webhook body must be a JSON object")
        if not isinstance(action, str) or not action:
            raise PayloadError("webhook body has no 'action'")
        handler = HANDLERS.get(action)
        if handler is None:
            return 200, {"status": "Unknown event", "action": action}
        result = handler(payload, settings)
    except ClientError as exc:
        context = {"status": exc.status, "reason": exc.message, "code": exc.code, **_context(payload)}
        log.warning("webhook refused", extra={"action": action, **context})
        body = {"status": "error", "detail": exc.message, "code": exc.code}
        return exc.status, ({**body, "action": action} if isinstance(action, str) and action else body)
    # The correction is committed; a Redis failure below only delays the job (outbox).
    result["jobs"] = flush_outbox(settings, open_store(settings.data_dir))
    return 201, {"status": "ok", "action": action, "result": result}
