"""Build recipes: how the default model is trained (model config, data, one schedule per phase).

A recipe is a JSON file in ``toyworld/recipes/`` (or any path) loaded into :class:`BuildRecipe`,
maybe naming a ``base`` recipe it changes (:func:`load_recipe`); a built folder records its whole
recipe and seed in ``version.json``, which :func:`built_recipe` reads back so the fine-tuning job
replays the same records and the calibration draws the same world.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.checkpoint import read_metadata
from model.config import ModelConfig, TrainConfig, dataclass_from_dict, load_model_config
from toyworld.scenes import SceneSpec, SyntheticRecords
from toyworld.train_clip import CLIP_WORLD
from toyworld.world import MixedRecords, WorldSpec

__all__ = [
    "BuildRecipe",
    "ClipRecipe",
    "DEFAULT_RECIPE",
    "DEFAULT_SEED",
    "RECIPE_DIR",
    "built_recipe",
    "load_recipe",
    "recipe_from_metadata",
    "recipe_model_config",
    "training_records",
]

RECIPE_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "roi-tiny-world-focal-textured-crops-gentle"
DEFAULT_SEED = 1  # the build seed model/default was made with (docs/default-model.md#how-it-got-here)


@dataclass
class ClipRecipe:
    """The vision tower's contrastive pre-training: schedule and the share/world of its pairs."""

    steps: int = 600
    batch_size: int = 96
    lr: float = 1e-3
    world_share: float = 0.0  # of the pairs drawn from the wider world
    # Fields of that world (toyworld.world.WorldSpec) set over toyworld.train_clip.CLIP_WORLD.
    world: dict[str, Any] = field(default_factory=dict)
    # Of the pairs shown as focal crops around one world object (the model's region.focal_fill).
    focal_share: float = 0.0

    def world_spec(self) -> WorldSpec:
        """The wider world CLIP's pairs draw (``world`` fields over :data:`CLIP_WORLD`)."""
        return dataclass_from_dict(WorldSpec, {**asdict(CLIP_WORLD), **self.world})


@dataclass
class BuildRecipe:
    """How the default model is trained: model config, data and one ``TrainConfig`` per phase."""

    config: str = "roi-tiny"
    # Fields of the model config's ``region`` section this recipe sets (e.g. its focal-crop policy).
    region: dict[str, Any] = field(default_factory=dict)
    turns: int = 8  # question/answer turns generated per synthetic scene
    prompts_per_image: int = 4  # stage 1/2: that many of them, each its own single-question prompt
    records: int = 50_000
    record_seed_offset: int = 100  # synthetic records use seed + this (the fine-tuning replay too)
    world_share: float = 0.0  # of the records drawn from the wider world (toyworld.world)
    # Fields of the training records' WorldSpec (the calibration draws it too; CLIP's: clip.world).
    world: dict[str, Any] = field(default_factory=dict)
    # Relation questions' pairs drawn so each answer form is equally common (toyworld.scenes.balanced_pair).
    balance_relations: bool = False
    clip: ClipRecipe = field(default_factory=ClipRecipe)
    lm: TrainConfig = field(default_factory=lambda: TrainConfig(stage=1))
    stage1: TrainConfig = field(default_factory=lambda: TrainConfig(stage=1))
    stage2: TrainConfig = field(default_factory=TrainConfig)
    # Optional second stage-2 run with a fresh warm-up and cosine schedule (a restart); steps 0: none.
    stage2_restart: TrainConfig = field(default_factory=lambda: TrainConfig(stage=2, steps=0))

    def __post_init__(self) -> None:
        self.world_spec()  # unknown world keys fail when the recipe loads, not after CLIP training
        self.clip.world_spec()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildRecipe:
        return dataclass_from_dict(cls, data)

    def world_spec(self) -> WorldSpec:
        """The wider world the training records draw (``world`` fields over the defaults)."""
        return dataclass_from_dict(WorldSpec, self.world)


def load_recipe(name_or_path: str | Path = DEFAULT_RECIPE) -> BuildRecipe:
    """A recipe by bundled name (``toyworld/recipes/<name>.json``) or file path.

    A recipe file may name a ``"base"`` recipe (bundled name or path) and give only what it
    changes: its keys are merged over the base's, section by section (a nested object is merged
    key by key, anything else replaced; ``null`` drops the base's value, so the field takes its
    default).  Raises FileNotFoundError for a recipe not found, ValueError for one not usable."""
    return BuildRecipe.from_dict(_recipe_fields(name_or_path, ()))


def _recipe_fields(name_or_path: str | Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = Path(name_or_path)
    if chain and not path.is_absolute() and (chain[-1].parent / path).is_file():
        path = chain[-1].parent / path  # a base path is relative to the recipe naming it
    if not path.is_file():
        path = RECIPE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"recipe {name_or_path!r} not found in {RECIPE_DIR}")
    path = path.resolve()
    if path in chain:
        raise ValueError(f"recipe {path.name} is its own base: {' -> '.join(p.name for p in (*chain, path))}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path.name} must be a JSON object")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"recipe {path.name}: base must be a recipe name or path, got {base!r}")
    return _merged(_recipe_fields(base, (*chain, path)), data)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over``'s keys over ``base``'s, nested objects merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def built_recipe(folder: str | Path) -> tuple[BuildRecipe, int] | None:
    """The recipe and seed a built folder records in its ``version.json`` (None: none, or one this
    code cannot read), so its training records can be replayed exactly."""
    return recipe_from_metadata(read_metadata(folder))


def recipe_from_metadata(meta: dict[str, Any]) -> tuple[BuildRecipe, int] | None:
    """:func:`built_recipe` from a folder's already-read ``version.json`` contents."""
    record = meta.get("recipe")
    if not isinstance(record, dict) or not record:
        return None
    record = dict(record)
    seed = record.pop("seed", 0)
    record.pop("scale", None)
    try:
        return BuildRecipe.from_dict(record), int(seed)
    except (TypeError, ValueError):
        return None


def training_records(recipe: BuildRecipe, seed: int = 0, spec: SceneSpec | None = None) -> SyntheticRecords:
    """The synthetic records the default is trained on (the fine-tuning job replays them)."""
    return MixedRecords(
        seed=seed + recipe.record_seed_offset,
        count=recipe.records,
        share=recipe.world_share,
        spec=spec or SceneSpec(),
        world=recipe.world_spec(),
        num_turns=recipe.turns,
        balance_relations=recipe.balance_relations,
    )


def recipe_model_config(recipe: BuildRecipe) -> ModelConfig:
    """The recipe's model config with its ``region`` fields set (validated like a config file's)."""
    cfg = load_model_config(recipe.config)
    if recipe.region:
        cfg.region = dataclass_from_dict(type(cfg.region), {**asdict(cfg.region), **recipe.region})
    return cfg
