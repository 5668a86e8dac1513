"""Label Studio result items for described regions (shapes of protocol reference §1.7).

The region itself comes first (a rectangle, polygon, ellipse, keypoint or brush item with the
geometry it was given: :mod:`backend.region_shapes`), then the ``labels`` items it came with from
separate ``<Labels>`` controls, then per-region TextArea / Choices / Taxonomy
results that reuse the region's ``id`` and repeat its geometry (so Label Studio attaches them to
the region, as its own editor does), then
relations ``{"type": "relation", "from_id", "to_id", "direction", "labels"}`` or, for configs
without ``<Relations>``, relation text in a non-per-region TextArea.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from backend.label_config import AttributeControl, LabelConfig
from backend.region_shapes import LABEL_TYPES, mask_pixel_box, region_mask, region_pixel_box, shape_of
from model.geometry import pixels_to_percent
from model.inference.describe import ImageReport, RegionReport
from model.tasks import relation_key


@dataclass
class Region:
    """One region of a task: Label Studio identity plus geometry (the tool's value or pixels)."""

    id: str
    from_name: str
    type: str  # the Label Studio result type: rectanglelabels, polygon, brushlabels, ...
    labels: list[str]
    # The geometry of the tool's value, as sent (:func:`backend.region_shapes.region_geometry`).
    percent: dict[str, Any] | None = None
    pixels: tuple[float, float, float, float] | None = None  # a data.boxes rectangle in pixels
    original: tuple[int, int] | None = None  # original_width/height it came with (brush RLE frame)
    # Its values in separate <Labels> controls (label-less tools), carried as they came: (control, values)
    label_items: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def all_labels(self) -> list[str]:
        """Its tool's labels and those of its separate ``<Labels>`` items (``whenLabelValue`` reads both)."""
        return [*self.labels, *(v for _, values in self.label_items for v in values)]

    def geometry(self, width: int, height: int) -> dict[str, Any]:
        if self.percent is not None:
            return dict(self.percent)
        assert self.pixels is not None
        return {**pixels_to_percent(self.pixels, width, height), "rotation": 0}

    _mask: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def is_brush(self) -> bool:
        return self.percent is not None and shape_of(self.type) == "brush"

    def mask(self, width: int, height: int) -> torch.Tensor | None:
        """A brush region's painted pixels, boolean ``(H, W)`` in the frame Label Studio annotated
        (``original``, else the image's ``width`` x ``height``), decoded once; None for other
        tools.  Raises :class:`model.geometry.BoxError` for an undecodable RLE."""
        if not self.is_brush:
            return None
        if self._mask is None:
            assert self.percent is not None
            self._mask = region_mask(self.percent, self.original or (width, height))
        return self._mask

    def pixel_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The pixel box the model describes; raises :class:`model.geometry.BoxError` for
        geometry that has none (NaN, an undecodable brush RLE, an empty mask)."""
        if self.pixels is not None:
            return self.pixels
        assert self.percent is not None
        mask = self.mask(width, height)
        if mask is not None:
            return mask_pixel_box(mask, width, height)
        return region_pixel_box(self.type, self.percent, width, height, self.original)


def region_masks(regions: list[Region], width: int, height: int) -> list[torch.Tensor | None] | None:
    """Per region its brush mask (:meth:`Region.mask`) or None; None when no region has one (the
    model then pools whole boxes, unchanged)."""
    masks = [r.mask(width, height) for r in regions]
    return masks if any(m is not None for m in masks) else None


@dataclass
class TaskPlan:
    """What to do for one task: its image, its boxes and which of them to answer for."""

    task_id: Any
    image_ref: str
    regions: list[Region]
    focus: list[int] | None = None  # None: every region
    source: str = "none"
    skipped: list[Any] = field(default_factory=list)  # backend.predictions.Skip of regions left out


def _base(region: Region, from_name: str, kind: str, to_name: str, w: int, h: int) -> dict:
    if region.original is not None and region.percent is not None and "rle" in region.percent:
        w, h = region.original  # a brush RLE is in pixels of the image Label Studio annotated
    return {
        "id": region.id,
        "from_name": from_name,
        "to_name": to_name,
        "type": kind,
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
    }


def _region_score(report: RegionReport) -> float | None:
    scores = report.answer_scores()
    return round(sum(scores) / len(scores), 4) if scores else None


def _control_value(control: AttributeControl, report: RegionReport) -> list | None:
    picked = []
    for attr, mapping in control.values.items():
        answer = report.attributes.get(attr)
        if answer is None:
            continue
        out = mapping.get(answer.text.strip().lower())
        if out is not None:
            picked.append(list(out) if isinstance(out, tuple) else out)
    if not picked:
        return None
    return picked if control.multiple else picked[:1]


def region_results(region: Region, report: RegionReport, config: LabelConfig, w: int, h: int) -> list[dict]:
    """The region plus its per-region caption and attribute results (all sharing its id)."""
    geo = region.geometry(w, h)
    score = _region_score(report)
    rect = _base(region, region.from_name, region.type, config.image_name, w, h)
    rect["value"] = {**geo, **({region.type: region.labels} if region.type in LABEL_TYPES else {})}
    if score is not None:
        rect["score"] = score
    out = [rect]
    for name, values in region.label_items:  # kept, so accepting the prediction keeps the labels
        item = _base(region, name, "labels", config.image_name, w, h)
        item["value"] = {**geo, "labels": list(values)}
        out.append(item)

    def shown(control: str) -> bool:
        return config.shows(control, region.all_labels, region.from_name)

    if config.caption and report.caption is not None and shown(config.caption):
        item = _base(region, config.caption, "textarea", config.image_name, w, h)
        item["value"] = {**geo, "text": [report.caption.text]}
        item["score"] = round(report.caption.score, 4)
        out.append(item)
    for control in (c for c in config.attributes if shown(c.name)):
        picked = _control_value(control, report)
        if picked is None:
            continue
        item = _base(region, control.name, control.type, config.image_name, w, h)
        item["value"] = {**geo, control.type: picked}
        answers = [report.attributes[a].score for a in control.attributes if a in report.attributes]
        item["score"] = round(sum(answers) / len(answers), 4)
        out.append(item)
    return out


def relation_results(plan: TaskPlan, report: ImageReport, config: LabelConfig) -> list[dict]:
    """Relations between boxes (``<Relations>``), or relation text (a ``relations`` TextArea)."""
    ids = [r.id for r in plan.regions]
    out: list[dict] = []
    lines: list[str] = []
    for rel in report.relations:
        if config.relation_labels:
            labels = [config.relation_labels[x] for x in rel.labels if x in config.relation_labels]
            # labels the config adds to the model's (learned from corrections) are read from the answer
            said = (relation_key(part) for part in rel.answer.text.split(","))
            labels += [config.new_relation_labels[k] for k in said if k in config.new_relation_labels]
            if labels:
                out.append(
                    {
                        "type": "relation",
                        "from_id": ids[rel.source],
                        "to_id": ids[rel.target],
                        "direction": "right",
                        "labels": labels,
                    }
                )
        elif config.relation_text:
            text = ", ".join(rel.labels) if rel.labels else rel.answer.text.strip()
            lines.append(
                f"{_region_name(plan, report, rel.source)} {text} {_region_name(plan, report, rel.target)}"
            )
    if lines:
        out.append(
            {
                "id": f"relations-{plan.task_id}",
                "from_name": config.relation_text,
                "to_name": config.image_name,
                "type": "textarea",
                "value": {"text": lines},
            }
        )
    return out


def _region_name(plan: TaskPlan, report: ImageReport, k: int) -> str:
    caption = report.regions[k].caption
    return f"box {k + 1} ({caption.text})" if caption else f"box {k + 1}"
