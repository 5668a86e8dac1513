"""The fine-tuning job's inputs: replay data and base evaluation per lineage (toy world or JSONL)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backend.corrections import Region
from backend.finetune import finetune_project, gate, lineage_data
from backend.finetune.commit import METRICS, stored_base_scores
from backend.finetune.gate import RecordEvaluator
from backend.finetune.sources import ToySceneEvaluator
from backend.registry import ModelRegistry
from backend.settings import Settings
from backend.store import CorrectionStore, open_store
from model.checkpoint import load_model
from model.data.converters import write_jsonl
from model.data.dataset import record_turns
from model.inference.engine import InferenceEngine
from model.tasks import CAPTION_QUESTIONS
from toyworld.recipe import load_recipe
from toyworld.scenes import SyntheticRecords


def inside(rec: dict) -> list[list[float]]:
    """The record's boxes clipped to its image (toy objects may reach past the border)."""
    w, h = rec["width"], rec["height"]
    return [[max(0.0, x0), max(0.0, y0), min(w, x1), min(h, y1)] for x0, y0, x1, y1 in rec["boxes"]]


def write_records(folder: Path, count: int) -> Path:
    """``count`` region-text records (a caption question per box; every other width unknown) with PNG
    image files beside a JSONL file, referenced by relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for rec in SyntheticRecords(seed=5, count=count):
        name = f"{rec['id']}.png"
        rec["image"].save(folder / name)
        conversations = []
        for k, labels in enumerate(rec["box_labels"]):
            question = CAPTION_QUESTIONS[0].format(a=f"<region{k + 1}>")
            answer = f"{labels['size']} {labels['color']} {labels['shape']}"
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        width = 0 if len(records) % 2 else rec["width"]
        records.append(
            {**rec, "image": name, "width": width, "boxes": inside(rec), "conversations": conversations}
        )
    path = folder / "earlier.jsonl"
    write_jsonl(records, path)
    return path


def jsonl_job(
    tmp_path: Path, default_model: Path, caption: Callable[[dict], str], **overrides: Any
) -> tuple[Settings, CorrectionStore]:
    """Settings of a fast job on a JSONL lineage (12 earlier records) and a store holding project
    1's corrections of 2 synthetic images, each box captioned ``caption(its box_labels)``."""
    path = write_records(tmp_path / "earlier", 12)
    images = tmp_path / "images"
    images.mkdir()
    fast = dict(
        train_steps=2, train_batch_size=2, train_max_turns=2, gate_eval_images=3, heldout_min_records=100,
        max_new_tokens=4, promote_tolerance=1.0,
    )  # fmt: skip
    settings = Settings(
        data_dir=tmp_path / "data", model_dir=tmp_path / "models", default_model=default_model,
        redis_url="redis://127.0.0.1:1/13", local_files_root=str(images), replay_data=str(path),
        **{**fast, **overrides},
    )  # fmt: skip
    store = open_store(settings.data_dir)
    for i, rec in enumerate(SyntheticRecords(seed=9, count=2, num_turns=1)):
        rec["image"].save(images / f"c{i}.png")
        regions = [
            Region(f"r{k}", tuple(box), caption=caption(labels))
            for k, (box, labels) in enumerate(zip(inside(rec), rec["box_labels"]))
        ]
        store.apply_annotation(
            1, 100 + i, f"2025-06-01T12:00:0{i}Z", f"/data/local-files/?d=c{i}.png",
            rec["width"], rec["height"], regions, task_id=200 + i,
        )  # fmt: skip
    return settings, store


def test_synthetic_lineage_is_the_toy_world():
    lineage = lineage_data(Settings(replay_data="synthetic", gate_eval_images=7))
    assert isinstance(lineage.evaluator, ToySceneEvaluator)
    assert lineage.evaluator.identity == {"seed": 0, "images": 7}
    assert tuple(lineage.evaluator.metrics) == ToySceneEvaluator.metrics
    assert "relation_accuracy" in ToySceneEvaluator.metrics
    replay = lineage.replay()
    assert len(replay) == load_recipe().records and replay[0]["source"] == "synthetic"


def test_synthetic_replay_is_the_recipe_the_default_records(tmp_path: Path, caplog):
    """A default built from another recipe (a wider world) replays that recipe's records, with the
    seed its build used; a folder without a readable recipe replays the bundled one (warned)."""
    import json
    from dataclasses import asdict

    from toyworld.recipe import DEFAULT_SEED, training_records

    recipe = load_recipe("roi-tiny-default")  # the grid world: not the bundled default's mix
    built = tmp_path / "built"
    built.mkdir()
    (built / "version.json").write_text(
        json.dumps({"version": "1.0.0", "recipe": {"seed": 3, "scale": 1.0, **asdict(recipe)}})
    )
    replay = lineage_data(Settings(replay_data="synthetic", default_model=built)).replay()
    expected = training_records(recipe, 3)
    assert replay.share == recipe.world_share != load_recipe().world_share and len(replay) == recipe.records
    assert [r["conversations"] for r in (replay[0], replay[7])] == [
        r["conversations"] for r in (expected[0], expected[7])
    ]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "version.json").write_text(json.dumps({"version": "1.0.0", "recipe": {"no_such_key": 1}}))
    fallback = lineage_data(Settings(replay_data="synthetic", default_model=bare)).replay()
    assert fallback.share == load_recipe().world_share and "no readable build recipe" in caplog.text
    bundled = training_records(load_recipe(), DEFAULT_SEED)
    assert fallback[5]["conversations"] == bundled[5]["conversations"]
    (bare / "version.json").write_text(json.dumps({"version": "1.0.0"}))  # a folder that records none
    assert (
        lineage_data(Settings(replay_data="synthetic", default_model=bare)).replay().share == fallback.share
    )


def test_jsonl_lineage_holds_out_a_stable_sample(tmp_path: Path):
    path = write_records(tmp_path / "data", 20)
    settings = Settings(replay_data=str(path), gate_eval_images=3, heldout_fraction=0.2)
    lineage = lineage_data(settings)
    assert isinstance(lineage.evaluator, RecordEvaluator)
    replay_ids = [r["id"] for r in lineage.replay()]
    held_ids = [r["id"] for r in lineage.evaluator.records()]
    assert len(held_ids) == 3 and len(replay_ids) == 17 and not set(held_ids) & set(replay_ids)
    again = lineage_data(settings)
    assert [r["id"] for r in again.evaluator.records()] == held_ids
    assert again.evaluator.identity == lineage.evaluator.identity
    assert lineage.evaluator.identity["records"] == 3
    # At most HELDOUT_FRACTION of the file is held out.
    small = lineage_data(Settings(replay_data=str(path), gate_eval_images=100, heldout_fraction=0.1))
    assert len(small.evaluator.records()) == 2 and len(small.replay()) == 18


def test_missing_replay_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="REPLAY_DATA"):
        lineage_data(Settings(replay_data=str(tmp_path / "nope.jsonl")))


def test_record_evaluator_scores_held_out_records(tmp_path: Path, tiny_checkpoint: Path):
    path = write_records(tmp_path / "data", 10)
    lineage = lineage_data(Settings(replay_data=str(path), gate_eval_images=4, heldout_fraction=0.5))
    held = lineage.evaluator.records()
    scores = lineage.evaluator(InferenceEngine(load_model(tiny_checkpoint), max_new_tokens=4))
    assert scores["questions"] == sum(len(record_turns(r)) for r in held) > 4
    assert scores["caption_accuracy"] == scores["accuracy"]  # only caption questions
    assert 0.0 <= scores["accuracy"] <= 1.0
    assert set(scores) & set(lineage.evaluator.metrics)


def test_gate_compares_only_the_evaluators_metrics():
    parent = {"base": {"a": 0.9, "b": 0.9}, "corrections": {"accuracy": 0.5}}
    candidate = {"base": {"a": 0.9, "b": 0.1}, "corrections": {"accuracy": 0.5}}
    assert gate(parent, candidate, 0.05, ["a"]) == (True, [])
    accepted, reasons = gate(parent, candidate, 0.05, ["a", "b"])
    assert not accepted and reasons[0].startswith("base b ")
    assert gate(parent, {**candidate, "base": {"a": math.nan}}, 0.05, ["a", "b"])[0]


def test_stored_base_scores_need_the_same_evaluation(tmp_path: Path):
    (tmp_path / METRICS).write_text(json.dumps({"candidate": {"base": {"a": 1.0}, "base_eval": {"seed": 0}}}))
    assert stored_base_scores(tmp_path, {"seed": 0}) == {"a": 1.0}
    assert stored_base_scores(tmp_path, {"seed": 1}) is None
    assert stored_base_scores(tmp_path / "missing", {"seed": 0}) is None


@pytest.mark.slow
def test_job_on_a_real_data_lineage_scores_its_own_held_out_records(tmp_path: Path, tiny_checkpoint: Path):
    """A JSONL lineage: replay and base evaluation come from the file, nothing from the toy world."""
    settings, store = jsonl_job(
        tmp_path,
        tiny_checkpoint,
        lambda labels: f"{labels['size']} {labels['color']} {labels['shape']}",
        train_steps=4,
    )
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    lineage = lineage_data(settings)
    summary = finetune_project(1, settings, store, registry, lineage, reason="test")

    assert summary["decision"] in ("promoted", "rejected") and summary["version"] == "1.1.0"
    assert summary["candidate"]["base_eval"] == lineage.evaluator.identity
    questions = sum(len(record_turns(r)) for r in lineage.evaluator.records())
    assert summary["candidate"]["base"]["questions"] == questions  # the held-out records, not toy scenes
    assert summary["parent_scores"]["base"]["questions"] == questions
    meta = json.loads((registry.path("1.1.0") / "version.json").read_text())
    assert {f"base_{k}" for k in lineage.evaluator.metrics} <= set(meta["metrics"])
    assert meta["data"]["corrected_images"] == 2 and meta["source"] == "backend.finetune"
