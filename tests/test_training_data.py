"""Training data plumbing: separate single-question prompts per image, hidden image tokens, the
build recipe, position answers."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict

import pytest
import torch

from model.config import TrainConfig, load_model_config
from model.data.dataset import RecordDataset, collate_samples
from model.prompt import IGNORE_INDEX
from model.tasks import position_text
from model.training import hide_image_tokens
from tests.model_helpers import tiny_model, tiny_records
from toyworld.recipe import BuildRecipe, load_recipe, recipe_model_config, training_records


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_separate_turns_make_one_single_question_prompt_each(model):
    records = tiny_records(4, seed=21)
    joint = RecordDataset(records, model, max_turns=3)[0]
    apart = RecordDataset(records, model, max_turns=3, separate_turns=True)[0]
    assert len(joint.prompts) == 1 and len(apart.prompts) == 3
    human = model.tokenizer("### Human:", add_special_tokens=False).input_ids
    for prompt in apart.prompts:
        ids = prompt.input_ids
        # One question, one answer: no "### Human:" turn separator after the image intro.
        occurrences = sum(ids[i : i + len(human)] == human for i in range(len(ids)))
        assert occurrences == 1
        assert sum(1 for x in prompt.labels if x != IGNORE_INDEX) > 1
    # The same three turns, same answers, either way.
    answers = [model.tokenizer.decode([t for t in p.labels if t != IGNORE_INDEX]) for p in apart.prompts]
    joint_answers = model.tokenizer.decode([t for t in joint.prompts[0].labels if t != IGNORE_INDEX])
    assert all(a.strip().removesuffix("</s>").strip() in joint_answers for a in answers)


def test_collate_shares_each_image_between_its_prompts_and_forward_runs(model):
    data = RecordDataset(tiny_records(4, seed=22), model, max_turns=2, separate_turns=True)
    batch = collate_samples(model, [data[0], data[1], data[2]])
    assert batch["pixels"].shape[0] == 3 and batch["input_ids"].shape[0] == 6
    assert batch["row_image"] == [0, 0, 1, 1, 2, 2]
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_hide_image_tokens_masks_only_image_tokens_of_some_rows(model):
    data = RecordDataset(tiny_records(8, seed=23), model, max_turns=2, separate_turns=True)
    batch = collate_samples(model, [data[i] for i in range(8)])
    before = batch["attention_mask"].clone()
    hide_image_tokens(batch, model.image_patch_id, 0.5, random.Random(0))
    is_image = batch["input_ids"] == model.image_patch_id
    hidden_rows = [r for r in range(16) if batch["attention_mask"][r][is_image[r]].sum() == 0]
    assert 3 <= len(hidden_rows) <= 13
    assert torch.equal(batch["attention_mask"][~is_image], before[~is_image])  # text untouched
    for r in set(range(16)) - set(hidden_rows):
        assert torch.equal(batch["attention_mask"][r], before[r])
    unchanged = collate_samples(model, [data[0]])
    hide_image_tokens(unchanged, model.image_patch_id, 0.0, random.Random(0))
    assert unchanged["attention_mask"][unchanged["input_ids"] == model.image_patch_id].all()


def test_bundled_recipe_loads_and_rejects_unknown_keys(tmp_path):
    recipe = load_recipe()
    assert recipe.stage2.stage == 2 and recipe.lm.stage == 1 and recipe.prompts_per_image >= 1
    records = training_records(recipe)
    assert len(records) == recipe.records and records.num_turns == recipe.turns
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stage2": {"steps": 5, "learning_rate": 1}}))
    with pytest.raises(ValueError, match="unknown config keys"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError):
        load_recipe("no-such-recipe")
    assert BuildRecipe().config == "roi-tiny"


def test_a_recipe_names_its_base_and_gives_only_what_it_changes(tmp_path):
    """``base``: the named recipe's fields with this file's merged over them section by section;
    ``null`` drops a base value (the field's default); loops and bad bases are refused by name."""
    child = tmp_path / "child.json"
    child.write_text(json.dumps({
        "base": "roi-tiny-world-focal-textured-crops",
        "stage2_restart": None,
        "stage2": {"steps": 7},
        "world": {"textures": ["checks"]},
    }))  # fmt: skip
    base, got = load_recipe("roi-tiny-world-focal-textured-crops"), load_recipe(child)
    assert got.stage2.steps == 7 and got.stage2.lr == base.stage2.lr and got.stage2.seed == base.stage2.seed
    assert got.world == {**base.world, "textures": ["checks"]} and got.clip == base.clip
    assert base.stage2_restart.steps > 0 and got.stage2_restart == BuildRecipe().stage2_restart
    grandchild = tmp_path / "grandchild.json"
    grandchild.write_text(json.dumps({"base": str(child), "turns": 3}))
    assert load_recipe(grandchild).turns == 3 and load_recipe(grandchild).stage2.steps == 7
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / "nested.json"
    nested.write_text(json.dumps({"base": "../child.json", "turns": 5}))  # relative to its own folder
    assert load_recipe(nested).stage2.steps == 7 and load_recipe(nested).turns == 5
    loop = tmp_path / "loop.json"
    loop.write_text(json.dumps({"base": str(loop)}))
    with pytest.raises(ValueError, match="its own base"):
        load_recipe(loop)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"base": "b.json"}))
    b.write_text(json.dumps({"base": "a.json"}))
    with pytest.raises(ValueError, match="a.json -> b.json -> a.json"):
        load_recipe(a)
    for base_value, error in (({"x": 1}, ValueError), ("no-such-recipe", FileNotFoundError)):
        child.write_text(json.dumps({"base": base_value}))
        with pytest.raises(error):
            load_recipe(child)


# sha256 of json.dumps(asdict(load_recipe(name)), sort_keys=True) at debadf9, when every bundled
# recipe was a full copy: rewriting them as changes of a base must not change one field.  Recomputed
# when TrainConfig.freeze came (each old digest held with its empty "freeze" entries left out).
RECIPE_DIGESTS = {
    "roi-tiny-default": "11688fd03674afdb",
    "roi-tiny-world": "a70bf126a46acf30",
    "roi-tiny-world-focal": "39aa21aafc61e9d9",
    "roi-tiny-world-focal-balanced": "09240b75275da216",
    "roi-tiny-world-focal-mix": "7f72c03d61ec8245",
    "roi-tiny-world-focal-textured": "cb9ac3bdf695d48d",
    "roi-tiny-world-focal-textured-crops": "757eaac6ed3973a2",
    "roi-tiny-world-focal-textured-crops-single": "7248732274c37646",
    "roi-tiny-world-focal-textured-records": "3558204818cfc01e",
}


@pytest.mark.parametrize("name", sorted(RECIPE_DIGESTS))
def test_bundled_recipes_resolve_to_the_fields_their_builds_used(name):
    """(A new field with a default in BuildRecipe/TrainConfig changes every digest: recompute.)"""
    fields = json.dumps(asdict(load_recipe(name)), sort_keys=True)
    assert hashlib.sha256(fields.encode()).hexdigest()[:16] == RECIPE_DIGESTS[name]


def test_the_default_recipe_is_what_the_shipped_default_records():
    from model.checkpoint import DEFAULT_DIR
    from toyworld.recipe import DEFAULT_RECIPE, DEFAULT_SEED, built_recipe

    assert built_recipe(DEFAULT_DIR) == (load_recipe(DEFAULT_RECIPE), DEFAULT_SEED)


def test_a_recipe_sets_region_fields_of_its_model_config(tmp_path):
    recipe = load_recipe("roi-tiny-world-focal")
    assert recipe_model_config(recipe).region.focal_below == recipe.region["focal_below"] > 0.5
    assert recipe_model_config(load_recipe("roi-tiny-default")).region == load_model_config("roi-tiny").region
    for region, message in (
        ({"focal_below": 1.5}, "focal_below must be in"),
        ({"focal": 1}, "unknown config keys"),
    ):
        with pytest.raises(ValueError, match=message):
            recipe_model_config(BuildRecipe(region=region))


def test_position_text_by_thirds_on_a_non_square_image():
    assert position_text([0, 0, 20, 10], 300, 90) == "top left"
    assert position_text([140, 35, 160, 55], 300, 90) == "middle centre"
    assert position_text([250, 70, 290, 88], 300, 90) == "bottom right"


@pytest.mark.slow
def test_build_runs_every_phase_and_resumes_with_a_restart(tmp_path):
    """A miniature build (every phase, 2 steps each) writes a loadable folder; resuming it with a
    ``stage2_restart`` phase runs only that phase and keeps the earlier figures."""
    from model.checkpoint import load_model, read_metadata, read_train_config
    from toyworld.build_default import build_default

    recipe = BuildRecipe.from_dict(
        {"config": "roi-test", "turns": 2, "prompts_per_image": 2, "records": 32,
         "clip": {"steps": 2, "batch_size": 8}, "lm": {"stage": 1, "batch_size": 4},
         "stage1": {"stage": 1, "batch_size": 4}, "stage2": {"stage": 2, "batch_size": 4}}
    )  # fmt: skip
    recipe.stage2.image_token_dropout = 0.5
    first = build_default(tmp_path / "a", recipe, scale=0.001, show_bar=False, eval_images=2)
    assert {"clip_loss", "lm_loss", "stage1_loss", "stage2_loss"} <= set(first)
    load_model(tmp_path / "a")
    assert read_train_config(tmp_path / "a").image_token_dropout == 0.5  # the regime it ends in
    recipe.stage2_restart = TrainConfig(stage=2, steps=2, batch_size=4, image_token_dropout=0.1)
    second = build_default(tmp_path / "b", recipe, show_bar=False, eval_images=2, resume=tmp_path / "a")
    assert second["stage2_restart_loss"] and second["stage1_loss"] == first["stage1_loss"]
    assert "stage2_restart_seconds" in read_metadata(tmp_path / "b")["figures"]
    load_model(tmp_path / "b")
    assert read_train_config(tmp_path / "b").image_token_dropout == 0.1  # fine-tuning continues this


@pytest.mark.slow
def test_an_interrupted_build_continues_from_its_last_finished_phase(tmp_path, monkeypatch):
    """A build killed in stage 2 keeps CLIP, LM and stage 1 in ``<out>.partial``; started again it
    trains stage 2 only, writes the complete folder and removes the partial one."""
    import toyworld.build_default as bd
    from model.checkpoint import load_model, read_metadata

    recipe = BuildRecipe.from_dict(
        {"config": "roi-test", "turns": 2, "prompts_per_image": 2, "records": 32, "world_share": 0.75,
         "clip": {"steps": 2, "batch_size": 8, "world_share": 0.5}, "lm": {"stage": 1, "batch_size": 4},
         "stage1": {"stage": 1, "batch_size": 4}, "stage2": {"stage": 2, "batch_size": 4}}
    )  # fmt: skip
    real_train, phases = bd.train, []

    def killed_in_stage2(model, records, cfg, opts):
        phases.append(cfg.stage)
        if len(phases) == 3:
            raise KeyboardInterrupt  # what a session's end does to the build
        return real_train(model, records, cfg, opts)

    out = tmp_path / "default"
    kwargs = {"scale": 0.001, "seed": 0, "show_bar": False, "eval_images": 2, "calibration_images": 0}
    monkeypatch.setattr(bd, "train", killed_in_stage2)
    with pytest.raises(KeyboardInterrupt):
        bd.build_default(out, recipe, **kwargs)
    done = read_metadata(bd.partial_folder(out))
    assert done["build"] == {"complete": False} and "stage2_loss" not in done["figures"]
    assert not out.exists() and bd._resumable(bd.partial_folder(out), recipe, seed=0, scale=0.001)
    assert not bd._resumable(bd.partial_folder(out), recipe, seed=1, scale=0.001)  # never mixed in
    monkeypatch.setattr(bd, "train", lambda *a: phases.append("again") or real_train(*a))
    figures = bd.build_default(out, recipe, **kwargs)
    assert phases[3:] == ["again"]  # stage 2 only
    assert figures["stage1_loss"] == done["figures"]["stage1_loss"] and "stage2_loss" in figures
    assert figures["build_seconds"] >= done["figures"]["build_seconds"]
    assert read_metadata(out)["build"] == {"complete": True} and not bd.partial_folder(out).exists()
    load_model(out)
