"""Calls from the backend to Label Studio's API (beyond downloading images).

After a fine-tuning job promotes a new version for a project, :func:`set_project_model_version`
makes that project's ``model_version`` in Label Studio name it, so the Data Manager's *Prediction
score* column and uncertainty sampling use the new version's predictions (Label Studio filters
scores by the project's selected version; protocol reference §4.2).

Label Studio 1.23.2 accepts a project ``model_version`` only when it is an ML backend's *title* or
the version of stored predictions (``ProjectSerializer.validate_model_version``); the version the
backend reports in ``/setup`` does not count.  A version just promoted has no predictions yet, so
the update runs in the order Label Studio accepts:

1. ``GET /api/ml?project=<id>`` until the project's ML backend reports the new version (each call
   makes Label Studio re-read ``/health`` and ``/setup``; the serving processes pick a promotion
   up within ``MODEL_POLL_SECONDS`` plus its load), at most ``LABEL_STUDIO_SYNC_SECONDS``;
2. unless predictions of that version exist already: the Data Manager action
   ``retrieve_tasks_predictions`` on up to ``LABEL_STUDIO_PREDICT_TASKS`` tasks that have boxes
   (unlabeled tasks with earlier predictions first, then labeled ones), so Label Studio stores
   predictions of the new version;
3. ``PATCH /api/projects/<id>`` with ``{"model_version": version}``.

It is best effort: without ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` it does nothing, and a
failure is logged at WARNING with the step and reason, never raised (the version is promoted
whatever Label Studio answers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import requests

from backend.images import ImageError, ImageFetcher
from backend.settings import Settings, SettingsError

__all__ = ["LabelStudioApi", "LabelStudioError", "set_project_model_version"]

log = logging.getLogger(__name__)

PREDICT_TIMEOUT = 300.0  # seconds: Label Studio calls /predict synchronously inside the action
TASK_PAGE = 100  # tasks read to choose the ones Label Studio predicts


class LabelStudioError(RuntimeError):
    """A Label Studio API call that failed; the message names the step and the reason."""


class LabelStudioApi:
    """Authenticated JSON calls to one Label Studio."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fetcher = ImageFetcher(settings)

    def call(self, method: str, path: str, timeout: float | None = None, **kw: Any) -> Any:
        url = f"{self.fetcher.ls_url}/api/{path}"
        try:
            resp = self.fetcher.session.request(
                method, url, headers=self.fetcher.auth_header(), allow_redirects=False,
                timeout=timeout or self.settings.image_timeout, **kw,
            )  # fmt: skip
        except (requests.RequestException, ImageError) as exc:
            reason = getattr(exc, "message", None) or type(exc).__name__
            raise LabelStudioError(f"{method} /api/{path}: {reason}") from None
        if not resp.ok:
            raise LabelStudioError(f"{method} /api/{path}: HTTP {resp.status_code} {_detail(resp)}")
        try:
            return resp.json() if resp.content else None
        except ValueError:
            raise LabelStudioError(f"{method} /api/{path}: the answer is not JSON") from None


def _detail(resp: requests.Response) -> str:
    """Label Studio's reason for a refusal (its validation errors when it gives them)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, Mapping):
        errors = body.get("validation_errors") or body.get("detail") or body
        return str(errors)[:300]
    return str(body)[:300]


def _live_versions(api: LabelStudioApi, project_id: int) -> dict[int, str | None]:
    """``{ml backend id: model version}`` of the project's ML backends, as Label Studio re-reads them
    from each backend's ``/setup`` right now."""
    backends = api.call("GET", f"ml?project={project_id}")
    if not isinstance(backends, list):
        raise LabelStudioError(f"GET /api/ml?project={project_id}: not a list")
    return {int(b["id"]): b.get("model_version") for b in backends if isinstance(b, Mapping) and "id" in b}


def _wait_for_live_version(
    api: LabelStudioApi, project_id: int, version: str, timeout: float, poll: float
) -> int:
    """Poll until one of the project's ML backends reports ``version``; returns its id."""
    deadline = time.monotonic() + timeout
    while True:
        live = _live_versions(api, project_id)
        if not live:
            raise LabelStudioError(f"project {project_id} has no ML backend connected in Label Studio")
        serving = [ml for ml, v in live.items() if v == version]
        if serving:
            return serving[0]
        if time.monotonic() >= deadline:
            raise LabelStudioError(
                f"Label Studio's ML backend of project {project_id} still reports "
                f"{sorted(set(map(str, live.values())))} after {timeout:g} s, not {version} "
                "(is the backend serving it? its log says 'model swapped')"
            )
        time.sleep(max(poll, 0.2))  # the backend's next look at the registry


def _stored_versions(api: LabelStudioApi, project_id: int) -> dict[str, int]:
    versions = api.call("GET", f"projects/{project_id}/model-versions")
    return dict(versions) if isinstance(versions, Mapping) else {}


def _tasks_to_predict(api: LabelStudioApi, project_id: int, limit: int) -> list[int]:
    """Tasks whose boxes the model can describe: unlabeled ones with earlier predictions first
    (their new scores drive uncertainty sampling), then labeled ones."""
    page = api.call("GET", f"tasks?project={project_id}&page_size={TASK_PAGE}&page=1")
    tasks = page.get("tasks", []) if isinstance(page, Mapping) else page or []
    rows = [t for t in tasks if isinstance(t, Mapping) and isinstance(t.get("id"), int)]
    unlabeled = [t["id"] for t in rows if not t.get("total_annotations") and t.get("total_predictions")]
    labeled = [t["id"] for t in rows if t.get("total_annotations")]
    return (unlabeled + labeled)[:limit]


def _predict(api: LabelStudioApi, project_id: int, task_ids: list[int]) -> None:
    api.call(
        "POST",
        f"dm/actions?id=retrieve_tasks_predictions&project={project_id}",
        json={"selectedItems": {"all": False, "included": task_ids}},
        timeout=PREDICT_TIMEOUT,
    )


def _predict_until_stored(
    api: LabelStudioApi, settings: Settings, project_id: int, version: str, deadline: float
) -> list[int]:
    """Have Label Studio predict a few tasks until it stores a prediction of ``version``; returns the
    tasks.  Repeated while time is left: with several serving processes, the one answering
    ``/predict`` may still be loading the version another one already reported in ``/setup``."""
    tasks = _tasks_to_predict(api, project_id, settings.label_studio_predict_tasks)
    if not tasks:
        raise LabelStudioError(
            f"project {project_id} has no task with boxes to predict, and Label Studio accepts a "
            "project model_version only once predictions of it exist"
        )
    while True:
        _predict(api, project_id, tasks)
        if _stored_versions(api, project_id).get(version):
            return tasks
        if time.monotonic() >= deadline:
            raise LabelStudioError(
                f"Label Studio stored no prediction of {version} for tasks {tasks} (see the backend's "
                "/predict log lines)"
            )
        time.sleep(max(settings.model_poll_seconds, 0.2))  # the other processes' next look


def set_project_model_version(settings: Settings, project_id: int, version: str) -> str:
    """Make Label Studio's project ``project_id`` select ``version`` (see the module docstring);
    returns what happened for the job's summary: ``updated``, ``skipped: ...`` or ``failed: ...``."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        return "skipped: LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY not set"
    started = time.monotonic()
    facts: dict[str, Any] = {"project": project_id, "version": version}
    try:
        api = LabelStudioApi(settings)
        deadline = time.monotonic() + settings.label_studio_sync_seconds
        facts["ml_backend"] = _wait_for_live_version(
            api, project_id, version, settings.label_studio_sync_seconds, settings.model_poll_seconds
        )
        facts["live_after_s"] = round(time.monotonic() - started, 2)
        if version not in _stored_versions(api, project_id):
            facts["predicted_tasks"] = _predict_until_stored(api, settings, project_id, version, deadline)
        api.call("PATCH", f"projects/{project_id}", json={"model_version": version})
        shown = (api.call("GET", f"projects/{project_id}") or {}).get("model_version")
        if shown != version:
            raise LabelStudioError(f"the project still shows model_version {shown!r} after the update")
    except (LabelStudioError, ImageError, SettingsError) as exc:
        reason = getattr(exc, "message", None) or str(exc)
        log.warning("Label Studio project model_version not updated", extra={**facts, "reason": reason})
        return f"failed: {reason}"
    facts["seconds"] = round(time.monotonic() - started, 2)
    log.info("Label Studio project model_version updated", extra=facts)
    return "updated"
