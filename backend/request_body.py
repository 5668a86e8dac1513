"""Request bodies -> JSON objects, every cost bounded before it is paid.

* size: the stream is read up to ``limit`` bytes and never further, with or without a
  ``Content-Length`` (a chunked body one byte over the limit is a 413, not silently cut);
* nesting: the depth of arrays/objects is measured on the raw bytes (strings blanked) before
  ``json.loads``, whose C scanner recurses once per level (100,000 levels: ``RecursionError``);
* numbers: ``NaN``, ``Infinity`` and literals beyond a float's range (``1e400``, and integers of
  more than 308 digits, which ``float()`` of a coordinate would overflow) are refused;
* text: a lone UTF-16 surrogate (``"\\ud800"``) is refused; UTF-8 encoders (SQLite, logs) cannot
  write it.

Every refusal is a :class:`BodyError` (a :class:`~backend.errors.ClientError`) naming the limit.
"""

from __future__ import annotations

import json
import math
import re
from typing import IO, Any

import numpy as np

from backend.errors import ClientError

__all__ = ["BodyError", "check_length", "json_depth", "parse_json_object", "read_limited"]

READ_CHUNK = 64 * 1024
# A JSON string: quote, runs of plain bytes and escapes, quote (unrolled: linear, no backtracking).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
MAX_INT_DIGITS = 308  # every integer of up to 308 digits converts to a finite float


class BodyError(ClientError):
    """A request body refused before or while parsing it (400, or 413 when too large)."""


def _too_large(limit: int, setting: str) -> BodyError:
    return BodyError(f"request body is larger than the {limit / 2**20:g} MiB limit ({setting})", 413)


def check_length(content_length: int | None, limit: int, setting: str = "MAX_BODY_MB") -> None:
    """Refuse a declared ``Content-Length`` over ``limit`` before anything is read."""
    if content_length is not None and content_length > limit:
        raise _too_large(limit, setting)


def read_limited(stream: IO[bytes], limit: int, setting: str = "MAX_BODY_MB") -> bytes:
    """All of ``stream`` if it holds at most ``limit`` bytes; reading stops one byte past it."""
    buf = bytearray()
    while True:
        chunk = stream.read(min(READ_CHUNK, limit + 1 - len(buf)))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise _too_large(limit, setting)


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in JSON text (brackets inside strings do not count)."""
    brackets = np.frombuffer(_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if brackets.size == 0:
        return 0
    opens = (brackets == ord("[")) | (brackets == ord("{"))
    return max(int(np.cumsum(opens.astype(np.int32) * 2 - 1).max()), 0)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(f"JSON number {text[:40]} is not a finite float (out of range)")
    return value


def _float_sized_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BodyError(
            f"JSON integer of {len(text.lstrip('-'))} digits is beyond a float's range "
            f"(at most {MAX_INT_DIGITS} digits)"
        )
    return int(text)


def _constant(name: str) -> Any:
    raise BodyError(f"JSON number {name} is not finite; send a finite number")


def _lone_surrogate(payload: Any) -> str | None:
    """``"\\udXXX"`` of the first unpaired surrogate anywhere in ``payload`` (keys too), or None."""
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(exc.object[exc.start]):04x}"
    return None


def parse_json_object(raw: bytes, max_depth: int, setting: str = "MAX_JSON_DEPTH") -> dict[str, Any]:
    """``raw`` as a JSON object, or :class:`BodyError` with the reason (400)."""
    if not raw.strip():
        raise BodyError("request body is empty; expected a JSON object")
    # Fewer opening brackets than the limit (anywhere, strings too) cannot nest deeper: no scan.
    depth = json_depth(raw) if raw.count(b"[") + raw.count(b"{") > max_depth else 0
    if depth > max_depth:
        raise BodyError(f"JSON body is nested deeper than {max_depth} levels ({setting}); got {depth}")
    try:
        payload = json.loads(
            raw, parse_float=_finite_float, parse_int=_float_sized_int, parse_constant=_constant
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"malformed JSON body: {exc}") from None
    if not isinstance(payload, dict):
        raise BodyError(f"JSON body must be an object, got {type(payload).__name__}")
    if _SURROGATE_ESCAPE.search(raw):  # only \u escapes can make a surrogate; UTF-8 bytes cannot
        found = _lone_surrogate(payload)
        if found is not None:
            raise BodyError(
                f"JSON body holds a lone UTF-16 surrogate ({found} without its pair), which is not "
                "valid Unicode text"
            )
    return payload
