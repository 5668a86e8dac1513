"""Focal encode of small boxes (issue 17, item 2): a crop around a box a few input pixels wide is
encoded like an image; the box's token is pooled there and embedded as the original box."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from model.config import RegionEncoderConfig
from model.geometry import boxes_tensor, focal_crop, normalized_to_pixels
from model.inference.engine import InferenceEngine
from model.inference.image_input import EncodedImage
from tests.model_helpers import png_bytes, tiny_model


@pytest.mark.parametrize("w,h", [(1500, 1000), (400, 1200), (100, 80)])
def test_focal_crop_is_a_square_around_the_box_inside_the_image(w, h):
    rng = random.Random(w)
    for _ in range(200):
        side = rng.uniform(2, 60)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        box = (x0, y0, x0 + side, y0 + side * rng.uniform(0.5, 1.0))
        crop, inside = focal_crop(box, w, h, fill=0.12)
        assert 0 <= crop[0] <= crop[2] <= w + 1e-6 and 0 <= crop[1] <= crop[3] <= h + 1e-6
        cw, ch = crop[2] - crop[0], crop[3] - crop[1]
        assert cw == pytest.approx(min(w, side / 0.12)) and ch == pytest.approx(min(h, side / 0.12))
        back = normalized_to_pixels(inside, cw, ch)
        assert back == pytest.approx((box[0] - crop[0], box[1] - crop[1], box[2] - crop[0], box[3] - crop[1]))
        assert all(-1e-9 <= v <= 1 + 1e-9 for v in inside)


def test_focal_config_is_checked_and_off_by_default():
    assert RegionEncoderConfig().focal_below == 0.0
    with pytest.raises(ValueError, match="focal"):
        RegionEncoderConfig(focal_fill=0.0)
    with pytest.raises(ValueError, match="focal"):
        RegionEncoderConfig(focal_below=1.5)


def _scene() -> tuple[Image.Image, list[tuple[float, float, float, float]]]:
    image = Image.new("RGB", (1200, 900), (210, 210, 210))
    image.paste((200, 30, 30), (600, 450, 624, 474))  # a 2 % object
    image.paste((30, 30, 200), (100, 100, 500, 400))  # a large one
    return image, [(600, 450, 624, 474), (100, 100, 500, 400)]


def test_a_small_box_is_pooled_from_its_crop_and_embedded_as_itself():
    model = tiny_model(seed=4)
    image, boxes = _scene()
    norm = boxes_tensor(boxes, *image.size)
    plain = InferenceEngine(model, "plain").region_tokens([image], [norm])[0]
    model.cfg.region.focal_below = 0.05
    try:
        engine = InferenceEngine(model, "focal")
        focal = engine.region_tokens([image], [norm])[0]
        # The file path (an encoded image, decoded for the crop) gives the same tokens.
        from_file = engine.region_tokens([EncodedImage(png_bytes(image))], [norm])[0]
        crop, inside = focal_crop(boxes[0], *image.size, fill=model.cfg.region.focal_fill)
        frame = torch.tensor([[crop[0] / 1200, crop[1] / 900, crop[2] / 1200, crop[3] / 900]])
        with torch.inference_mode():
            pixels = model.processor.batch([image.crop(crop)])
            maps = model.region_encoder.fuse(model.cast_levels(model.encode_images(pixels)), frame)
            expected = model.region_encoder.encode_boxes(maps, [torch.tensor([inside])], None, [norm[:1]])[0]
            shifted = model.region_encoder.encode_boxes(maps, [torch.tensor([inside])])[0]
    finally:
        model.cfg.region.focal_below = 0.0
    assert torch.allclose(focal[0], expected, atol=1e-5)
    assert not torch.allclose(focal[0], plain[0], atol=1e-3)  # the crop, not the whole image
    assert not torch.allclose(expected, shifted, atol=1e-3)  # the box embedding is the original box's
    assert torch.allclose(focal[1], plain[1], atol=1e-6)  # a large box: unchanged
    assert torch.allclose(from_file, focal, atol=1e-5)


def test_small_is_measured_in_pixels_against_the_image_s_longer_side():
    from model.config import RegionEncoderConfig
    from model.focal import small_boxes

    cfg = RegionEncoderConfig(focal_below=0.06)

    def small(box: tuple[float, float, float, float], w: int, h: int) -> bool:
        return small_boxes(boxes_tensor([box], w, h), (w, h), cfg) == [0]

    assert small((100, 100, 150, 150), 1000, 1000) and not small((100, 100, 170, 150), 1000, 1000)
    # A 10-px circle on a 3,000 x 40 strip is 25 % of the height but a speck in the model input.
    assert small((1500, 15, 1510, 25), 3000, 40)
    assert small((700, 100, 730, 130), 1500, 300)  # 2 % of the width, 10 % of the height
    assert not small((700, 20, 720, 280), 1500, 300)  # a pole: a crop cannot enlarge it
    off = RegionEncoderConfig()
    assert small_boxes(boxes_tensor([(1500, 15, 1510, 25)], 3000, 40), (3000, 40), off) == []


def test_a_crop_carries_the_coordinates_of_its_pixels_in_the_whole_image():
    from model.region_encoder import _coord_channels

    maps = torch.zeros(2, 1, 5, 9)
    whole = _coord_channels(maps)
    assert torch.equal(_coord_channels(maps, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)), whole)
    # The right half of the top 40 %: x from 0 to 1, y from -1 to -0.2, per map.
    framed = _coord_channels(maps, torch.tensor([[0.5, 0.0, 1.0, 0.4], [0.0, 0.0, 1.0, 1.0]]))
    assert torch.allclose(framed[0, 1, 0], torch.linspace(0, 1, 9))
    assert torch.allclose(framed[0, 2, :, 0], torch.linspace(-1, -0.2, 5))
    assert torch.equal(framed[1], whole[1])


def test_a_masked_small_box_is_read_from_its_crop_with_its_mask():
    """A brush region on a small object gets its crop like any small box (a model trained with a
    crop per box reads nothing else well), pooled with the mask's RoI-grid weights."""
    model = tiny_model(seed=4)
    image, boxes = _scene()
    norm = boxes_tensor(boxes, *image.size)
    covering = torch.zeros(900, 1200, dtype=torch.bool)
    covering[450:474, 600:624] = True  # the whole box: weights 1 everywhere
    partial = torch.zeros(900, 1200, dtype=torch.bool)
    partial[455:470, 605:620] = True
    model.cfg.region.focal_below = 0.05
    try:
        engine = InferenceEngine(model, "b")
        plain = engine.region_tokens([image], [norm])[0]
        covered = engine.region_tokens([image], [norm], [[covering, None]])[0]
        masked = engine.region_tokens([image], [norm], [[partial, None]])[0]
        answers = engine.answer([image], [norm], [(0, "What is <region1>?")], masks=[[partial, None]])
    finally:
        model.cfg.region.focal_below = 0.0
    image_pooled = InferenceEngine(model, "a").region_tokens([image], [norm], [[covering, None]])[0]
    # Pooled in the same crop as the unmasked box, so a mask covering the box changes nothing...
    assert torch.allclose(covered, plain, atol=1e-5)
    assert not torch.allclose(covered[0], image_pooled[0], atol=1e-3)  # ...and it is the crop's
    assert not torch.allclose(masked[0], plain[0], atol=1e-4)  # a partial mask weighs the bins
    assert torch.allclose(masked[1], plain[1], atol=1e-5)  # other boxes untouched
    assert len(answers) == 1 and 0.0 <= answers[0].score <= 1.0


def test_training_reads_small_boxes_from_the_same_crops_the_engine_pools():
    from model.config import TrainConfig
    from model.data.dataset import RecordDataset, collate_samples
    from model.training import train

    model = tiny_model(seed=6)
    image, boxes = _scene()
    record = {"image": image, "width": 1200, "height": 900, "boxes": [list(b) for b in boxes],
              "conversations": [{"from": "human", "value": "What is <region1>?"},
                                {"from": "gpt", "value": "a small red square"}]}  # fmt: skip
    model.cfg.region.focal_below = 0.05
    try:
        sample = RecordDataset([record], model)[0]
        assert sample.focal is not None and sample.focal.rows == [0]
        batch = collate_samples(model, [sample])
        model.eval()
        with torch.inference_mode():
            vision = model.encode_images(batch["pixels"])
            trained_view = model.region_features(vision, batch["boxes"], batch["focal"])[0]
        served = InferenceEngine(model, "focal").region_tokens([image], [boxes_tensor(boxes, 1200, 900)])[0]
        assert torch.allclose(trained_view, served, atol=1e-5)
        history = train(
            model, [record] * 4, TrainConfig(steps=2, batch_size=2, log_every=1, region_aux_weight=0)
        )
        assert all(h["loss"] == h["loss"] for h in history)
        # A run may keep crops to inference only: its dataset pools every box from the image.
        assert RecordDataset([record], model, focal=False)[0].focal is None
        off = TrainConfig.from_dict({"steps": 1, "batch_size": 1, "focal_crops": False})
        assert train(model, [record], off)[0]["loss"] > 0
    finally:
        model.cfg.region.focal_below = 0.0
    assert RecordDataset([record], model)[0].focal is None  # off: no crops


def test_keep_image_merges_the_crop_token_with_the_image_token_the_same_in_training_and_serving():
    from model.data.dataset import RecordDataset, collate_samples

    model = tiny_model(seed=7)
    image, boxes = _scene()
    norm = boxes_tensor(boxes, *image.size)
    record = {"image": image, "width": 1200, "height": 900, "boxes": [list(b) for b in boxes],
              "conversations": [{"from": "human", "value": "What is <region1>?"},
                                {"from": "gpt", "value": "a small red square"}]}  # fmt: skip
    model.eval()
    plain = InferenceEngine(model, "plain").region_tokens([image], [norm])[0]
    model.cfg.region.focal_below = 0.05
    try:
        crop_only = InferenceEngine(model, "crop").region_tokens([image], [norm])[0]
        model.cfg.region.focal_keep_image = True
        served = InferenceEngine(model, "both").region_tokens([image], [norm])[0]
        batch = collate_samples(model, [RecordDataset([record], model)[0]])
        with torch.inference_mode():
            vision = model.encode_images(batch["pixels"])
            trained_view = model.region_features(vision, batch["boxes"], batch["focal"])[0]
    finally:
        model.cfg.region.focal_below, model.cfg.region.focal_keep_image = 0.0, False
    assert torch.allclose(served[0], (plain[0] + crop_only[0]) / 2, atol=1e-5)  # the small box
    assert torch.allclose(served[1], plain[1], atol=1e-6)  # a large box: its image's token
    assert torch.allclose(trained_view, served, atol=1e-5)
