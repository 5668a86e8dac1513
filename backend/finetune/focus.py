"""The turns of the corrections that the parent answers wrong, and the turns a training sample of a
corrected image takes.

A corrected image holds many questions (every region's caption, attributes and relations) and most
of them the parent already answers as the reviewer did; only a few teach something (a colour it
never saw, a caption in a script it never wrote).  Sampled uniformly, ``TRAIN_MAX_TURNS`` of them
per image rarely include those few.  The job asks the parent every question of its training
corrections once (:func:`missed_turns`) and each sample of an image takes up to
``TRAIN_FOCUS_TURNS`` of its missed turns, the rest uniformly from the others
(:func:`focused_turns`), so known answers keep appearing too.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from model.data.dataset import record_turns
from model.geometry import boxes_tensor
from model.inference.engine import InferenceEngine

__all__ = ["focused_turns", "missed_turns"]


def missed_turns(engine: InferenceEngine, records: Sequence[dict], batch: int = 8) -> dict[str, list[int]]:
    """Per record id, the indices (:func:`model.data.dataset.record_turns` order) of the turns whose
    answer by ``engine`` differs from the record's; ``records`` hold in-memory images."""
    missed: dict[str, list[int]] = {}
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        boxes = [boxes_tensor(r["boxes"], r["width"], r["height"]) for r in chunk]
        turns = [(i, k, q, a) for i, r in enumerate(chunk) for k, (q, a) in enumerate(record_turns(r))]
        answers = engine.answer([r["image"] for r in chunk], boxes, [(i, q) for i, _, q, _ in turns])
        for r in chunk:
            missed[str(r["id"])] = []
        for (i, k, _, reference), answer in zip(turns, answers):
            if answer.text != reference:
                missed[str(chunk[i]["id"])].append(k)
    return missed


def focused_turns(
    record: dict, missed: Mapping[str, Sequence[int]], max_turns: int, focus: int, seed: int
) -> dict:
    """``record`` with ``max_turns`` of its turns: up to ``focus`` of those in ``missed[id]``, the
    rest from the others (each part a random draw of ``random.Random(seed)``); as it is when it has
    ``max_turns`` turns or fewer, or none was missed."""
    conv = record["conversations"]
    pairs = [conv[k : k + 2] for k in range(0, len(conv), 2)]
    wrong = set(missed.get(str(record.get("id")), ()))
    if len(pairs) <= max_turns or not wrong or focus <= 0:
        return record
    rng = random.Random(seed)
    hot = [k for k in range(len(pairs)) if k in wrong]
    cold = [k for k in range(len(pairs)) if k not in wrong]
    chosen = rng.sample(hot, min(len(hot), focus, max_turns))
    chosen += rng.sample(cold, min(len(cold), max_turns - len(chosen)))
    if len(chosen) < max_turns:  # too few known turns: more of the missed ones
        rest = [k for k in hot if k not in chosen]
        chosen += rng.sample(rest, max_turns - len(chosen))
    return {**record, "conversations": [turn for k in chosen for turn in pairs[k]]}
