"""Box geometry: the one place where coordinates change frame.

Frames used in the project:

* **percent** – Label Studio rectangle values ``x, y, width, height`` in 0..100 of the original image
  (every Label Studio image region - polygon points, ellipse centre and radii, keypoints - is in
  this frame; brush masks are run-length encoded pixels of the original image, :func:`rle_decode`).
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

import numpy as np
import torch

__all__ = [
    "Box",
    "BoxError",
    "KEYPOINT_BOX_FRACTION",
    "RLEError",
    "box_center",
    "boxes_tensor",
    "check_pixel_box",
    "ellipse_to_pixels",
    "focal_crop",
    "input_to_feature_scale",
    "keypoint_to_pixels",
    "mask_to_pixels",
    "normalized_to_input",
    "normalized_to_pixels",
    "percent_to_pixels",
    "pixels_to_normalized",
    "pixels_to_percent",
    "polygon_to_pixels",
    "rle_decode",
    "rotated_rect_to_pixels",
]

# A keypoint is described by the square around it whose side is this fraction of the image's
# shorter side (or the keypoint's own drawn size, if larger): the model needs an area to look at.
KEYPOINT_BOX_FRACTION = 0.1

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


def focal_crop(box: Sequence[float], image_w: int, image_h: int, fill: float) -> tuple[Box, Box]:
    """Pixel box -> (the square pixel crop around it in which its larger side is ``fill`` of the
    crop's side, moved to lie inside the image and cut to it where the image is smaller; the box in
    the crop's normalised frame).  The crop is square in pixels, so the model input (a squashed
    square) shows the box with its own aspect ratio."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0, 1.0) / fill
    cw, ch = min(side, float(image_w)), min(side, float(image_h))
    cx0 = min(max((x0 + x1) / 2 - cw / 2, 0.0), image_w - cw)
    cy0 = min(max((y0 + y1) / 2 - ch / 2, 0.0), image_h - ch)
    crop = (cx0, cy0, cx0 + cw, cy0 + ch)
    return crop, pixels_to_normalized((x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0), cw, ch)  # type: ignore[arg-type]


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


def rotated_rect_to_pixels(
    x: float, y: float, width: float, height: float, rotation: float, image_w: int, image_h: int
) -> Box:
    """Label Studio rectangle rotated by ``rotation`` degrees (clockwise on screen, about its
    top-left corner ``x, y``; all in percent) -> pixel ``xyxy`` of the box around its four corners.
    Without rotation this is :func:`percent_to_pixels`."""
    if rotation % 360.0 == 0.0:
        return percent_to_pixels(x, y, width, height, image_w, image_h)
    x0, y0 = x / 100.0 * image_w, y / 100.0 * image_h
    w, h = width / 100.0 * image_w, height / 100.0 * image_h
    t = math.radians(rotation)
    cos, sin = math.cos(t), math.sin(t)
    # Pixels (y down): the top edge runs along (cos, sin), the left edge along (-sin, cos).
    xs = [x0, x0 + w * cos, x0 + w * cos - h * sin, x0 - h * sin]
    ys = [y0, y0 + w * sin, y0 + w * sin + h * cos, y0 + h * cos]
    return (min(xs), min(ys), max(xs), max(ys))


def polygon_to_pixels(points: Sequence[Sequence[float]], image_w: int, image_h: int) -> Box:
    """Label Studio polygon ``points`` (``[[x, y], ...]`` in percent) -> pixel ``xyxy`` of the box
    around them.  Raises :class:`BoxError` for fewer than 3 points or a malformed point."""
    if len(points) < 3:
        raise BoxError(f"a polygon needs at least 3 points, got {len(points)}")
    xs, ys = [], []
    for p in points:
        if len(p) != 2:
            raise BoxError(f"a polygon point needs 2 numbers (x, y), got {list(p)!r}")
        xs.append(float(p[0]) / 100.0 * image_w)
        ys.append(float(p[1]) / 100.0 * image_h)
    return (min(xs), min(ys), max(xs), max(ys))


def ellipse_to_pixels(
    x: float, y: float, radius_x: float, radius_y: float, rotation: float, image_w: int, image_h: int
) -> Box:
    """Label Studio ellipse (centre ``x, y``; ``radius_x`` in percent of the width, ``radius_y`` of
    the height; ``rotation`` degrees clockwise about the centre) -> pixel ``xyxy`` of the box that
    touches the rotated ellipse."""
    cx, cy = x / 100.0 * image_w, y / 100.0 * image_h
    a, b = radius_x / 100.0 * image_w, radius_y / 100.0 * image_h
    t = math.radians(rotation)
    half_w = math.hypot(a * math.cos(t), b * math.sin(t))
    half_h = math.hypot(a * math.sin(t), b * math.cos(t))
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def keypoint_to_pixels(
    x: float,
    y: float,
    image_w: int,
    image_h: int,
    width: float = 0.0,
    fraction: float = KEYPOINT_BOX_FRACTION,
) -> Box:
    """Label Studio keypoint ``x, y`` (percent; ``width``: its drawn radius in percent of the image
    width) -> pixel ``xyxy`` of the square centred on it whose side is ``fraction`` of the shorter
    image side, or twice the drawn radius if that is larger."""
    cx, cy = x / 100.0 * image_w, y / 100.0 * image_h
    half = max(fraction * min(image_w, image_h) / 2.0, width / 100.0 * image_w)
    return (cx - half, cy - half, cx + half, cy + half)


class RLEError(ValueError):
    """A Label Studio brush RLE that cannot be decoded (the message says why)."""


def rle_decode(rle: Sequence[int], image_w: int, image_h: int) -> torch.Tensor:
    """Label Studio brush ``rle`` (bytes of a thi.ng ``rle-pack`` stream of the RGBA image, row
    major) -> boolean mask ``(image_h, image_w)``: the pixels whose alpha is not zero.

    Stream: 32 bits value count, 5 bits word size - 1, four 4-bit run-length field sizes - 1; then
    per chunk 1 bit (1: a run of one repeated word, 0: literal words), 2 bits choosing the length
    field, that field (count - 1), and the word(s).  Raises :class:`RLEError` when the stream is
    malformed or its size is not ``image_w * image_h * 4``."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in rle):
        raise RLEError("an RLE must be a list of byte values (0..255)")
    # The stream as "0"/"1" text: int(text[a:b], 2) reads a field in one C call.
    text = (np.unpackbits(np.frombuffer(bytes(rle), dtype=np.uint8)) + ord("0")).tobytes().decode("ascii")
    if len(text) < 53:
        raise RLEError("the RLE stream ends early")
    num = int(text[:32], 2)
    if num != image_w * image_h * 4:
        raise RLEError(f"the RLE holds {num} values, not the {image_w}x{image_h}x4 of its image")
    word = int(text[32:37], 2) + 1
    sizes = [int(text[37 + 4 * k : 41 + 4 * k], 2) + 1 for k in range(4)]
    heads = {f"{flag}{k:02b}": (flag == 1, sizes[k]) for flag in (0, 1) for k in range(4)}
    values: list[int] = []  # one entry per run; a literal chunk's words are runs of one
    counts: list[int] = []
    pos, end, i = 53, len(text), 0
    while i < num:
        field = pos + 3
        if field > end:
            raise RLEError("the RLE stream ends early")
        repeated, size = heads[text[pos:field]]
        pos = field + size
        if pos > end:
            raise RLEError("the RLE stream ends early")
        count = min(num - i, int(text[field:pos], 2) + 1)  # values past the end are dropped (as in JS)
        stop = pos + (word if repeated else count * word)
        if stop > end:
            raise RLEError("the RLE stream ends early")
        if repeated:
            values.append(int(text[pos:stop], 2))
            counts.append(count)
        else:
            values += [int(text[k : k + word], 2) for k in range(pos, stop, word)]
            counts += [1] * count
        pos = stop
        i += count
    # Only alpha (flat index 4j + 3 of pixel j) is kept: a run over flat [s, e) holds the alpha of
    # pixels [ceil((s - 3) / 4), ceil((e - 3) / 4)), so the mask is one bool per pixel, repeated
    # per run (never the w * h * 4 values: 42 kB of RLE may describe 40 M pixels).
    ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    first_pixel = -((3 - ends) // 4)  # ceil((e - 3) / 4) of every run's end
    per_run = np.diff(first_pixel, prepend=0)
    alpha = np.repeat(np.asarray(values, dtype=np.int64) != 0, per_run)
    return torch.from_numpy(alpha.reshape(image_h, image_w))


def mask_to_pixels(mask: torch.Tensor) -> Box:
    """Boolean mask ``(H, W)`` -> pixel ``xyxy`` of the box around its set pixels (a pixel covers
    ``[c, c + 1)``).  Raises :class:`BoxError` (``zero_area``) for an empty mask."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if not len(rows):
        raise BoxError("the brush mask paints no pixel", "zero_area")
    return (float(cols[0]), float(rows[0]), float(cols[-1]) + 1.0, float(rows[-1]) + 1.0)
