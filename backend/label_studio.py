"""Calls from the backend to Label Studio's API (beyond downloading images).

After a fine-tuning job promotes a new version for a project, :func:`set_project_model_version`
sets that project's ``model_version`` in Label Studio, so the Data Manager's *Prediction score*
column and uncertainty sampling use the new version's predictions (Label Studio filters scores by
the project's selected version; protocol reference §4.2).  It is best effort: without
``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` it does nothing, and a failure is logged, never
raised (the version is promoted whatever Label Studio answers).
"""

from __future__ import annotations

import logging

import requests

from backend.images import ImageError, ImageFetcher
from backend.settings import Settings

log = logging.getLogger(__name__)


def set_project_model_version(settings: Settings, project_id: int, version: str) -> str:
    """PATCH ``/api/projects/<id>`` with ``{"model_version": version}``; returns what happened
    (``updated``, ``skipped: ...`` or ``failed: ...``) for the job's summary."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        return "skipped: LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY not set"
    fetcher = ImageFetcher(settings)
    url = f"{fetcher.ls_url}/api/projects/{int(project_id)}"
    try:
        resp = fetcher.session.patch(
            url,
            json={"model_version": version},
            headers=fetcher.auth_header(),
            timeout=settings.image_timeout,
        )
    except (requests.RequestException, ImageError) as exc:
        outcome = f"failed: {getattr(exc, 'message', None) or type(exc).__name__}"
    else:
        outcome = "updated" if resp.ok else f"failed: HTTP {resp.status_code}"
    log.info("Label Studio project %s model_version -> %s: %s", project_id, version, outcome)
    return outcome
