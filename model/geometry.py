"""Box geometry: the one place where coordinates change frame.

Frames used in the project:

* **percent** – Label Studio rectangle values ``x, y, width, height`` in 0..100 of the original image.
* **pixels** – ``xyxy`` in pixels of the original image (W x H). The JSONL training format uses it.
* **normalised** – ``xyxy`` in [0, 1] of the original image. Because images are *squashed*
  (not cropped) to the square model input, normalised coordinates are identical in the model input.
* **input** – ``xyxy`` in pixels of the square model input (side S): ``normalised * S``.
* **feature** – ``xyxy`` on a feature map of side M: ``input * M / S`` (``spatial_scale = M / S``,
  which is what :func:`torchvision.ops.roi_align` receives).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "Box",
    "BoxError",
    "box_center",
    "boxes_tensor",
    "check_pixel_box",
    "input_to_feature_scale",
    "normalized_to_input",
    "normalized_to_pixels",
    "percent_to_pixels",
    "pixels_to_normalized",
    "pixels_to_percent",
]

Box = tuple[float, float, float, float]


class BoxError(ValueError):
    """A box that cannot be used; ``kind`` names why in one word: ``invalid``, ``not_finite``,
    ``zero_area``, ``outside_image`` or ``tiny`` (a side below ``min_side``)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def percent_to_pixels(x: float, y: float, width: float, height: float, image_w: int, image_h: int) -> Box:
    """Label Studio percent rectangle (top-left + size, 0..100) -> pixel ``xyxy``."""
    x0 = x / 100.0 * image_w
    y0 = y / 100.0 * image_h
    return (x0, y0, x0 + width / 100.0 * image_w, y0 + height / 100.0 * image_h)


def pixels_to_percent(box: Sequence[float], image_w: int, image_h: int) -> dict[str, float]:
    """Pixel ``xyxy`` -> Label Studio rectangle value dict (``x, y, width, height`` in percent)."""
    x0, y0, x1, y1 = box
    return {
        "x": x0 / image_w * 100.0,
        "y": y0 / image_h * 100.0,
        "width": (x1 - x0) / image_w * 100.0,
        "height": (y1 - y0) / image_h * 100.0,
    }


def pixels_to_normalized(box: Sequence[float], image_w: int, image_h: int) -> Box:
    """Pixel ``xyxy`` -> ``xyxy`` in [0, 1] of the image."""
    x0, y0, x1, y1 = box
    return (x0 / image_w, y0 / image_h, x1 / image_w, y1 / image_h)


def normalized_to_pixels(box: Sequence[float], image_w: int, image_h: int) -> Box:
    """``xyxy`` in [0, 1] -> pixel ``xyxy``."""
    x0, y0, x1, y1 = box
    return (x0 * image_w, y0 * image_h, x1 * image_w, y1 * image_h)


def normalized_to_input(boxes: torch.Tensor, input_size: int) -> torch.Tensor:
    """Normalised boxes ``(N, 4)`` -> pixels of the square model input ``(N, 4)``."""
    return boxes * float(input_size)


def input_to_feature_scale(map_size: int, input_size: int) -> float:
    """``spatial_scale`` that maps model-input pixels onto a feature map of side ``map_size``."""
    return float(map_size) / float(input_size)


def check_pixel_box(
    box: Sequence[float], image_w: int, image_h: int, clip: bool = True, min_side: float = 0.0
) -> Box:
    """Validate a pixel ``xyxy`` box against its image; clip overhangs.

    Raises :class:`BoxError` for NaN/inf values, inverted or zero-area boxes, boxes lying entirely
    outside the image, and (``min_side`` > 0) boxes with a side shorter than ``min_side`` pixels.
    With ``clip`` the box is clipped to the image first, so the sides measured are those inside it.
    """
    if len(box) != 4:
        raise BoxError(f"a box needs 4 numbers (x0, y0, x1, y1), got {len(box)}")
    vals = [float(v) for v in box]
    if not all(math.isfinite(v) for v in vals):
        raise BoxError(f"box {vals} has a NaN or infinite coordinate", "not_finite")
    shown = [round(v, 2) for v in vals]  # messages are read by people; float noise is not news
    x0, y0, x1, y1 = vals
    if x1 <= x0 or y1 <= y0:
        raise BoxError(f"box {shown} has zero or negative area", "zero_area")
    if x1 <= 0 or y1 <= 0 or x0 >= image_w or y0 >= image_h:
        raise BoxError(f"box {shown} lies outside the {image_w}x{image_h} image", "outside_image")
    if clip:
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(image_w), x1), min(float(image_h), y1)
        if x1 - x0 < 1e-6 or y1 - y0 < 1e-6:
            raise BoxError(f"box {shown} has zero area inside the image", "outside_image")
    if min(x1 - x0, y1 - y0) < min_side:
        raise BoxError(
            f"box {shown} is {x1 - x0:.1f}x{y1 - y0:.1f} pixels{' inside the image' if clip else ''}, "
            f"a side below the {min_side:g}-pixel minimum",
            "tiny",
        )
    return (x0, y0, x1, y1)


def boxes_tensor(boxes: Sequence[Sequence[float]], image_w: int, image_h: int) -> torch.Tensor:
    """Validated pixel boxes -> normalised float32 tensor ``(N, 4)``; the model's only box input."""
    rows = [pixels_to_normalized(check_pixel_box(b, image_w, image_h), image_w, image_h) for b in boxes]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def box_center(box: Sequence[float]) -> tuple[float, float]:
    """Centre of an ``xyxy`` box."""
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)
