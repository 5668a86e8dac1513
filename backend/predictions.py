"""Label Studio tasks -> boxes -> batched model calls (bounded chunks) -> Label Studio prediction results.

Where a task's boxes come from, first match wins:

1. interactive ``params.context.result`` (smart tool): every region in it is given to the model,
   the newest (last) one is described and returned;
2. the task's latest annotation or draft (not cancelled) that has regions;
3. the task's latest existing prediction that has regions;
4. ``task.data["boxes"]``: a list whose items are either Label Studio rectangle values in percent
   (``{"x", "y", "width", "height", "rotation"?, "rectanglelabels"?: [...], "id"?}``, or a whole
   Label Studio result with a ``value`` of that form) or pixel boxes ``[x0, y0, x1, y1]`` of the
   original image (given to the config's first rectangle control).

A region is any image region tool of the config (rectangle, polygon, ellipse, keypoint, brush):
the model describes the pixel box :mod:`backend.region_shapes` gives for it (a rotated rectangle's
or ellipse's by its rotated outline, a polygon's around its points, a keypoint's square around it,
a brush's around its painted pixels), and the region returned keeps the geometry it was given.

One bad box never sinks a batch.  What is left out is reported as a :class:`Skip` (to ``on_skip``;
the app logs each at WARNING and counts it by ``code``):

* a **region** (its other regions and tasks are answered): malformed (``bad_region``), NaN/inf
  (``not_finite``), zero or negative width/height (``zero_area``), wholly outside the image
  (``outside_image``), or a side shorter than ``MIN_BOX_PX`` pixels inside the image (``tiny_box``).
  A box partly outside the image is clipped to it for the model, which describes the part inside
  (the rectangle returned keeps the geometry it was given);
* a **task**: malformed (``bad_task``), without image (``no_image``), whose image cannot be fetched
  or read (``image``), with more than ``MAX_REGIONS`` boxes (``too_many_boxes``), without boxes
  (``no_boxes``: e.g. boxes only in a draft, which Label Studio does not send in a batch), or whose
  boxes were all skipped (``no_usable_box``).  Its entry in ``results`` is ``[]`` - no prediction:
  Label Studio 1.23.2 reads a list entry as that task's list of predictions (``ml/models.py``,
  ``_get_predictions_from_ml_backend``), so it stores nothing and a later *Retrieve predictions*
  asks again, while ``{"result": []}`` would be stored and never asked again.

A request is refused (the first fault's status and reason) only when no task got a prediction and a
task was skipped for a fault - so a single-task request (an API call, the interactive smart tool,
whose newest box must itself be usable) still gets its reason in the answer.

Results are built by :mod:`backend.results`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from backend import region_qa
from backend.errors import ClientError
from backend.images import ImageError, ImageFetcher
from backend.label_config import LabelConfig, task_field
from backend.region_shapes import ShapeError, region_geometry, shape_of
from backend.results import Region, TaskPlan, region_masks, region_results, relation_results
from backend.settings import Settings
from model.geometry import BoxError, boxes_tensor, check_pixel_box
from model.inference.describe import ImageReport, describe_regions
from model.inference.engine import InferenceEngine
from model.inference.image_input import EncodedImage

__all__ = [
    "REGION_SKIP_CODES",
    "TASK_SKIP_CODES",
    "PredictStats",
    "PredictionError",
    "Skip",
    "plan_task",
    "predict_tasks",
    "rects_from_results",
]

REGION_SKIP_CODES = ("bad_region", "not_finite", "zero_area", "outside_image", "tiny_box")
TASK_SKIP_CODES = ("bad_task", "no_image", "image", "too_many_boxes", "no_boxes", "no_usable_box")
_BOX_CODES = {"invalid": "bad_region", "tiny": "tiny_box"}  # BoxError.kind -> skip code (else the same)
# A box on the image edge overhangs it by float noise after the percent -> pixel conversion.
CLIP_TOLERANCE_PX = 1e-3


class PredictionError(ClientError):
    """Bad input in a predict request (400; 413 for more tasks than MAX_TASKS_PER_REQUEST)."""


@dataclass(frozen=True)
class Skip:
    """A region (``region`` set) or a whole task left out of the answer.

    ``code``: one of :data:`REGION_SKIP_CODES` / :data:`TASK_SKIP_CODES` (the metric label);
    ``reason``: the sentence logged (and answered as ``detail`` if the request is refused);
    ``error``: the refusal it is on its own (``None`` when nothing is wrong: a task without boxes).
    """

    task: Any
    region: str | None
    code: str
    reason: str
    error: ClientError | None = None


@dataclass
class PredictStats:
    tasks: int = 0  # tasks given a prediction
    regions: int = 0  # regions described
    clipped: int = 0  # boxes partly outside their image, clipped and described
    skipped_tasks: int = 0
    skipped_regions: int = 0
    sources: dict[str, int] = field(default_factory=dict)


def _fault(reason: str, code: str, task: Any, region: str | None = None) -> PredictionError:
    return PredictionError(reason, code=code, task=task, region=region)


def _region_skip(task: Any, region: str | None, code: str, reason: str) -> Skip:
    return Skip(task, region, code, reason, _fault(reason, code, task, region))


def _focus_lost(skip: Skip) -> PredictionError:
    """The interactive task's fault when the box it asks about was skipped."""
    return _fault(
        f"task {skip.task}: the box to describe was skipped: {skip.reason}",
        "no_usable_box",
        skip.task,
        skip.region,
    )


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PredictionError(f"{what} must be a number, got {value!r}", code="bad_region")
    return float(value)


def _labels(value: dict, rect_type: str) -> list[str]:
    labels = value.get(rect_type) or value.get("rectanglelabels") or value.get("labels") or []
    if isinstance(labels, str):
        labels = [labels]
    return [str(x) for x in labels] if isinstance(labels, list) else []


def _name(item: dict) -> str | None:
    """An item's ``from_name`` when it is a string (anything else names no control)."""
    name = item.get("from_name")
    return name if isinstance(name, str) else None


def _given_id(item: Any) -> str | None:
    """An item's ``id`` as a string when it is a string or an integer (else None)."""
    rid = item.get("id") if isinstance(item, dict) else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


def _item_id(item: Any, i: int) -> str:
    return _given_id(item) or f"result[{i}]"


def _original(item: dict) -> tuple[int, int] | None:
    """The item's ``original_width``/``original_height`` when both are positive integers."""
    w, h = item.get("original_width"), item.get("original_height")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h))
    return (w, h) if ok else None  # type: ignore[return-value]


def _rect_region(item: Any, i: int, config: LabelConfig, where: str) -> Region | None:
    """The region of one result item (``None``: not a region control of ``config``); raises
    :class:`PredictionError` for a malformed region."""
    if not isinstance(item, dict):
        raise PredictionError(f"{where}: result[{i}] must be an object", code="bad_region")
    name = _name(item)
    if name not in config.rect_names:
        return None
    rid = item.get("id") or f"r{i}"
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise PredictionError(f"{where}: result[{i}].id must be a string, got {rid!r}", code="bad_region")
    control = config.rect(name)
    value = item.get("value")
    try:
        geo = region_geometry(control.type, value)
    except ShapeError as exc:
        raise PredictionError(f"{where} region {rid}: {exc}", code="bad_region") from None
    labels = _labels(value, control.type)
    return Region(str(rid), control.name, control.type, labels, percent=geo, original=_original(item))


def _with_label_items(regions: list[Region], results: list, config: LabelConfig) -> list[Region]:
    """``regions`` with the values their ids have in the config's separate ``<Labels>`` controls
    (``{"type": "labels", "id": <region id>, "value": {..., "labels": [...]}}``), carried as they are."""
    if not config.label_controls:
        return regions
    found: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for item in results:
        rid = _given_id(item)
        if rid is not None and _name(item) in config.label_controls and isinstance(item.get("value"), dict):
            values = tuple(_labels(item["value"], "labels"))
            if values:
                found.setdefault(rid, []).append((item["from_name"], values))
    return [replace(r, label_items=tuple(found[r.id])) if r.id in found else r for r in regions]


def rects_from_results(
    results: Any, config: LabelConfig, where: str, task: Any = None, skipped: list[Skip] | None = None
) -> list[Region]:
    """Regions of ``config``'s region controls among Label Studio result items.

    A malformed region is appended to ``skipped`` (code ``bad_region``); without ``skipped`` it
    raises :class:`PredictionError`."""
    if not isinstance(results, list):
        raise PredictionError(f"{where}: result must be a list", code="bad_task", task=task)
    regions = []
    for i, item in enumerate(results):
        try:
            region = _rect_region(item, i, config, where)
        except PredictionError as exc:
            if skipped is None:
                raise
            skipped.append(_region_skip(task, _item_id(item, i), "bad_region", exc.message))
            continue
        if region is not None:
            regions.append(region)
    return _with_label_items(regions, results, config)


def _check_context(context: dict, config: LabelConfig, task: Any, skipped: list[Skip]) -> list[Region]:
    """The context's rectangles, newest (last) first; the newest must be usable."""
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
    rect_items = [i for i, item in enumerate(results) if _name(item) in config.rect_names]
    if not rect_items:
        raise PredictionError(
            f"params.context.result has no region from {sorted(config.rect_names)}; nothing to describe"
        )
    newest = rect_items[-1]
    try:
        focus = _rect_region(results[newest], newest, config, "params.context")
    except PredictionError as exc:
        skip = _region_skip(task, _item_id(results[newest], newest), "bad_region", exc.message)
        skipped.append(skip)
        raise _focus_lost(skip) from None
    focus = _with_label_items([focus], results, config)[0]  # type: ignore[list-item]
    others = rects_from_results(
        results[:newest] + results[newest + 1 :], config, "params.context", task, skipped
    )
    return [focus, *others]  # type: ignore[list-item]


def _stamp(item: dict) -> tuple:
    return (str(item.get("updated_at") or item.get("created_at") or ""), str(item.get("id") or ""))


def _latest_with_rects(
    items: Any, config: LabelConfig, where: str, task: Any, skipped: list[Skip]
) -> list[Region]:
    """Rectangles of the newest item (annotation, draft or prediction) holding any; its malformed
    items go to ``skipped``."""
    if not isinstance(items, list):
        return []
    candidates = [x for x in items if isinstance(x, dict) and not x.get("was_cancelled")]
    for item in sorted(candidates, key=_stamp, reverse=True):
        result = item.get("result") or []
        if not isinstance(result, list) or not any(
            isinstance(x, dict) and _name(x) in config.rect_names for x in result
        ):
            continue
        return rects_from_results(result, config, f"{where} {item.get('id', '')}".strip(), task, skipped)
    return []


def _data_boxes(boxes: Any, config: LabelConfig, task: Any, skipped: list[Skip]) -> list[Region]:
    if not isinstance(boxes, list):
        raise _fault(f"task {task}: data.boxes must be a list of rectangles", "bad_task", task)
    rect = next((r for r in config.rects if shape_of(r.type) == "rectangle"), None)
    if rect is None:
        raise _fault(
            f"task {task}: data.boxes holds rectangles, and the label config has no rectangle control",
            "bad_task",
            task,
        )
    default_labels = list(rect.labels[:1])
    regions = []
    for i, item in enumerate(boxes):
        where = f"task {task} data.boxes[{i}]"
        rid = f"box{i + 1}"
        try:
            if isinstance(item, (list, tuple)):
                if len(item) != 4:
                    raise PredictionError(f"{where}: a pixel box needs 4 numbers [x0, y0, x1, y1]")
                pixels = tuple(_number(v, where) for v in item)
                regions.append(Region(rid, rect.name, rect.type, default_labels, pixels=pixels))  # type: ignore[arg-type]
                continue
            if not isinstance(item, dict):
                raise PredictionError(f"{where}: expected a rectangle object or [x0, y0, x1, y1]")
            rid = _item_id(item, i) if item.get("id") is not None else rid
            value = item.get("value", item)
            labels = _labels(value, rect.type) if isinstance(value, dict) else []
            try:
                geo = region_geometry(rect.type, value)
            except ShapeError as exc:
                raise PredictionError(f"{where}: {exc}") from None
            regions.append(Region(rid, rect.name, rect.type, labels or default_labels, percent=geo))
        except PredictionError as exc:
            skipped.append(_region_skip(task, rid, "bad_region", exc.message))
    return regions


def plan_task(
    task: Any,
    config: LabelConfig,
    context: dict | None,
    settings: Settings,
    skipped: list[Skip] | None = None,
) -> TaskPlan:
    """Find a task's image and boxes (see the module docstring for the order).

    Raises :class:`PredictionError` (with its skip ``code``) for a task that cannot be answered at
    all; malformed rectangles are left out and appended to ``skipped`` (the plan's ``skipped``)."""
    if not isinstance(task, dict):
        raise PredictionError("every task must be an object", code="bad_task")
    task_id = task.get("id")
    data = task.get("data")
    if not isinstance(data, dict):
        raise _fault(f"task {task_id} has no data object", "bad_task", task_id)
    ref = task_field(data, config.image_var)
    if ref is not None and not isinstance(ref, str):
        raise _fault(f"task {task_id}: data.{config.image_var} must be a URL string", "no_image", task_id)
    if not ref:
        raise _fault(
            f"task {task_id} has no image: data.{config.image_var} is missing "
            f'(<Image value="${config.image_var}">)',
            "no_image",
            task_id,
        )
    skipped = [] if skipped is None else skipped
    focus = None
    if context:
        regions, source = _check_context(context, config, task_id, skipped), "context"
        focus = [0]  # the newest box, first so it is within the relation window and is <region1>
    else:
        source = "none"
        merged = [*(task.get("annotations") or []), *(task.get("drafts") or [])]
        regions = _latest_with_rects(merged, config, f"task {task_id} annotation", task_id, skipped)
        source = "annotation" if regions or skipped else source
        if source == "none":
            regions = _latest_with_rects(
                task.get("predictions"), config, f"task {task_id} prediction", task_id, skipped
            )
            source = "prediction" if regions or skipped else source
        if source == "none" and data.get("boxes") is not None:
            regions, source = _data_boxes(data["boxes"], config, task_id, skipped), "data"
    if len(regions) > settings.max_regions:
        raise _fault(
            f"task {task_id} has {len(regions)} boxes; "
            f"at most {settings.max_regions} are allowed (MAX_REGIONS)",
            "too_many_boxes",
            task_id,
        )
    return TaskPlan(task_id, ref, regions, focus, source, skipped)


def _nothing_left(plan: TaskPlan) -> PredictionError:
    """The fault of a task whose every box was skipped (``plan.skipped`` holds why)."""
    first = plan.skipped[0]
    reason = f"task {plan.task_id}: every box was skipped; {first.reason}"
    return _fault(reason, "no_usable_box", plan.task_id, first.region)


def _usable(plan: TaskPlan, width: int, height: int, min_side: float) -> tuple[TaskPlan, torch.Tensor, int]:
    """The plan's regions that are usable on a ``width`` x ``height`` image (overhangs clipped; the
    others added to ``plan.skipped``), their ``(N, 4)`` model boxes, and how many were clipped.
    Raises :class:`PredictionError` when none is usable, or when the interactive box is not."""
    kept: list[Region] = []
    boxes = []
    clipped = 0
    for k, region in enumerate(plan.regions):
        try:
            raw = region.pixel_box(width, height)
            box = check_pixel_box(raw, width, height, min_side=min_side)
        except BoxError as exc:
            code = _BOX_CODES.get(exc.kind, exc.kind)
            skip = _region_skip(
                plan.task_id, region.id, code, f"task {plan.task_id} region {region.id}: {exc}"
            )
            plan.skipped.append(skip)
            if plan.focus is not None and k in plan.focus:
                raise _focus_lost(skip) from None
            continue
        # The model sees the part inside the image; the rectangle returned keeps the geometry it was
        # given, so Label Studio attaches the answers to the very box it sent.
        clipped += max(abs(a - b) for a, b in zip(box, raw)) > CLIP_TOLERANCE_PX
        kept.append(region)
        boxes.append(box)
    if not kept:
        raise _nothing_left(plan)
    return replace(plan, regions=kept), boxes_tensor(boxes, width, height), clipped


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


def _masks(chunk: _Chunk, plans: list[TaskPlan | None]) -> list | None:
    """Per task of the chunk its regions' brush masks (:func:`backend.results.region_masks`), or
    None when no region of the chunk is a brush."""
    masks = [
        region_masks(plans[i].regions, image.width, image.height)  # type: ignore[union-attr]
        for i, image in zip(chunk.tasks, chunk.images)
    ]
    return masks if any(m is not None for m in masks) else None


def _describe(
    chunk: _Chunk,
    plans: list[TaskPlan | None],
    config: LabelConfig,
    context: dict | None,
    engine: InferenceEngine,
    version: str,
    settings: Settings,
    results: list[Any],
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
        only=[plans[i].focus for i in chunk.tasks] if context else None,  # type: ignore[union-attr]
        masks=_masks(chunk, plans),
    )
    for i, report, image in zip(chunk.tasks, reports, chunk.images):
        plan = plans[i]
        assert plan is not None
        focus = plan.focus if plan.focus is not None else range(len(plan.regions))
        items: list[dict] = []
        for k in focus:
            items += region_results(plan.regions[k], report.regions[k], config, image.width, image.height)
        items += relation_results(plan, report, config)
        asked = region_qa.context_questions(context, config)
        if asked:
            items += _answers(
                engine, image, chunk.tensors[chunk.tasks.index(i)], plan, asked, config, context
            )
        stats.regions += len(focus)
        stats.tasks += 1
        score = report.score
        results[i] = {
            "result": items,
            "score": round(score, 4) if math.isfinite(score) else 0.0,
            "model_version": version,
        }


def _answers(
    engine: InferenceEngine,
    image: EncodedImage,
    boxes: torch.Tensor,
    plan: TaskPlan,
    questions: list[str],
    config: LabelConfig,
    context: dict | None,
) -> list[dict]:
    """The answer TextArea item for questions typed in the interactive request; boxes are numbered
    in the context's drawing order (``box 1`` is the first drawn).
    ``boxes``: ``(N, 4)`` normalised, rows of ``plan.regions``."""
    drawn = [item.get("id") for item in (context or {}).get("result") or [] if isinstance(item, dict)]
    order = sorted(
        range(len(plan.regions)),
        key=lambda k: drawn.index(plan.regions[k].id) if plan.regions[k].id in drawn else len(drawn),
    )
    regions = [plan.regions[k] for k in order]
    masks = region_masks(regions, image.width, image.height)
    item = region_qa.answer_result(
        engine, image, boxes[order], regions, questions, config, plan.task_id, masks
    )
    return [item] if item is not None else []


def _task_code(exc: ClientError) -> str:
    return "image" if isinstance(exc, ImageError) else exc.code


def _about(exc: ClientError, task: Any) -> ClientError:
    """``exc`` naming ``task`` (for the refusal log when it is raised)."""
    if exc.task is None:
        exc.task = task
    return exc


def predict_tasks(
    tasks: Sequence[Any],
    config: LabelConfig,
    context: dict | None,
    engine: InferenceEngine,
    version: str,
    fetcher: ImageFetcher,
    settings: Settings,
    on_skip: Callable[[Skip], None] | None = None,
) -> tuple[list[Any], PredictStats]:
    """One entry per task - a prediction, or ``[]`` for a skipped task (see the module docstring) -
    from batched ``describe_regions`` calls of at most ``PREDICT_CHUNK_TASKS`` tasks each: memory
    follows the chunk, not the request.  Images are fetched per chunk and kept encoded; the engine
    decodes one only if its cache lacks it (a box drawn on an image already seen costs no decode
    and no pixel hash), and an image shown by many tasks is encoded once (see :class:`_Chunk`).

    Every skipped region and task is handed to ``on_skip`` as it happens.  Raises the first task
    fault when no task got a prediction (see the module docstring)."""
    if len(tasks) > settings.max_tasks_per_request:
        raise PredictionError(
            f"request has {len(tasks)} tasks; at most {settings.max_tasks_per_request} are predicted per "
            "request (MAX_TASKS_PER_REQUEST): send fewer tasks at a time",
            413,
        )
    if context and len(tasks) != 1:
        raise PredictionError(f"params.context (interactive mode) needs exactly one task, got {len(tasks)}")
    stats = PredictStats()
    faults: list[ClientError] = []

    def skip_regions(found: list[Skip]) -> None:
        for item in found:
            stats.skipped_regions += 1
            if on_skip is not None:
                on_skip(item)
        found.clear()

    def skip_task(task_id: Any, code: str, reason: str, error: ClientError | None) -> None:
        stats.skipped_tasks += 1
        if error is not None:
            faults.append(error)
        if on_skip is not None:
            on_skip(Skip(task_id, None, code, reason, error))

    plans: list[TaskPlan | None] = []
    for task in tasks:
        found: list[Skip] = []
        try:
            plan: TaskPlan | None = plan_task(task, config, context, settings, found)
        except PredictionError as exc:
            plan = None
            skip_regions(found)
            skip_task(exc.task, exc.code, exc.message, exc)
        plans.append(plan)
    results: list[Any] = [[] for _ in plans]
    warm: set[str] = set()  # image keys encoded by an earlier chunk (in the engine's cache)
    chunk = _Chunk()
    for i, plan in enumerate(plans):
        if plan is None:
            continue
        stats.sources[plan.source] = stats.sources.get(plan.source, 0) + 1
        if not plan.regions and not plan.skipped:
            reason = (
                f"task {plan.task_id} has no boxes (in its annotations, drafts, predictions or data.boxes; "
                "a batch from Label Studio carries no drafts): no prediction"
            )
            skip_task(plan.task_id, "no_boxes", reason, None)
            continue
        try:
            if not plan.regions:
                raise _nothing_left(plan)
            image = chunk.image(plan.image_ref, plan.task_id, fetcher)
            plan, tensor, clipped = _usable(plan, image.width, image.height, settings.min_box_px)
        except ClientError as exc:
            skip_regions(plan.skipped)
            skip_task(plan.task_id, _task_code(exc), exc.message, _about(exc, plan.task_id))
            continue
        skip_regions(plan.skipped)
        if len(chunk.tasks) >= settings.predict_chunk_tasks or image.key in chunk.cold:
            _describe(chunk, plans, config, context, engine, version, settings, results, stats)
            warm |= chunk.cold
            chunk = _Chunk()
            try:  # again, so this chunk holds its own copy (decoded pixels go with their chunk)
                image = chunk.image(plan.image_ref, plan.task_id, fetcher)
            except ImageError as exc:
                skip_task(plan.task_id, "image", exc.message, _about(exc, plan.task_id))
                continue
        plans[i] = plan
        stats.clipped += clipped
        if image.key not in warm:
            chunk.cold.add(image.key)
        chunk.tasks.append(i)
        chunk.images.append(image)
        chunk.tensors.append(tensor)
    if chunk.tasks:
        _describe(chunk, plans, config, context, engine, version, settings, results, stats)
    if not stats.tasks and faults:
        raise faults[0]
    return results, stats
