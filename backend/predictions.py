"""Label Studio tasks -> boxes -> batched model calls (bounded chunks) -> Label Studio prediction results.

Where a task's boxes come from, first match wins:

1. interactive ``params.context.result`` (smart tool): every rectangle in it is given to the model,
   the newest (last) one is described and returned;
2. the task's latest annotation or draft (not cancelled) that has rectangles;
3. the task's latest existing prediction that has rectangles;
4. ``task.data["boxes"]``: a list whose items are either Label Studio rectangle values in percent
   (``{"x", "y", "width", "height", "rotation"?, "rectanglelabels"?: [...], "id"?}``, or a whole
   Label Studio result with a ``value`` of that form) or pixel boxes ``[x0, y0, x1, y1]`` of the
   original image.

Results are built by :mod:`backend.results`.
Rotated rectangles are described by their unrotated box (the model takes axis-aligned boxes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from backend.errors import ClientError
from backend.images import ImageFetcher
from backend.label_config import LabelConfig
from backend.results import Region, TaskPlan, region_results, relation_results
from backend.settings import Settings
from model.geometry import BoxError, boxes_tensor, check_pixel_box
from model.inference.describe import ImageReport, describe_regions
from model.inference.engine import InferenceEngine
from model.inference.image_input import EncodedImage

GEOMETRY = ("x", "y", "width", "height", "rotation")


class PredictionError(ClientError):
    """Bad input in a predict request (400; 413 for more tasks than MAX_TASKS_PER_REQUEST)."""


@dataclass
class PredictStats:
    tasks: int = 0
    regions: int = 0
    sources: dict[str, int] = field(default_factory=dict)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PredictionError(f"{what} must be a number, got {value!r}")
    return float(value)


def _percent_value(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise PredictionError(f"{where}: rectangle value must be an object, got {type(value).__name__}")
    missing = [k for k in GEOMETRY[:4] if k not in value]
    if missing:
        raise PredictionError(f"{where}: rectangle value lacks {missing}")
    geo = {k: _number(value[k], f"{where}: value.{k}") for k in GEOMETRY[:4]}
    geo["rotation"] = _number(value.get("rotation", 0) or 0, f"{where}: value.rotation")
    return geo


def _labels(value: dict, rect_type: str) -> list[str]:
    labels = value.get(rect_type) or value.get("rectanglelabels") or value.get("labels") or []
    if isinstance(labels, str):
        labels = [labels]
    return [str(x) for x in labels] if isinstance(labels, list) else []


def _name(item: dict) -> str | None:
    """An item's ``from_name`` when it is a string (anything else names no control)."""
    name = item.get("from_name")
    return name if isinstance(name, str) else None


def rects_from_results(results: Any, config: LabelConfig, where: str) -> list[Region]:
    """Rectangles of ``config``'s rectangle controls among Label Studio result items."""
    if not isinstance(results, list):
        raise PredictionError(f"{where}: result must be a list")
    regions = []
    for i, item in enumerate(results):
        if not isinstance(item, dict):
            raise PredictionError(f"{where}: result[{i}] must be an object")
        name = _name(item)
        if name not in config.rect_names:
            continue
        rid = item.get("id") or f"r{i}"
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise PredictionError(f"{where}: result[{i}].id must be a string, got {rid!r}")
        control = config.rect(name)
        value = item.get("value")
        geo = _percent_value(value, f"{where} region {rid}")
        regions.append(
            Region(str(rid), control.name, control.type, _labels(value, control.type), percent=geo)
        )
    return regions


def _check_context(context: dict, config: LabelConfig) -> list[Region]:
    results = context.get("result")
    if not isinstance(results, list) or not results:
        raise PredictionError("params.context.result must be a non-empty list of Label Studio results")
    for i, item in enumerate(results):
        if not isinstance(item, dict):
            raise PredictionError(f"params.context.result[{i}] must be an object")
        if item.get("type") == "relation" and item.get("from_name") is None:
            continue
        name = _name(item)
        if name not in config.control_names:
            raise PredictionError(
                f"params.context.result[{i}].from_name {item.get('from_name')!r} is not a control of the "
                "label config "
                f"(known: {sorted(config.control_names)})"
            )
    regions = rects_from_results(results, config, "params.context")
    if not regions:
        raise PredictionError(
            f"params.context.result has no rectangle from {sorted(config.rect_names)}; nothing to describe"
        )
    return regions


def _stamp(item: dict) -> tuple:
    return (str(item.get("updated_at") or item.get("created_at") or ""), str(item.get("id") or ""))


def _latest_with_rects(items: Any, config: LabelConfig, where: str) -> list[Region]:
    if not isinstance(items, list):
        return []
    candidates = [x for x in items if isinstance(x, dict) and not x.get("was_cancelled")]
    for item in sorted(candidates, key=_stamp, reverse=True):
        regions = rects_from_results(
            item.get("result") or [], config, f"{where} {item.get('id', '')}".strip()
        )
        if regions:
            return regions
    return []


def _data_boxes(boxes: Any, config: LabelConfig) -> list[Region]:
    if not isinstance(boxes, list):
        raise PredictionError("data.boxes must be a list of rectangles")
    rect = config.rects[0]
    default_labels = list(rect.labels[:1])
    regions = []
    for i, item in enumerate(boxes):
        where = f"data.boxes[{i}]"
        if isinstance(item, (list, tuple)):
            if len(item) != 4:
                raise PredictionError(f"{where}: a pixel box needs 4 numbers [x0, y0, x1, y1]")
            pixels = tuple(_number(v, where) for v in item)
            regions.append(Region(f"box{i + 1}", rect.name, rect.type, default_labels, pixels=pixels))  # type: ignore[arg-type]
            continue
        if not isinstance(item, dict):
            raise PredictionError(f"{where}: expected a rectangle object or [x0, y0, x1, y1]")
        value = item.get("value", item)
        labels = _labels(value, rect.type) or default_labels
        geo = _percent_value(value, where)
        regions.append(
            Region(str(item.get("id") or f"box{i + 1}"), rect.name, rect.type, labels, percent=geo)
        )
    return regions


def plan_task(task: Any, config: LabelConfig, context: dict | None, settings: Settings) -> TaskPlan:
    """Find a task's image and boxes (see the module docstring for the order)."""
    if not isinstance(task, dict):
        raise PredictionError("every task must be an object")
    task_id = task.get("id")
    data = task.get("data")
    if not isinstance(data, dict):
        raise PredictionError(f"task {task_id} has no data object")
    ref = data.get(config.image_var)
    if ref is not None and not isinstance(ref, str):
        raise PredictionError(f"task {task_id}: data.{config.image_var} must be a URL string")
    if not ref:
        raise PredictionError(
            f"task {task_id} has no image: data.{config.image_var} is missing "
            f'(<Image value="${config.image_var}">)'
        )
    focus = None
    if context:
        regions, source = _check_context(context, config), "context"
        focus = [len(regions) - 1]
    else:
        source = "none"
        merged = [*(task.get("annotations") or []), *(task.get("drafts") or [])]
        regions = _latest_with_rects(merged, config, f"task {task_id} annotation")
        source = "annotation" if regions else source
        if not regions:
            regions = _latest_with_rects(task.get("predictions"), config, f"task {task_id} prediction")
            source = "prediction" if regions else source
        if not regions and data.get("boxes") is not None:
            regions, source = _data_boxes(data["boxes"], config), "data"
    if len(regions) > settings.max_regions:
        raise PredictionError(
            f"task {task_id} has {len(regions)} boxes; "
            f"at most {settings.max_regions} are allowed (MAX_REGIONS)"
        )
    if focus is not None:
        # Newest box first, so it is within the relation window and is <region1>.
        newest = regions.pop(focus[0])
        regions.insert(0, newest)
        focus = [0]
    return TaskPlan(task_id, ref, regions, focus, source)


def _region_tensor(plan: TaskPlan, width: int, height: int) -> torch.Tensor:
    pixel_boxes = []
    for region in plan.regions:
        try:
            pixel_boxes.append(check_pixel_box(region.pixel_box(width, height), width, height))
        except BoxError as exc:
            raise PredictionError(f"task {plan.task_id} region {region.id}: {exc}") from None
    return boxes_tensor(pixel_boxes, width, height)


# ---------------------------------------------------------------------- batch
@dataclass
class _Chunk:
    """Tasks for one ``describe_regions`` call.  An image not yet encoded in this request appears
    in it at most once: the engine encodes every uncached copy it is handed, so a second task on
    that image waits for the next chunk, when the first chunk's encoding is in the engine's cache."""

    tasks: list[int] = field(default_factory=list)
    images: list[EncodedImage] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    cold: set[str] = field(default_factory=set)  # image keys first encoded by this chunk
    by_ref: dict[str, EncodedImage] = field(default_factory=dict)
    by_key: dict[str, EncodedImage] = field(default_factory=dict)  # one object (one decode) per content

    def image(self, ref: str, task_id: Any, fetcher: ImageFetcher) -> EncodedImage:
        image = self.by_ref.get(ref) or fetcher.fetch_encoded(ref, task_id)
        self.by_ref[ref] = image = self.by_key.setdefault(image.key, image)
        return image


def _describe(
    chunk: _Chunk,
    plans: list[TaskPlan],
    config: LabelConfig,
    context: dict | None,
    engine: InferenceEngine,
    version: str,
    settings: Settings,
    results: list[dict],
    stats: PredictStats,
) -> None:
    """One batched model call for the chunk's tasks; their predictions go into ``results``."""
    reports: list[ImageReport] = describe_regions(
        engine,
        chunk.images,
        chunk.tensors,
        caption=config.caption is not None,
        attributes=config.wanted_attributes,
        relations=config.wants_relations,
        max_relation_boxes=settings.max_relation_regions,
        only=[plans[i].focus for i in chunk.tasks] if context else None,
    )
    for i, report, image in zip(chunk.tasks, reports, chunk.images):
        plan = plans[i]
        focus = plan.focus if plan.focus is not None else range(len(plan.regions))
        items: list[dict] = []
        for k in focus:
            items += region_results(plan.regions[k], report.regions[k], config, image.width, image.height)
        items += relation_results(plan, report, config)
        stats.regions += len(focus)
        score = report.score
        results[i] = {
            "result": items,
            "score": round(score, 4) if math.isfinite(score) else 0.0,
            "model_version": version,
        }


def predict_tasks(
    tasks: Sequence[Any],
    config: LabelConfig,
    context: dict | None,
    engine: InferenceEngine,
    version: str,
    fetcher: ImageFetcher,
    settings: Settings,
) -> tuple[list[dict], PredictStats]:
    """One prediction per task, from batched ``describe_regions`` calls of at most
    ``PREDICT_CHUNK_TASKS`` tasks each: memory follows the chunk, not the request.  Images are
    fetched per chunk and kept encoded; the engine decodes one only if its cache lacks it (a box
    drawn on an image already seen costs no decode and no pixel hash), and an image shown by many
    tasks is encoded once (see :class:`_Chunk`)."""
    if len(tasks) > settings.max_tasks_per_request:
        raise PredictionError(
            f"request has {len(tasks)} tasks; at most {settings.max_tasks_per_request} are predicted per "
            "request (MAX_TASKS_PER_REQUEST): send fewer tasks at a time",
            413,
        )
    if context and len(tasks) != 1:
        raise PredictionError(f"params.context (interactive mode) needs exactly one task, got {len(tasks)}")
    plans = [plan_task(t, config, context, settings) for t in tasks]
    stats = PredictStats(tasks=len(plans))
    results: list[dict] = [{"result": [], "model_version": version} for _ in plans]
    warm: set[str] = set()  # image keys encoded by an earlier chunk (in the engine's cache)
    chunk = _Chunk()
    for i, plan in enumerate(plans):
        stats.sources[plan.source] = stats.sources.get(plan.source, 0) + 1
        if not plan.regions:
            continue
        image = chunk.image(plan.image_ref, plan.task_id, fetcher)
        if len(chunk.tasks) >= settings.predict_chunk_tasks or image.key in chunk.cold:
            _describe(chunk, plans, config, context, engine, version, settings, results, stats)
            warm |= chunk.cold
            chunk = _Chunk()
            image = chunk.image(plan.image_ref, plan.task_id, fetcher)
        if image.key not in warm:
            chunk.cold.add(image.key)
        chunk.tasks.append(i)
        chunk.images.append(image)
        chunk.tensors.append(_region_tensor(plan, image.width, image.height))
    if chunk.tasks:
        _describe(chunk, plans, config, context, engine, version, settings, results, stats)
    return results, stats
