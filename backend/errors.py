"""The backend's one error type for requests it refuses with a reason the client can act on.

Every refusal raised anywhere in ``backend/`` is a :class:`ClientError` (or a subclass named for its
module: ``ImageError``, ``PredictionError``, ``ConfigError``, ``CorrectionError``, ``PayloadError``,
``StoreError``).  ``backend.app`` answers all of them with one handler as
``{"status": status, "detail": message}`` and logs the refusal; the webhook handler answers its own
with the same status and message.
"""

from __future__ import annotations

__all__ = ["ClientError"]


class ClientError(Exception):
    """A request refused with ``status`` (4xx; 502/504 when an image host failed) and ``message``.

    ``message`` is the response's ``detail``, written for the person who sent the request.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
