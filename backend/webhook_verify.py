"""``WEBHOOK_VERIFY``: check a webhook against Label Studio's API before its data is stored.

A webhook body is only a claim.  With verification on, the backend asks Label Studio
(``LABEL_STUDIO_URL`` with ``LABEL_STUDIO_API_KEY``) for the annotation by id and for its task, and
stores what Label Studio holds - result, ``updated_at``, ``was_cancelled``, the task's data - not
what the body says.  An annotation Label Studio does not have, or has in another project, is
refused (403); a delete is refused while Label Studio still has the annotation.  When Label Studio
cannot be asked, nothing is stored (503: the delivery can be retried).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import requests

from backend.errors import ClientError
from backend.images import ImageError, ImageFetcher
from backend.settings import Settings

__all__ = ["VerifyError", "verified_annotation", "verify_deleted"]

_fetchers: dict[Settings, ImageFetcher] = {}
_fetchers_lock = threading.Lock()


class VerifyError(ClientError):
    """A delivery Label Studio contradicts (403), or that cannot be checked now (502/503)."""


def _fetcher(settings: Settings) -> ImageFetcher:
    """One client per settings: its session and Label Studio access token are reused."""
    with _fetchers_lock:
        if settings not in _fetchers:
            _fetchers[settings] = ImageFetcher(settings)
        return _fetchers[settings]


def _get(settings: Settings, path: str) -> Mapping[str, Any] | None:
    """``GET <LABEL_STUDIO_URL>/api/<path>``: the JSON object, or None for a 404."""
    fetcher = _fetcher(settings)
    try:
        resp = fetcher.session.get(
            f"{fetcher.ls_url}/api/{path}",
            headers=fetcher.auth_header(),
            timeout=settings.image_timeout,
            allow_redirects=False,
        )
    except (requests.RequestException, ImageError) as exc:
        reason = getattr(exc, "message", None) or type(exc).__name__
        raise VerifyError(f"cannot verify with Label Studio ({reason}); nothing stored", 503) from None
    if resp.status_code == 404:
        return None
    if resp.status_code in (401, 403):
        raise VerifyError(
            f"Label Studio refused LABEL_STUDIO_API_KEY (HTTP {resp.status_code}); cannot verify", 502
        )
    if not resp.ok:
        raise VerifyError(f"Label Studio answered HTTP {resp.status_code} to api/{path}; nothing stored", 503)
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, Mapping):
        raise VerifyError(f"Label Studio's answer to api/{path} is not a JSON object; nothing stored", 502)
    return body


def _ref(value: Any) -> Any:
    """An id as Label Studio serialises a foreign key (a number, or an object with ``id``)."""
    return value.get("id") if isinstance(value, Mapping) else value


def verified_annotation(
    settings: Settings, annotation_id: int, project_id: int
) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """``(annotation, task)`` as Label Studio holds them; :class:`VerifyError` when Label Studio
    does not have the annotation in ``project_id``."""
    annotation = _get(settings, f"annotations/{annotation_id}/")
    if annotation is None:
        raise VerifyError(f"annotation {annotation_id} does not exist in Label Studio; refused", 403)
    actual = _ref(annotation.get("project"))
    if actual != project_id:
        raise VerifyError(
            f"annotation {annotation_id} is in project {actual} in Label Studio, not {project_id}; refused",
            403,
        )
    task_id = _ref(annotation.get("task"))
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise VerifyError(f"Label Studio's annotation {annotation_id} names no task; refused", 502)
    task = _get(settings, f"tasks/{task_id}/")
    if task is None:
        raise VerifyError(f"task {task_id} of annotation {annotation_id} does not exist in Label Studio", 403)
    return annotation, task


def verify_deleted(settings: Settings, annotation_ids: list[int]) -> None:
    """Refuse (403) a delete of an annotation Label Studio still has."""
    for annotation_id in annotation_ids:
        if _get(settings, f"annotations/{annotation_id}/") is not None:
            raise VerifyError(f"annotation {annotation_id} still exists in Label Studio; delete refused", 403)
