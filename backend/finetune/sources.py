"""Where a fine-tuning job's replay data and base evaluation come from: the one place ``backend/``
imports the toy world.

``REPLAY_DATA`` names the earlier data of the served model's lineage:

* ``synthetic``: the embedded default (built by :mod:`toyworld.build_default`) and its fine-tuned
  versions.  Replay is the default's own synthetic training set (the recipe and seed its
  ``version.json`` records); the base evaluation scores the toy
  world's evaluation scenes (caption, attribute and relation rates).
* a region-text JSONL file: a model trained on real data.  A stable sample of the file's records is
  held out for the base evaluation (exact-match rates per question kind); the rest is replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from backend.finetune.data import JsonlData, ReplaySource
from backend.finetune.gate import BaseEvaluator, RecordEvaluator
from backend.settings import Settings
from model.inference.engine import InferenceEngine
from toyworld.evaluate import eval_scenes, score_scenes
from toyworld.recipe import DEFAULT_SEED, built_recipe, load_recipe, training_records
from toyworld.scenes import SceneSpec

__all__ = ["GATE_SEED", "LineageData", "ToySceneEvaluator", "lineage_data"]

GATE_SEED = 0
log = logging.getLogger(__name__)


class LineageData(NamedTuple):
    """What a fine-tuning job keeps the model good at: replayed data and the gate's base evaluation."""

    replay: ReplaySource
    evaluator: BaseEvaluator


class ToySceneEvaluator:
    """The embedded default's base evaluation: ``images`` toy-world evaluation scenes (fixed seed)."""

    metrics = ("caption_exact_match", "attribute_accuracy", "relation_accuracy")

    def __init__(self, images: int) -> None:
        self.images = images

    @property
    def identity(self) -> dict[str, Any]:
        return {"seed": GATE_SEED, "images": self.images}

    def __call__(self, engine: InferenceEngine) -> dict[str, Any]:
        result = score_scenes(engine, eval_scenes(GATE_SEED, self.images, SceneSpec()))
        result.pop("captions")
        return result


def _toy_replay(default_model: Path) -> Callable[[], Sequence[dict]]:
    """The training records of the lineage's root: the recipe its folder records (a default built
    from another recipe replays that recipe's world), else the bundled default recipe."""

    def replay() -> Sequence[dict]:
        built = built_recipe(default_model)
        if built is None:
            log.warning(
                "%s records no readable build recipe: replaying the bundled default recipe", default_model
            )
            return training_records(load_recipe(), DEFAULT_SEED)
        return training_records(*built)

    return replay


def lineage_data(settings: Settings) -> LineageData:
    """The replay source and base evaluator for the lineage ``REPLAY_DATA`` names (module doc).
    Raises ``FileNotFoundError`` when ``REPLAY_DATA`` is neither ``synthetic`` nor a file."""
    if settings.replay_data == "synthetic":
        return LineageData(
            _toy_replay(Path(settings.default_model)), ToySceneEvaluator(settings.gate_eval_images)
        )
    data = JsonlData(Path(settings.replay_data), settings.gate_eval_images, settings.heldout_fraction)
    return LineageData(data.replay, RecordEvaluator(data.held_out, str(data.path)))
