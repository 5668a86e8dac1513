"""Label Studio results of every image region tool, built from pixel boxes (tests and demos).

Each builder takes a pixel ``xyxy`` box on a ``width`` x ``height`` image and returns the region
item as Label Studio 1.23.2 stores it (``value`` in percent; brush: RLE) plus, with ``caption``,
the per-region TextArea item that repeats its id and geometry.  The shapes are chosen so that the
box the backend describes for them is ``box`` itself (a keypoint: the square around its centre).

:func:`rle_encode` writes Label Studio's brush RLE (thi.ng ``rle-pack``: literal and repeated
chunks) from the stream description in :func:`model.geometry.rle_decode`, independently of the
decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "REGION_TOOLS_CONFIG",
    "brush_result",
    "ellipse_result",
    "keypoint_result",
    "polygon_result",
    "rle_encode",
    "rotated_rectangle_result",
    "with_caption",
]

# Every region tool on one image, one caption TextArea (control names used by the builders).
REGION_TOOLS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="bbox" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
  <PolygonLabels name="poly" toName="image" smart="true"><Label value="Object"/></PolygonLabels>
  <EllipseLabels name="ellipse" toName="image"><Label value="Object"/></EllipseLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
  <BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>
  <TextArea name="caption" toName="image" perRegion="true" editable="true" rows="2"
            displayMode="region-list"/>
</View>"""

_GEOMETRY_SKIP = ("polygonlabels", "ellipselabels", "keypointlabels", "brushlabels", "rectanglelabels")


def _item(rid: str, name: str, kind: str, value: dict, width: int, height: int) -> dict[str, Any]:
    return {
        "id": rid,
        "from_name": name,
        "to_name": "image",
        "type": kind,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": value,
        "origin": "manual",
    }


def with_caption(item: dict[str, Any], caption: str, control: str = "caption") -> list[dict[str, Any]]:
    """``item`` and its per-region TextArea (same id, same geometry, as Label Studio's editor saves)."""
    geometry = {k: v for k, v in item["value"].items() if k not in _GEOMETRY_SKIP}
    text = {**item, "from_name": control, "type": "textarea", "value": {**geometry, "text": [caption]}}
    return [item, text]


def polygon_result(rid: str, box: Sequence[float], width: int, height: int, label: str = "Object") -> dict:
    """A diamond touching the four sides of ``box`` (control ``poly``)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    points = [[cx, y0], [x1, cy], [cx, y1], [x0, cy]]
    value = {
        "points": [[x / width * 100, y / height * 100] for x, y in points],
        "closed": True,
        "polygonlabels": [label],
    }
    return _item(rid, "poly", "polygonlabels", value, width, height)


def ellipse_result(
    rid: str, box: Sequence[float], width: int, height: int, rotation: float = 0.0, label: str = "Object"
) -> dict:
    """The ellipse inscribed in ``box`` (control ``ellipse``); with ``rotation`` 90 or 270 its radii
    are swapped so that it still touches ``box``."""
    x0, y0, x1, y1 = box
    rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
    if rotation % 180 == 90:
        rx, ry = ry, rx
    value = {
        "x": (x0 + x1) / 2 / width * 100,
        "y": (y0 + y1) / 2 / height * 100,
        "radiusX": rx / width * 100,
        "radiusY": ry / height * 100,
        "rotation": rotation,
        "ellipselabels": [label],
    }
    return _item(rid, "ellipse", "ellipselabels", value, width, height)


def keypoint_result(rid: str, point: Sequence[float], width: int, height: int, label: str = "Object") -> dict:
    """A keypoint at pixel ``point`` (control ``point``; drawn radius 0.5 % of the width)."""
    value = {
        "x": point[0] / width * 100,
        "y": point[1] / height * 100,
        "width": 0.5,
        "keypointlabels": [label],
    }
    return _item(rid, "point", "keypointlabels", value, width, height)


def rotated_rectangle_result(
    rid: str, box: Sequence[float], width: int, height: int, label: str = "Object"
) -> dict:
    """``box`` drawn as a rectangle rotated by 90 degrees about its top-left corner (control
    ``bbox``): that corner sits at the box's top-right, the rectangle's width runs down the box."""
    x0, y0, x1, y1 = box
    value = {
        "x": x1 / width * 100,
        "y": y0 / height * 100,
        "width": (y1 - y0) / width * 100,
        "height": (x1 - x0) / height * 100,
        "rotation": 90,
        "rectanglelabels": [label],
    }
    return _item(rid, "bbox", "rectanglelabels", value, width, height)


def rle_encode(mask: np.ndarray, alpha: int = 255) -> list[int]:
    """Boolean mask ``(H, W)`` -> Label Studio brush RLE bytes of its RGBA image (painted pixels
    ``(255, 0, 0, alpha)``).  Runs of one repeated byte become repeated chunks, lone bytes are
    gathered into literal chunks."""
    h, w = mask.shape
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[mask.astype(bool)] = (255, 0, 0, alpha)
    values = rgba.reshape(-1).tolist()
    sizes = (3, 4, 8, 16)
    bits = [f"{len(values):032b}", f"{8 - 1:05b}", *(f"{s - 1:04b}" for s in sizes)]

    def chunk(repeated: bool, n: int, words: list[int]) -> None:
        k = next(i for i, s in enumerate(sizes) if n - 1 < 2**s)  # the shortest length field
        bits.append(("1" if repeated else "0") + f"{k:02b}" + f"{n - 1:0{sizes[k]}b}")
        bits.extend(f"{v:08b}" for v in words)

    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    literal: list[int] = []
    for v, n in runs:
        if n == 1:
            literal.append(v)
            if len(literal) == 2**16:
                chunk(False, len(literal), literal)
                literal = []
            continue
        if literal:
            chunk(False, len(literal), literal)
            literal = []
        while n:
            part = min(n, 2**16)
            chunk(True, part, [v])
            n -= part
    if literal:
        chunk(False, len(literal), literal)
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]


def brush_result(rid: str, rle: list[int], width: int, height: int, label: str = "Object") -> dict:
    """A brush region (control ``brush``) of an RLE of the ``width`` x ``height`` image."""
    value = {"format": "rle", "rle": list(rle), "brushlabels": [label]}
    return _item(rid, "brush", "brushlabels", value, width, height)
