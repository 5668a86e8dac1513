"""Focal crops: small boxes read from a crop around them (``region.focal_below`` / ``focal_fill``).

At a 112-224 px model input a 30-px object in a 1,500-px photo covers a few input pixels, too few
for its colour or shape to survive.  A box whose larger side is below ``focal_below`` of its
image's larger side (:func:`small_boxes`) is cut out with its surroundings
(:func:`model.geometry.focal_crop`: a square in which the box fills ``focal_fill`` of the side),
and that crop is encoded like an image.  The box's
token is pooled from the crop's maps and embedded as the original box, so it says what the object is
(from the crop) and where it is (from the box); the crop's CoordConv channels hold the image's
coordinates of its pixels, so its features place the box where it is, not at the crop's centre.
Training (:class:`model.data.dataset.RecordDataset`) and the inference engine build the crops here,
the region encoder pools them (:meth:`model.region_encoder.RegionEncoder.forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from PIL import Image

from model.config import RegionEncoderConfig
from model.geometry import focal_crop, normalized_to_pixels, pixels_to_normalized

__all__ = ["FocalCrops", "focal_crops", "small_boxes"]


@dataclass
class FocalCrops:
    """The focal crops of one image: ``rows`` (its box indices), ``pixels`` ``(M, 3, S, S)``, the
    boxes in their crops' normalised frames ``(M, 4)``, the crops' extents in the image's
    normalised frame ``(M, 4)`` (their CoordConv coordinates are the image's)."""

    rows: list[int]
    pixels: torch.Tensor
    boxes: torch.Tensor
    frames: torch.Tensor


def small_boxes(
    boxes: torch.Tensor, size: tuple[int, int], cfg: RegionEncoderConfig, rows: Iterable[int] | None = None
) -> list[int]:
    """Indices (of ``rows``, default all) of the normalised boxes ``(N, 4)`` of an image of ``size``
    ``(w, h)`` pixels that get a focal crop: those whose larger side is below ``focal_below`` of the
    image's larger side, in pixels.  On a square image that is the normalised frame; on a strip
    (3,000 x 40 px) a 10-px object is a fraction of an input pixel wide and its crop magnifies it
    along the long side, where a rule in the normalised frame would see a box 25 % high."""
    if cfg.focal_below <= 0:
        return []
    w, h = size
    b = boxes.reshape(-1, 4).float()
    side = torch.maximum((b[:, 2] - b[:, 0]) * w, (b[:, 3] - b[:, 1]) * h) / max(w, h)
    return [k for k in (range(len(b)) if rows is None else sorted(rows)) if side[k] < cfg.focal_below]


def focal_crops(
    image: Image.Image,
    boxes: torch.Tensor,
    cfg: RegionEncoderConfig,
    process: Callable[[list[Image.Image]], torch.Tensor],
    rows: Iterable[int] | None = None,
) -> FocalCrops | None:
    """Crops of ``image`` around its small boxes among ``rows`` (``boxes``: ``(N, 4)`` normalised),
    processed by ``process`` (a list of crops -> ``(M, 3, S, S)``); None when no box is small."""
    small = small_boxes(boxes, image.size, cfg, rows)
    if not small:
        return None
    w, h = image.size
    crops, inside, frames = [], [], []
    for k in small:
        crop, box = focal_crop(normalized_to_pixels(boxes[k].tolist(), w, h), w, h, cfg.focal_fill)
        crops.append(image.crop(crop))
        inside.append(box)
        frames.append(pixels_to_normalized(crop, w, h))
    return FocalCrops(
        small,
        process(crops),
        torch.tensor(inside, dtype=torch.float32),
        torch.tensor(frames, dtype=torch.float32),
    )
