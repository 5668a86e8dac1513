"""Label Studio image region tools -> the pixel box the model describes.

Every region tool of an ``<Image>`` is accepted; its result ``type`` names the tool, and its
``value`` holds the geometry in percent of the original image (brush: pixels of it, RLE):

==================  ===========================================  ==========================================
result type         geometry kept (returned as given)            box the model describes
==================  ===========================================  ==========================================
rectangle(labels)   ``x, y, width, height, rotation``            the box around the (rotated) rectangle
polygon(labels)     ``points`` (``[[x, y], ...]``), ``closed``   the box around the points
ellipse(labels)     ``x, y, radiusX, radiusY, rotation``         the box touching the (rotated) ellipse
keypoint(labels)    ``x, y, width``                              a square around the point
                                                                 (:data:`model.geometry.KEYPOINT_BOX_FRACTION`)
brush(labels)       ``format: "rle"``, ``rle``                   the box around the painted pixels
==================  ===========================================  ==========================================

The conversions themselves live in :mod:`model.geometry`; this module reads and checks Label
Studio values and dispatches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from model.geometry import (
    Box,
    BoxError,
    RLEError,
    ellipse_to_pixels,
    keypoint_to_pixels,
    mask_to_pixels,
    polygon_to_pixels,
    rle_decode,
    rotated_rect_to_pixels,
)

__all__ = [
    "LABEL_TYPES",
    "MAX_MASK_PIXELS",
    "REGION_TYPES",
    "SHAPES",
    "ShapeError",
    "mask_pixel_box",
    "region_geometry",
    "region_mask",
    "region_pixel_box",
    "shape_of",
]

# Label Studio result type (= the control tag, lowercased) -> its shape.
SHAPES: dict[str, str] = {
    "rectanglelabels": "rectangle",
    "rectangle": "rectangle",
    "polygonlabels": "polygon",
    "polygon": "polygon",
    "ellipselabels": "ellipse",
    "ellipse": "ellipse",
    "keypointlabels": "keypoint",
    "keypoint": "keypoint",
    "brushlabels": "brush",
    "brush": "brush",
}
REGION_TYPES: tuple[str, ...] = tuple(SHAPES)
LABEL_TYPES: tuple[str, ...] = tuple(t for t in SHAPES if t.endswith("labels"))  # values carry labels
# The largest brush mask decoded (pixels; MAX_IMAGE_PIXELS' default): a few bytes of RLE can claim
# any size, and its original_width/height come with the request.
MAX_MASK_PIXELS = 40_000_000
_NUMBERS = {
    "rectangle": (("x", "y", "width", "height"), ("rotation",)),
    "ellipse": (("x", "y", "radiusX", "radiusY"), ("rotation",)),
    "keypoint": (("x", "y"), ("width",)),
}


class ShapeError(ValueError):
    """A region value that is not the geometry of its tool (the message says why)."""


def shape_of(kind: str) -> str:
    """The shape (``rectangle``, ``polygon``, ``ellipse``, ``keypoint``, ``brush``) of a result type."""
    return SHAPES[kind]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ShapeError(f"{what} must be a number, got {value!r}")
    return float(value)


def region_geometry(kind: str, value: Any) -> dict[str, Any]:
    """The geometry part of a region ``value`` of result type ``kind`` (numbers as floats; labels
    and other keys dropped).  Raises :class:`ShapeError` for a missing or malformed field."""
    shape = SHAPES[kind]
    if not isinstance(value, Mapping):
        raise ShapeError(f"{shape} value must be an object, got {type(value).__name__}")
    if shape in _NUMBERS:
        required, optional = _NUMBERS[shape]
        missing = [k for k in required if k not in value]
        if missing:
            raise ShapeError(f"{shape} value lacks {missing}")
        geo = {k: _number(value[k], f"value.{k}") for k in required}
        for k in optional:
            if value.get(k) is not None or shape == "rectangle":
                geo[k] = _number(value.get(k) or 0, f"value.{k}")
        return geo
    if shape == "polygon":
        points = value.get("points")
        if not isinstance(points, list) or len(points) < 3:
            raise ShapeError("polygon value needs 'points', a list of at least 3 [x, y] pairs")
        pairs = []
        for n, p in enumerate(points):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise ShapeError(f"polygon point {n} must be an [x, y] pair, got {p!r}")
            pairs.append([_number(p[0], f"points[{n}][0]"), _number(p[1], f"points[{n}][1]")])
        geo: dict[str, Any] = {"points": pairs}
        if isinstance(value.get("closed"), bool):
            geo["closed"] = value["closed"]
        return geo
    fmt = value.get("format", "rle")
    rle = value.get("rle")
    if fmt != "rle" or not isinstance(rle, list) or not rle:
        raise ShapeError(f"brush value needs format 'rle' and a non-empty 'rle' list (format {fmt!r})")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in rle):
        raise ShapeError("brush 'rle' must hold byte values (0..255)")
    return {"format": "rle", "rle": rle}


def region_mask(geometry: Mapping[str, Any], original: tuple[int, int]) -> torch.Tensor:
    """A brush geometry's painted pixels, boolean ``(H, W)`` of ``original`` (W, H): the RLE is in
    pixels of the image Label Studio annotated.  Raises :class:`BoxError` for an undecodable RLE
    or one larger than :data:`MAX_MASK_PIXELS`."""
    if original[0] * original[1] > MAX_MASK_PIXELS:
        raise BoxError(
            f"brush RLE of a {original[0]}x{original[1]} image: more than {MAX_MASK_PIXELS} pixels "
            "are not decoded"
        )
    try:
        return rle_decode(geometry["rle"], original[0], original[1])
    except RLEError as exc:
        raise BoxError(f"brush RLE: {exc}") from None


def mask_pixel_box(mask: torch.Tensor, image_w: int, image_h: int) -> Box:
    """Pixel ``xyxy`` of a ``image_w`` x ``image_h`` image around the painted pixels of ``mask``
    ``(H, W)``, a mask of the same image at any resolution (a brush RLE's frame is the image Label
    Studio annotated).  Raises :class:`BoxError` for a mask that paints nothing."""
    oh, ow = mask.shape
    x0, y0, x1, y1 = mask_to_pixels(mask)
    sx, sy = image_w / ow, image_h / oh
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def region_pixel_box(
    kind: str,
    geometry: Mapping[str, Any],
    image_w: int,
    image_h: int,
    original: tuple[int, int] | None = None,
) -> Box:
    """Pixel ``xyxy`` (of a ``image_w`` x ``image_h`` image) the model describes for a region of
    result type ``kind`` (:func:`region_geometry` output).  ``original``: the (W, H) Label Studio
    annotated (``original_width/height``); a brush mask is decoded at it and scaled to the image.

    The box is not yet checked against the image (:func:`model.geometry.check_pixel_box`); raises
    :class:`BoxError` (``not_finite``) for NaN/inf geometry and for an undecodable brush RLE."""
    shape = SHAPES[kind]
    g = geometry
    if shape == "brush":
        return mask_pixel_box(region_mask(g, original or (image_w, image_h)), image_w, image_h)
    if shape == "polygon":
        numbers = [v for p in g["points"] for v in p]
    else:
        numbers = [v for v in g.values() if isinstance(v, float)]
    if not all(math.isfinite(v) for v in numbers):
        shown = [round(v, 2) for v in numbers]
        raise BoxError(f"{shape} {shown} has a NaN or infinite coordinate", "not_finite")
    if shape == "rectangle":
        return rotated_rect_to_pixels(
            g["x"], g["y"], g["width"], g["height"], g.get("rotation", 0.0), image_w, image_h
        )
    if shape == "polygon":
        return polygon_to_pixels(g["points"], image_w, image_h)
    if shape == "ellipse":
        return ellipse_to_pixels(
            g["x"], g["y"], g["radiusX"], g["radiusY"], g.get("rotation", 0.0), image_w, image_h
        )
    return keypoint_to_pixels(g["x"], g["y"], image_w, image_h, width=g.get("width", 0.0))
