"""Label Studio webhook events -> durable corrections store -> fine-tuning jobs.

Interface used by ``backend.app``: :func:`handle_webhook` returns ``(http_status, json_body)``.
"""

from __future__ import annotations

from typing import Any

from backend.settings import Settings


def handle_webhook(payload: dict[str, Any], settings: Settings) -> tuple[int, dict[str, Any]]:
    """Process one webhook delivery.  Placeholder until the corrections store lands."""
    action = payload.get("action")
    return 200, {"status": "Unknown event", "action": action}
