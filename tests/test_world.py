"""The wider toy world (issue 17, item 1): scenes off the grid, any canvas, unambiguous labels."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import numpy as np
import pytest

from model.config import TrainConfig
from model.tasks import NO_OBJECT, position_text, relation_text, size_class
from model.training import train
from tests.model_helpers import tiny_model
from toyworld.world import (
    BACKGROUNDS,
    CLEARANCE,
    SIZE_BANDS,
    WorldRecords,
    WorldSpec,
    make_world_scene,
    world_turns,
)

SPEC = WorldSpec()


def _scenes(n: int, seed: int = 0):
    out = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        scene = make_world_scene(rng, SPEC)
        out.append((scene, *world_turns(scene, rng, SPEC, num_turns=4)))
    return out


@pytest.fixture(scope="module")
def scenes():
    return _scenes(160)


def test_scenes_are_deterministic_per_seed():
    a, b = _scenes(6, seed=3), _scenes(6, seed=3)
    for (sa, ra, ta), (sb, rb, tb) in zip(a, b):
        assert sa.image.tobytes() == sb.image.tobytes() and ra == rb and ta == tb
    assert _scenes(1, seed=4)[0][0].image.tobytes() != a[0][0].image.tobytes()


def test_scenes_cover_the_wider_world_and_keep_size_words_unambiguous(scenes):
    sides, counts, small_big = [], [], 0
    for scene, _, _ in scenes:
        w, h = scene.width, scene.height
        sides += [w, h]
        counts.append(len(scene.objects))
        assert max(w, h) / min(w, h) <= SPEC.max_aspect + 0.02 or max(w, h) <= 224  # grid scenes: 1.6
        for o in scene.objects:
            assert 0 <= o.box[0] < o.box[2] <= w and 0 <= o.box[1] < o.box[3] <= h
            assert o.color != "pink"
            assert size_class(o.box, w, h) == o.size  # the word always matches the drawn size
        if (
            min(w, h) >= 800
            and scene.objects
            and all(max(o.box[2] - o.box[0], o.box[3] - o.box[1]) <= 0.04 * min(w, h) for o in scene.objects)
        ):
            small_big += 1
    assert min(sides) < 160 and max(sides) > 1000
    assert min(counts) <= 2 and max(counts) >= 7
    assert small_big >= 5  # small objects on large canvases
    assert SIZE_BANDS["small"][0] <= 0.015


def test_turns_are_right_about_jittered_boxes_and_empty_regions(scenes):
    kinds = {"no_object": 0, "position": 0, "relation": 0}
    for scene, regions, turns in scenes:
        w, h = scene.width, scene.height
        for r in regions:
            if r.obj is None:
                assert all(  # an empty box touches no object
                    r.box[2] <= o.box[0]
                    or o.box[2] <= r.box[0]
                    or r.box[3] <= o.box[1]
                    or o.box[3] <= r.box[1]
                    for o in scene.objects
                )
                continue
            o = scene.objects[r.obj]
            for got, true, side in zip(r.box, o.box, (o.box[2] - o.box[0], o.box[3] - o.box[1]) * 2):
                assert abs(got - true) <= SPEC.box_jitter * side + 1e-6
        for question, answer in turns:
            refs = [int(t.split(">")[0]) - 1 for t in question.split("<region")[1:]]
            targets = [regions[k].obj for k in refs]
            if answer == NO_OBJECT:
                assert targets == [None]
                kinds["no_object"] += 1
            elif answer in {o.caption for o in scene.objects}:
                assert scene.objects[targets[0]].caption == answer
            elif "part" in question:
                o = scene.objects[targets[0]]
                assert answer == position_text(o.box, w, h)
                cx, cy = (o.box[0] + o.box[2]) / 2 / w, (o.box[1] + o.box[3]) / 2 / h
                assert all(abs(c - e) > CLEARANCE for c in (cx, cy) for e in (1 / 3, 2 / 3))
                kinds["position"] += 1
            elif len(refs) == 2:
                a, b = (scene.objects[t].box for t in targets)
                assert answer == relation_text(a, b, w, h)
                kinds["relation"] += 1
            else:
                o = scene.objects[targets[0]]
                assert answer in (o.color, o.shape, o.size), (question, answer)
    assert all(v >= 10 for v in kinds.values()), kinds


def test_every_background_is_drawn():
    from toyworld.world import canvas

    rng = random.Random(1)
    for kind in BACKGROUNDS:
        image = canvas(rng, 120, 90, kind)
        assert image.size == (120, 90)
    assert len(canvas(rng, 200, 100, "texture").getcolors(1 << 20) or []) > 1000


def test_texture_backgrounds_draw_the_patterns_a_spec_names():
    from toyworld.world import TEXTURES, WorldSpec, canvas, make_world_scene

    def draw(textures):
        return np.asarray(canvas(random.Random(3), 160, 120, "texture", textures), dtype=float)

    images = {t: draw((t,)) for t in TEXTURES}
    assert np.array_equal(np.asarray(canvas(random.Random(3), 160, 120, "texture")), images["diagonal"])
    for a in TEXTURES:  # each pattern is its own picture
        for b in TEXTURES:
            assert a == b or np.abs(images[a] - images[b]).mean() > 1.0, (a, b)
    mixed = {draw(TEXTURES).tobytes() for _ in range(2)}
    assert len(mixed) == 1  # deterministic per seed
    only = WorldSpec(background_weights=(0, 0, 0, 0, 0, 1))
    scenes = [
        make_world_scene(random.Random(5), replace(only, textures=(t,))) for t in ("diagonal", "checks")
    ]
    assert scenes[0].objects == scenes[1].objects and scenes[0].image != scenes[1].image  # a spec's pattern


@pytest.mark.parametrize("textures", ["checks", [], ["check"]])
def test_a_world_names_its_textures(textures):
    with pytest.raises(ValueError, match="textures"):
        WorldSpec(textures=textures)


def test_world_records_train_a_model():
    records = WorldRecords(seed=2, count=16, spec=WorldSpec(max_side=400), num_turns=2)
    rec = records[3]
    assert len(rec["boxes"]) == len(rec["box_labels"]) and rec["conversations"]
    history = train(tiny_model(seed=5), records, TrainConfig(steps=2, batch_size=2, log_every=1))
    assert len(history) >= 1 and all(h["loss"] == h["loss"] for h in history)  # finite


def test_mixed_records_interleave_the_world_at_its_share_and_keep_the_grid_records():
    from toyworld.scenes import SyntheticRecords
    from toyworld.world import MixedRecords

    mixed = MixedRecords(seed=7, count=400, share=0.75, world=WorldSpec(max_side=300), num_turns=2)
    world = [i for i in range(400) if mixed.is_world(i)]
    assert len(world) == 300 and not all(mixed.is_world(i) for i in range(4))  # spread, not a block
    grid = SyntheticRecords(seed=7, count=400, num_turns=2)
    i = next(i for i in range(400) if not mixed.is_world(i))
    assert mixed[i]["id"] == grid[i]["id"] and mixed[i]["conversations"] == grid[i]["conversations"]
    assert mixed[world[0]]["source"] == "synthetic-world" and mixed[world[0]]["id"].startswith("world-")
    assert mixed[world[0]]["conversations"] == mixed[world[0]]["conversations"]  # deterministic
    plain = MixedRecords(seed=7, count=10, share=0.0, num_turns=2)
    assert [plain[k]["id"] for k in range(10)] == [grid[k]["id"] for k in range(10)]
    with pytest.raises(ValueError, match="share"):
        MixedRecords(seed=7, count=10, share=1.5)


def test_world_clip_pairs_name_the_object_and_its_third():
    from model.tasks import POSITION_COLUMNS, POSITION_ROWS
    from toyworld.train_clip import CLIP_WORLD
    from toyworld.world import world_clip_pair

    rng = random.Random(3)
    sizes = set()
    for _ in range(40):
        image, text = world_clip_pair(rng, CLIP_WORLD)
        assert max(image.size) <= CLIP_WORLD.max_side
        if text == NO_OBJECT:
            continue
        caption, where = text.split(" at the ")
        row, col = where.split()
        assert row in POSITION_ROWS and col in POSITION_COLUMNS and "pink" not in caption
        sizes.add(caption.split()[1])
    assert sizes == {"small", "medium", "large"}


def test_world_focal_pairs_show_the_object_as_its_focal_crop():
    from dataclasses import replace

    from toyworld.scenes import COLORS
    from toyworld.train_clip import CLIP_WORLD
    from toyworld.world import make_world_scene, world_focal_pair

    rng, twin = random.Random(5), random.Random(5)
    lone = replace(CLIP_WORLD, min_objects=1, max_objects=1, grid_share=0.0, small_share=0.0)
    jitter, shapes = CLIP_WORLD.box_jitter, set()
    for _ in range(30):
        image, text = world_focal_pair(rng, CLIP_WORLD, 0.3)
        scene = make_world_scene(twin, lone)  # the scene the pair was cut from
        (obj,) = scene.objects
        for _ in range(4):  # the pair's jitter draws, one per box edge
            twin.uniform(0, 1)
        assert text == f"a {obj.color} {obj.shape}" and obj.color != "pink"
        shapes.add(obj.shape)
        # The crop's side is the hand-drawn box's over 0.3 (each edge moved by at most `jitter` of the
        # side), cut to the canvas where the canvas is smaller.
        side = max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1])
        for got, canvas_side in zip(image.size, scene.image.size):
            lo, hi = side * (1 - 2 * jitter) / 0.3, side * (1 + 2 * jitter) / 0.3
            assert min(lo, canvas_side) - 1 <= got <= min(hi, canvas_side) + 1, (got, side, canvas_side)
        pixels = np.asarray(image, dtype=float).reshape(-1, 3)
        near = np.linalg.norm(pixels - COLORS[obj.color], axis=1) < 60
        assert near.any(), text  # the object is in its crop
    assert [world_focal_pair(random.Random(5), CLIP_WORLD, 0.3)[0].tobytes()] == [
        world_focal_pair(random.Random(5), CLIP_WORLD, 0.3)[0].tobytes()
    ]
    assert len(shapes) > 2


# sha256 of the first 16 CLIP pairs (world share 0.5), computed at commit ffec76b, before pairs could
# be focal crops: recipes without `clip.focal_share` keep their vision tower's data.
CLIP_PAIRS_DIGEST = "41e4600a74418d17"


def test_clip_pairs_without_crops_draw_as_before():
    import hashlib

    from toyworld.recipe import load_recipe
    from toyworld.scenes import SceneSpec
    from toyworld.train_clip import CLIP_WORLD, _pair

    rng, digest = random.Random(9), hashlib.sha256()
    for _ in range(16):
        image, text = _pair(rng, SceneSpec(), CLIP_WORLD, 0.5, 0.0, None)
        digest.update(image.tobytes())
        digest.update(text.encode())
    assert digest.hexdigest()[:16] == CLIP_PAIRS_DIGEST
    assert load_recipe("roi-tiny-world-focal-balanced").clip.focal_share == 0.0
    from model.config import load_model_config
    from toyworld.train_clip import train_clip

    with pytest.raises(ValueError, match="focal_fill"):  # refused before any training
        train_clip(load_model_config("roi-test").vision, "unused", focal_share=0.5)


def test_balanced_pairs_make_each_answer_form_equally_likely():
    from toyworld.scenes import answer_forms, balanced_pair

    pairs = [(0, k) for k in range(1, 10)] + [(1, 0)]  # nine of one form, one of another
    groups = answer_forms(pairs, lambda a, b: ("x", "size") if a == 0 else ("x",))
    rng = random.Random(0)
    drawn = [balanced_pair(rng, groups) for _ in range(3000)]
    assert 0.45 < drawn.count((1, 0)) / len(drawn) < 0.55  # the rare form: half, not a tenth
    assert {drawn.count((0, k)) // 100 for k in range(1, 10)} <= {1, 2}  # uniform within a form (~167)
    assert balanced_pair(rng, {}) is None


def _relation_turns(record: dict) -> list[tuple[list[int], str]]:
    """(region indices, answer) of a record's relation turns (the questions naming two regions)."""
    conv = record["conversations"]
    turns = [
        ([int(t) - 1 for t in re.findall(r"<region(\d+)>", q["value"])], a["value"])
        for q, a in zip(conv[::2], conv[1::2])
    ]
    return [(refs, answer) for refs, answer in turns if len(refs) == 2]


def _lone_and_sized(records, n: int) -> tuple[float, float]:
    """Shares of relation answers that are a lone "left of"/"right of", and that name a size."""
    answers = [answer for k in range(n) for _, answer in _relation_turns(records[k])]
    return sum(a in ("left of", "right of") for a in answers) / len(answers), sum(
        "than" in a for a in answers
    ) / len(answers)


def test_each_knob_alone_makes_lone_horizontal_answers_more_common():
    from toyworld.scenes import SyntheticRecords
    from toyworld.world import MixedRecords

    def world(balance: bool, same: float) -> MixedRecords:
        spec = WorldSpec(max_side=300, same_size_share=same, grid_share=0.0)
        return MixedRecords(seed=3, count=250, share=1.0, world=spec, num_turns=8, balance_relations=balance)

    natural = _lone_and_sized(world(False, 0.0), 250)
    assert _lone_and_sized(world(True, 0.0), 250)[0] > 1.2 * natural[0]  # balancing alone
    same_sizes = _lone_and_sized(world(False, 0.3), 250)
    assert same_sizes[0] > 1.2 * natural[0] and same_sizes[1] < natural[1]  # equal sizes alone
    grid = [
        _lone_and_sized(SyntheticRecords(seed=3, count=250, num_turns=8, balance_relations=b), 250)
        for b in (0, 1)
    ]
    assert grid[1][0] > grid[0][0]  # the generator's scenes balance too


def test_balanced_world_turns_answer_the_truth_of_the_regions_they_name():
    for i in range(120):
        rng = random.Random(i)
        scene = make_world_scene(rng, WorldSpec(same_size_share=0.5, max_side=400))
        regions, turns = world_turns(scene, rng, WorldSpec(), num_turns=8, balance_relations=True)
        for question, answer in turns:
            refs = [int(t) - 1 for t in re.findall(r"<region(\d+)>", question)]
            if len(refs) == 2:
                a, b = (scene.objects[regions[k].obj].box for k in refs)  # the object a jittered region holds
                assert answer == relation_text(a, b, scene.width, scene.height)


def test_same_size_scenes_draw_one_size_word():
    spec = WorldSpec(same_size_share=1.0)
    for i in range(30):
        scene = make_world_scene(random.Random(i), spec)
        assert len({o.size for o in scene.objects}) <= 1


# sha256 of the first 12 training records (image bytes, boxes, conversations), computed at commit
# 475fa32, before relation balancing and same-size scenes: recipes that leave them off keep their data
# (a fine-tuning job replays its lineage's recipe records).
RECORD_DIGESTS = {"roi-tiny-default": "dd0dbcb06248fc1e", "roi-tiny-world": "1dc1ead579173fdf"}


@pytest.mark.parametrize("name", sorted(RECORD_DIGESTS))
def test_recipes_without_the_new_knobs_keep_their_records(name):
    import hashlib
    import json

    from toyworld.recipe import load_recipe, training_records

    records, digest = training_records(load_recipe(name)), hashlib.sha256()
    for i in range(12):
        record = records[i]
        digest.update(record["image"].tobytes())
        digest.update(json.dumps([record["boxes"], record["conversations"]]).encode())
    assert digest.hexdigest()[:16] == RECORD_DIGESTS[name]


def test_a_recipe_world_key_is_checked_when_the_recipe_loads():
    from toyworld.recipe import BuildRecipe
    from toyworld.train_clip import CLIP_WORLD

    clip = BuildRecipe.from_dict({"clip": {"world": {"textures": ["checks"]}}}).clip.world_spec()
    assert list(clip.textures) == ["checks"] and clip.max_side == CLIP_WORLD.max_side  # over CLIP's world
    with pytest.raises(ValueError, match="unknown config keys"):
        BuildRecipe.from_dict({"clip": {"world": {"texture": ["checks"]}}})

    assert BuildRecipe.from_dict({"world": {"same_size_share": 0.3}}).world_spec().same_size_share == 0.3
    with pytest.raises(ValueError, match="unknown config keys"):
        BuildRecipe.from_dict({"world": {"same_size_shares": 0.3}})


def test_a_null_recipe_section_is_refused_when_the_recipe_loads():
    from model.config import ModelConfig
    from toyworld.recipe import BuildRecipe

    for section in ("clip", "stage2"):
        with pytest.raises(ValueError, match="expected a JSON object, got NoneType"):
            BuildRecipe.from_dict({section: None})
    with pytest.raises(ValueError, match="expected a JSON object, got NoneType"):
        ModelConfig.from_dict({"region": None})
    assert ModelConfig.from_dict({"lm": {"lora": None}}).lm.lora is None  # optional dicts stay optional
