"""Placeholder merge, geometry, freeze policy, training smoke test."""

from __future__ import annotations

import re

import pytest
import torch
from torchvision.ops import roi_align

from model.config import TrainConfig
from model.data.dataset import RecordDataset, collate_samples
from model.geometry import (
    BoxError,
    boxes_tensor,
    check_pixel_box,
    input_to_feature_scale,
    normalized_to_input,
    normalized_to_pixels,
    percent_to_pixels,
    pixels_to_normalized,
    pixels_to_percent,
)
from model.mllm import PlaceholderError
from model.prompt import BBOX, IGNORE_INDEX, PromptError, expand_regions
from model.training import TrainOptions, train
from tests.model_helpers import tiny_model, tiny_records

# ---------------------------------------------------------------- placeholder merge


def test_expand_regions_order_and_text():
    text, order = expand_regions("Is <region2> left of <region1>? And <region2>?", num_boxes=2)
    assert text == f"Is region2 {BBOX} left of region1 {BBOX}? And region2 {BBOX}?"
    assert order == [1, 0, 1]
    with pytest.raises(PromptError, match="region3"):
        expand_regions("<region3>", num_boxes=2)
    with pytest.raises(PromptError, match="<regionN>"):
        expand_regions(f"raw {BBOX}")


def test_region_features_replace_bbox_embeddings_in_order():
    m = tiny_model()
    rec = tiny_records(1)[0]
    boxes = boxes_tensor(rec["boxes"], rec["width"], rec["height"])
    enc = m.prompts.encode_question("Compare <region2> with <region1>.", num_boxes=len(boxes))
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        vision = m.encode_images(m.processor(rec["image"]).unsqueeze(0))
        feats = m.region_features(vision, [boxes])
        embeds = m.embed_prompts(ids, vision, feats, [0], [enc.region_order])
    pos = (ids[0] == m.bbox_id).nonzero()[:, 0]
    assert len(pos) == 2
    assert torch.allclose(embeds[0, pos[0]], feats[0][1])
    assert torch.allclose(embeds[0, pos[1]], feats[0][0])
    patch = (ids[0] == m.image_patch_id).nonzero()[:, 0]
    assert torch.allclose(embeds[0, patch], m.projector(vision.image_tokens)[0])
    text = m.lm.get_input_embeddings()(ids)
    other = (ids[0] != m.bbox_id) & (ids[0] != m.image_patch_id)
    assert torch.equal(embeds[0, other], text[0, other])


def test_placeholder_count_mismatch_raises_clear_error():
    m = tiny_model()
    rec = tiny_records(1)[0]
    boxes = boxes_tensor(rec["boxes"], rec["width"], rec["height"])
    enc = m.prompts.encode_question("What is <region1>?", num_boxes=len(boxes))
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        vision = m.encode_images(m.processor(rec["image"]).unsqueeze(0))
        feats = m.region_features(vision, [boxes])
        with pytest.raises(PlaceholderError, match="1 region placeholder tokens but 2 region features"):
            m.embed_prompts(ids, vision, feats, [0], [[0, 1]])
        with pytest.raises(PlaceholderError, match="refers to region 9"):
            m.embed_prompts(ids, vision, feats, [0], [[8]])
        first_patch = int((ids[0] == m.image_patch_id).nonzero()[0, 0])
        cut = ids[:, : first_patch + 3]  # only 3 of the image's patch tokens remain
        with pytest.raises(PlaceholderError, match="3 image placeholder tokens but 16 image features"):
            m.embed_prompts(cut, vision, feats, [0], [[]])
        # The engine's question embeddings go through the same check and merge.
        question = torch.tensor([m.prompts.question_ids("What is <region1>?", True, len(boxes))[0]])
        with pytest.raises(PlaceholderError, match=r"prompt 0 refers to region 9 but its image has \d+"):
            m.embed_questions(question, feats, [0], [[8]])
        with pytest.raises(PlaceholderError, match="1 region placeholder tokens but 2 region features"):
            m.embed_questions(question, feats, [0], [[0, 1]])


def test_loss_only_on_answer_tokens():
    m = tiny_model()
    enc = m.prompts.encode_conversation([("What is <region1>?", "a small red circle")], num_boxes=1)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert trained[-1] == m.tokenizer.eos_token_id
    assert m.tokenizer.decode(trained[:-1]).strip() == "a small red circle"


# ---------------------------------------------------------------- geometry


def test_geometry_round_trip_non_square():
    w, h = 320, 180
    px = percent_to_pixels(10.0, 20.0, 30.0, 50.0, w, h)
    assert px == pytest.approx((32.0, 36.0, 128.0, 126.0))
    assert pixels_to_percent(px, w, h) == pytest.approx({"x": 10.0, "y": 20.0, "width": 30.0, "height": 50.0})
    norm = pixels_to_normalized(px, w, h)
    assert norm == pytest.approx((0.1, 0.2, 0.4, 0.7))
    assert normalized_to_pixels(norm, w, h) == pytest.approx(px)
    inp = normalized_to_input(torch.tensor([norm]), 112)
    assert inp[0].tolist() == pytest.approx([11.2, 22.4, 44.8, 78.4], abs=1e-4)
    assert input_to_feature_scale(8, 112) == pytest.approx(1 / 14)


def test_roi_align_reads_the_box_region_of_a_squashed_non_square_image():
    """A feature map whose value is the x (or y) coordinate: pooling a box returns its centre."""
    w, h, size, fmap_side = 300, 150, 112, 16
    box_px = (60.0, 30.0, 150.0, 120.0)  # centre (105, 75) -> normalised (0.35, 0.5)
    boxes = boxes_tensor([box_px], w, h)
    coords = (torch.arange(fmap_side, dtype=torch.float32) + 0.5) / fmap_side  # normalised cell centres
    xmap = coords.view(1, 1, 1, -1).expand(1, 1, fmap_side, fmap_side)
    ymap = coords.view(1, 1, -1, 1).expand(1, 1, fmap_side, fmap_side)
    fmap = torch.cat([xmap, ymap], dim=1).contiguous()
    rois = [normalized_to_input(boxes, size)]
    out = roi_align(fmap, rois, 4, spatial_scale=input_to_feature_scale(fmap_side, size), aligned=True)
    cx, cy = out[0, 0].mean().item(), out[0, 1].mean().item()
    assert cx == pytest.approx(105 / w, abs=0.01)
    assert cy == pytest.approx(75 / h, abs=0.01)


@pytest.mark.parametrize(
    "box,match",
    [
        ((float("nan"), 0, 10, 10), "NaN"),
        ((10, 10, 10, 20), "zero or negative area"),
        ((500, 500, 600, 600), "outside"),
        ((1, 2, 3), "4 numbers"),
    ],
)
def test_bad_boxes_raise(box, match):
    with pytest.raises(BoxError, match=match):
        check_pixel_box(box, 320, 180)


def test_overhanging_box_is_clipped():
    assert check_pixel_box((-10, -5, 50, 400), 320, 180) == (0.0, 0.0, 50.0, 180.0)


# ---------------------------------------------------------------- freeze policy


def _grads_after_step(stage: int) -> tuple[set[str], set[str]]:
    m = tiny_model()
    m.set_stage(stage)
    ds = RecordDataset(tiny_records(4), m)
    batch = collate_samples(m, [ds[i] for i in range(4)])
    m.train()
    m(**batch).loss.backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    return with_grad, trainable


def test_stage1_trains_region_encoder_only():
    with_grad, trainable = _grads_after_step(1)
    assert trainable and all(n.startswith("region_encoder.") for n in trainable)
    assert with_grad == trainable


def test_stage2_trains_region_encoder_projector_and_lm_never_vision():
    with_grad, trainable = _grads_after_step(2)
    prefixes = {n.split(".")[0] for n in trainable}
    assert prefixes == {"region_encoder", "projector", "lm"}
    assert not any(n.startswith("vision.") for n in with_grad)
    assert any(n.startswith("projector.") for n in with_grad)
    assert any(n.startswith("lm.") for n in with_grad)
    # Every trainable parameter but unused embedding rows' owners receives a gradient.
    assert {n for n in trainable if not n.startswith("lm.")} <= with_grad


def test_stage2_freeze_keeps_named_modules_unchanged_through_training():
    """``TrainConfig.freeze`` (a job holding the region encoder): those weights and the region
    encoder's box-norm statistics do not move, the rest does."""
    import dataclasses

    from model.checkpoint import build_model
    from model.config import load_model_config
    from tests.model_helpers import tiny_tokenizer

    cfg = load_model_config("roi-test")
    cfg = dataclasses.replace(cfg, region=dataclasses.replace(cfg.region, feature_norm="batch"))
    torch.manual_seed(0)
    m = build_model(cfg, tiny_tokenizer())
    before = {n: t.detach().clone() for n, t in [*m.named_parameters(), *m.named_buffers()]}
    assert any(n.startswith("region_encoder.") and "running_mean" in n for n, _ in m.named_buffers())
    train_cfg = TrainConfig(
        stage=2, steps=3, batch_size=4, lr=3e-3, warmup_steps=1, seed=0, freeze=["region_encoder"]
    )
    train(m, tiny_records(8), train_cfg, TrainOptions(show_bar=False))
    after = [*m.named_parameters(), *m.named_buffers()]
    moved = {n.split(".")[0] for n, t in after if n in before and not torch.equal(t, before[n])}
    assert moved == {"projector", "lm"}


def test_train_config_refuses_a_freeze_it_cannot_honour():
    """Checked when the config is made (a recipe or train_config.json fails when loaded)."""
    with pytest.raises(ValueError, match="stage 1"):
        TrainConfig(stage=1, freeze=["projector"])
    with pytest.raises(ValueError, match="region_aux_weight"):
        TrainConfig(freeze=["region_encoder"], region_aux_weight=1.0)
    with pytest.raises(ValueError, match=re.escape("cannot freeze ['vision']")):
        TrainConfig.from_dict({"freeze": ["vision"]})
    m = tiny_model()
    m.set_stage(2, (name for name in ["region_encoder"]))  # any iterable, read once
    assert not any(p.requires_grad for p in m.region_encoder.parameters())
    assert all(p.requires_grad for p in m.projector.parameters())


@pytest.mark.parametrize(
    ("stage", "frozen", "message"),
    [(2, ["vision"], "cannot freeze ['vision']"), (1, ["projector"], "stage 1"),
     (2, ["region_encoder", "projector", "lm"], "nothing would be trained")],
)  # fmt: skip
def test_set_stage_refuses_a_freeze_it_cannot_honour(stage: int, frozen: list[str], message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_model().set_stage(stage, frozen)


def test_vision_tower_stays_in_eval_mode():
    m = tiny_model()
    m.train()
    assert not m.vision.training and not m.vision.visual.training


# ---------------------------------------------------------------- training smoke test


def test_training_loss_falls():
    m = tiny_model()
    cfg = TrainConfig(stage=2, steps=40, batch_size=8, lr=3e-3, warmup_steps=5, seed=0, log_every=10)
    seen: list[dict] = []
    hist = train(m, tiny_records(64), cfg, TrainOptions(progress=seen.append, show_bar=False))
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert [s["step"] for s in seen] == [10, 20, 30, 40]
    assert {"loss", "lr", "eta_s", "steps"} <= set(seen[0])


def test_fourier_box_features_feed_the_box_mlp():
    """``pos_fourier_bands`` adds sin/cos of every box coordinate; the region token changes with the
    box position even where the image is blank."""
    from model.region_encoder import RegionFeatureExtractor
    from tests.model_helpers import tiny_region_config

    extractor = RegionFeatureExtractor(tiny_region_config(pos_fourier_bands=3), input_size=32)
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.6, 0.2, 0.8, 0.4]])
    feats = extractor.box_features(boxes)
    assert feats.shape == (2, 4 * (1 + 2 * 3))
    assert torch.equal(feats[:, :4], boxes)
    sines = feats[0, 4:16].view(4, 3)  # per coordinate, bands 1..3
    assert torch.allclose(sines, torch.sin(torch.pi * boxes[0][:, None] * torch.tensor([1.0, 2.0, 3.0])))
    tokens = extractor([torch.zeros(1, 8, 8, 8)], [boxes])
    assert tokens.shape == (2, 16)
    assert not torch.allclose(tokens[0], tokens[1])


def test_train_cli_freeze_keeps_those_weights_and_records_it(tiny_checkpoint, tmp_path):
    """``python -m model.train --freeze``: the named modules of the output are the --init's, bit
    for bit, the rest trained; train_config.json records what was held."""
    import json

    from PIL import Image
    from safetensors.torch import load_file

    from model.checkpoint import read_train_config
    from model.train import main as train_main

    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(image)
    record = {"image": "img.png", "width": 64, "height": 48, "boxes": [[4, 4, 40, 40]],
              "conversations": [{"from": "human", "value": "What is <region1>?"},
                                {"from": "gpt", "value": "a red square"}],
              "id": "r1", "source": "labelstudio"}  # fmt: skip
    (tmp_path / "data.jsonl").write_text((json.dumps(record) + "\n") * 2)
    out = tmp_path / "tuned"
    args = ["--init", str(tiny_checkpoint), "--data", str(tmp_path / "data.jsonl"), "--steps", "2",
            "--batch-size", "2", "--lr", "1e-2", "--out", str(out),
            "--freeze", "region_encoder", "lm"]  # fmt: skip
    assert train_main(args) == 0
    before, after = load_file(tiny_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"projector"}
    assert read_train_config(out).freeze == ["region_encoder", "lm"]
    with pytest.raises(SystemExit) as refused:  # refused before any model is loaded
        train_main([*args[:-3], "--stage", "1", "--freeze", "lm"])
    assert refused.value.code == 2
