"""Label Studio annotation results -> region-text corrections (box + caption / attributes / relations).

A reviewer's annotation is a flat ``result`` list (see the protocol reference, section 1.7):

* region items are the regions: ``rectanglelabels`` / ``rectangle`` and every other image region
  tool (polygon, ellipse, keypoint, brush; :mod:`backend.region_shapes`), stored as the pixel box
  the model describes for them (a rotated rectangle by the box around its rotated corners);
* per-region ``textarea`` items carrying the **same id** as a region hold its caption;
* per-region ``choices`` / ``taxonomy`` items with the same id hold attribute values (``"pink"``,
  ``["Colour", "pink"]``); :func:`model.tasks.attribute_of_value` says which attribute a word is.
  A value the model does not know (``"Crimson"``) is kept as an answer to the attribute of its
  control when the project's config names that control after it (``open_controls``, see
  :attr:`backend.label_config.LabelConfig.open_controls`): it is data, and the model learns it;
* ``relation`` items link two region ids with labels such as ``left_of``
  (:func:`model.tasks.normalize_relation_label`); direction ``left`` means the arrow goes
  ``to_id -> from_id``.  Labels the config declares beyond the model's (``touches``,
  ``new_relations``) are kept too.

Anything that cannot be used is skipped with a reason (returned in :attr:`ParsedAnnotation.skipped`)
so one odd item does not discard a reviewer's whole annotation; a result that is not a list at all
raises :class:`CorrectionError`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.errors import ClientError
from backend.label_config import task_field
from backend.region_shapes import REGION_TYPES, ShapeError, region_geometry, region_pixel_box, shape_of
from model.geometry import BoxError, check_pixel_box
from model.tasks import (
    ATTRIBUTE_QUESTIONS,
    CAPTION_QUESTIONS,
    RELATION_LABELS,
    RELATION_QUESTIONS,
    attribute_of_value,
    normalize_relation_label,
    relation_key,
)

RECT_TYPES = REGION_TYPES  # every image region tool's result type
MAX_SIDE = 2**31 - 1  # image sides are stored as SQLite integers and handed to image libraries
ATTRIBUTE_TYPES = ("choices", "taxonomy")


class CorrectionError(ClientError):
    """An annotation result that cannot be read at all (the message says why)."""


@dataclass(frozen=True)
class Relation:
    """``labels`` hold for this region relative to region ``target`` (canonical order)."""

    target: str
    labels: tuple[str, ...]


@dataclass
class Region:
    """One corrected region: pixel ``xyxy`` box in the original image plus its texts."""

    region_id: str
    box: tuple[float, float, float, float]
    caption: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    relations: list[Relation] = field(default_factory=list)

    @property
    def has_text(self) -> bool:
        return bool(self.caption or self.attributes or self.relations)


@dataclass
class ParsedAnnotation:
    width: int
    height: int
    regions: list[Region]
    skipped: list[str] = field(default_factory=list)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _size(item: Mapping[str, Any], key: str) -> int | None:
    value = _number(item.get(key))
    if value is None or not 1 <= value <= MAX_SIDE or value != int(value):
        return None
    return int(value)


def _check_length(text: str, what: str, limit: int | None) -> None:
    if limit is not None and len(text) > limit:
        raise CorrectionError(
            f"{what} is {len(text)} characters; at most {limit} are stored (MAX_TEXT_CHARS)", 422
        )


def _clean_text(text: Any) -> str:
    if isinstance(text, (list, tuple)):
        text = " ".join(t for t in text if isinstance(t, str))
    return " ".join(text.split()) if isinstance(text, str) else ""


def _rect_box(item: Mapping[str, Any], width: int, height: int) -> tuple[float, float, float, float]:
    """A region item (any tool, percent or brush RLE of a ``width`` x ``height`` image) -> the
    clipped pixel box the model describes for it; raises ``ValueError`` with the reason."""
    value = item.get("value")
    if not isinstance(value, Mapping):
        raise ValueError("has no 'value' object")
    kind = str(item.get("type"))
    try:
        geometry = region_geometry(kind, value)
        raw = region_pixel_box(kind, geometry, width, height, (width, height))
        box = check_pixel_box(raw, width, height)
    except (ShapeError, BoxError) as exc:
        raise ValueError(str(exc)) from None
    return tuple(round(v, 2) for v in box)  # type: ignore[return-value]


def _value(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """An item's ``value`` object (``{}`` when it is missing or not an object)."""
    value = item.get("value")
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _attribute_words(item: Mapping[str, Any]) -> list[str]:
    value = _value(item)
    if item.get("type") == "choices":
        return [w for w in _list(value.get("choices")) if isinstance(w, str)]
    paths = _list(value.get("taxonomy"))
    # A taxonomy path is root-first (["Colour", "pink"]); the leaf is the value.
    return [p[-1] for p in paths if isinstance(p, list) and p and isinstance(p[-1], str)]


def parse_result(
    result: Any,
    image_name: str | None = None,
    caption_control: str | None = None,
    max_text_chars: int | None = None,
    open_controls: Mapping[str, str] | None = None,
    new_relations: Collection[str] = (),
    aliases: Mapping[str, Mapping[str, str]] | None = None,
) -> ParsedAnnotation:
    """Turn an annotation ``result`` list into regions.

    ``image_name`` (the config's ``<Image name>``) restricts items to that image when given;
    ``caption_control`` picks the TextArea holding captions when a config has several;
    ``max_text_chars``: a region id or caption longer than this refuses the whole annotation (422);
    ``open_controls``: Choices/Taxonomy name -> attribute whose every value is an answer to it (new
    words included); ``new_relations``: relation labels (:func:`model.tasks.relation_key` form)
    kept besides the model's; ``aliases``: Choices/Taxonomy name -> {alias: value} (Label Studio
    stores a ``<Choice alias>``; the value is the word the model learns).
    """
    if not isinstance(result, list):
        raise CorrectionError(f"annotation 'result' must be a list, got {type(result).__name__}")
    skipped: list[str] = []
    items: list[Mapping[str, Any]] = []
    for n, item in enumerate(result):
        if not isinstance(item, Mapping):
            skipped.append(f"result[{n}] is not an object")
        elif image_name and item.get("type") != "relation" and item.get("to_name") not in (None, image_name):
            skipped.append(f"result[{n}] targets {item.get('to_name')!r}, not the image {image_name!r}")
        else:
            items.append(item)

    width = height = 0
    regions: dict[str, Region] = {}
    for item in items:
        if item.get("type") not in RECT_TYPES:
            continue
        rid = item.get("id")
        label = f"{shape_of(item['type'])} {rid!r}"
        if not isinstance(rid, str) or not rid:
            skipped.append(f"a {shape_of(item['type'])} has no region id")
            continue
        _check_length(rid, f"region id {rid[:40]!r}...", max_text_chars)
        if rid in regions:
            skipped.append(f"{label} appears twice; the first one is kept")
            continue
        w, h = _size(item, "original_width"), _size(item, "original_height")
        if w is None or h is None:
            skipped.append(f"{label} has no original_width/original_height")
            continue
        if width and (w, h) != (width, height):
            skipped.append(f"{label} is on a {w}x{h} image, others on {width}x{height}")
            continue
        try:
            box = _rect_box(item, w, h)
        except ValueError as exc:
            skipped.append(f"{label} {exc}")
            continue
        width, height = w, h
        regions[rid] = Region(rid, box)

    pending: dict[tuple[str, str], set[str]] = {}
    for item in items:
        kind = item.get("type")
        rid = item.get("id") if isinstance(item.get("id"), str) else None
        if kind == "textarea" and rid is not None:
            region = regions.get(rid)
            if region is None:
                skipped.append(f"textarea {rid!r} does not belong to a usable region")
            elif caption_control and item.get("from_name") != caption_control:
                skipped.append(f"textarea {item.get('from_name')!r} is not the caption control")
            elif region.caption is None:
                text = _clean_text(_value(item).get("text"))
                _check_length(text, f"caption of region {rid[:40]!r}", max_text_chars)
                if text:
                    region.caption = text
        elif kind in ATTRIBUTE_TYPES and rid is not None:
            region = regions.get(rid)
            if region is None:
                skipped.append(f"{kind} {rid!r} does not belong to a usable region")
                continue
            teaches = (open_controls or {}).get(str(item.get("from_name")))
            alias_of = (aliases or {}).get(str(item.get("from_name")), {})
            for word in (alias_of.get(w, w) for w in _attribute_words(item)):
                attr = attribute_of_value(word)
                if attr is None and teaches is not None and word.strip():
                    attr = teaches  # a new value of the control's attribute: new vocabulary
                if attr is None:
                    continue  # e.g. "occluded" in a control not named after an attribute
                value = word.strip().lower()
                if region.attributes.get(attr, value) != value:
                    skipped.append(f"region {rid!r} has two {attr} values; {region.attributes[attr]!r} kept")
                    continue
                region.attributes[attr] = value
        elif kind == "relation":
            _collect_relation(item, regions, pending, skipped, new_relations)

    for (src, dst), labels in pending.items():
        regions[src].relations.append(Relation(dst, _ordered(labels)))
    return ParsedAnnotation(width, height, list(regions.values()), skipped)


def _collect_relation(
    item: Mapping[str, Any],
    regions: Mapping[str, Region],
    pending: dict[tuple[str, str], set[str]],
    skipped: list[str],
    new_relations: Collection[str] = (),
) -> None:
    src, dst = item.get("from_id"), item.get("to_id")
    name = f"relation {src!r}->{dst!r}"
    if (
        not isinstance(src, str)
        or not isinstance(dst, str)
        or src not in regions
        or dst not in regions
        or src == dst
    ):
        skipped.append(f"{name} does not link two usable regions")
        return
    direction = item.get("direction", "right")
    if direction == "left":
        src, dst = dst, src  # the arrow points from to_id to from_id
    elif direction != "right":
        # None of the spatial labels is symmetric, so a two-way arrow cannot be right both ways.
        skipped.append(f"{name} has direction {direction!r}; only 'right' and 'left' are used")
        return
    raw = _list(item.get("labels"))
    keys = [relation_key(lbl) for lbl in raw if isinstance(lbl, str)]
    labels = {k for k in keys if normalize_relation_label(k) or k in new_relations}
    if not labels:
        skipped.append(f"{name} has no known relation label (got {list(raw)!r})")
        return
    pending.setdefault((src, dst), set()).update(labels)


def image_reference(data: Any, image_var: str | None = None) -> str:
    """The image URL of a task's ``data``: ``data[image_var]``, else ``data["image"]``, else the
    only string value.  Raises :class:`CorrectionError` when there is none."""
    if not isinstance(data, Mapping):
        raise CorrectionError("task 'data' must be an object")
    for key in (image_var, "image"):
        value = task_field(data, key) if key else None
        if isinstance(value, str) and value.strip():
            return value.strip()
    strings = [v for v in data.values() if isinstance(v, str) and v.strip()]
    if len(strings) == 1:
        return strings[0].strip()
    raise CorrectionError(f"task data has no image reference (looked for {image_var or 'image'!r})")


def _ordered(labels: Collection[str]) -> tuple[str, ...]:
    """The model's relation labels in canonical order, then any others alphabetically."""
    return tuple(lbl for lbl in RELATION_LABELS if lbl in labels) + tuple(
        sorted(set(labels) - set(RELATION_LABELS))
    )


def relation_answer(labels: Sequence[str]) -> str:
    """Relation labels -> the answer text the model is trained to give (``model.tasks`` format;
    labels beyond the model's, such as ``touches``, follow its own)."""
    return ", ".join(_ordered(labels)) or "near"


def annotation_record(
    annotation_id: int,
    project_id: int,
    task_id: int | None,
    image: str,
    width: int,
    height: int,
    regions: Sequence[Region],
) -> dict[str, Any] | None:
    """One annotation as a region-text record; questions drawn from ``model.tasks`` templates with a
    per-annotation seed (stable across exports).  ``None`` when no region carries any text."""
    used = {r.region_id for r in regions if r.has_text}
    used |= {rel.target for r in regions for rel in r.relations}
    regions = [r for r in regions if r.region_id in used]
    if not regions:
        return None
    index = {r.region_id: k for k, r in enumerate(regions, 1)}
    rng = random.Random(f"labelstudio-{annotation_id}")
    turns: list[tuple[str, str]] = []
    for r in regions:
        ref = f"<region{index[r.region_id]}>"
        if r.caption:
            turns.append((rng.choice(CAPTION_QUESTIONS).format(a=ref), r.caption))
        for attr in ATTRIBUTE_QUESTIONS:  # canonical attribute order
            if attr in r.attributes:
                turns.append((rng.choice(ATTRIBUTE_QUESTIONS[attr]).format(a=ref), r.attributes[attr]))
        for rel in r.relations:
            question = rng.choice(RELATION_QUESTIONS).format(a=ref, b=f"<region{index[rel.target]}>")
            turns.append((question, relation_answer(rel.labels)))
    conversations = []
    for q, a in turns:
        conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {
        "id": f"ls-{annotation_id}",
        "image": image,
        "width": width,
        "height": height,
        "boxes": [list(r.box) for r in regions],
        "conversations": conversations,
        "source": "labelstudio",
        "project_id": project_id,
        "annotation_id": annotation_id,
        "task_id": task_id,
    }
