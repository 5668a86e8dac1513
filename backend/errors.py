"""The backend's one error type for requests it refuses with a reason the client can act on.

Every refusal raised anywhere in ``backend/`` is a :class:`ClientError` (or a subclass named for its
module: ``ImageError``, ``PredictionError``, ``ConfigError``, ``CorrectionError``, ``PayloadError``,
``StoreError``).  ``backend.app`` answers all of them with one handler as
``{"status": status, "detail": message}``, logs the refusal (WARNING JSON line with the project,
task and region it concerns when known) and counts it by ``code``; the webhook handler answers its
own with the same status and message.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["ClientError"]


def _class_code(cls: type) -> str:
    """``ImageError`` -> ``"image"``: a bounded metric label (one per error class)."""
    name = cls.__name__.removesuffix("Error") or cls.__name__
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class ClientError(Exception):
    """A request refused with ``status`` (4xx; 502/504 when an image host failed) and ``message``.

    ``message`` is the response's ``detail``, written for the person who sent the request.
    ``code`` is one word from a fixed set (the metric label; default: from the class name, e.g.
    ``image``); ``task`` and ``region`` name the Label Studio task / region id the refusal is about.
    """

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        code: str | None = None,
        task: Any = None,
        region: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code or _class_code(type(self))
        self.task = task
        self.region = region
