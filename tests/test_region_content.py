"""The region token must carry the box's content: feature-norm choices and the auxiliary heads."""

from __future__ import annotations

import pytest
import torch

from model.config import RegionEncoderConfig, TrainConfig
from model.region_encoder import BoxBatchNorm, RegionFeatureExtractor
from model.training import TrainOptions, train
from model.training.aux_heads import RegionAttributeHeads
from tests.model_helpers import tiny_model, tiny_records, tiny_region_config


def test_feature_norm_names_and_old_boolean_configs():
    assert RegionEncoderConfig(feature_norm=True).feature_norm == "layer"  # type: ignore[arg-type]
    assert RegionEncoderConfig(feature_norm=False).feature_norm == "none"  # type: ignore[arg-type]
    assert RegionEncoderConfig(feature_norm="batch").feature_norm == "batch"
    with pytest.raises(ValueError, match="feature_norm"):
        RegionEncoderConfig(feature_norm="group")


def test_layer_norm_erases_the_scale_of_the_pooled_features_batch_norm_keeps_it():
    """Two boxes whose pooled features differ only in scale (a brighter object): a per-box
    LayerNorm maps them to the same vector, the batch norm keeps them apart."""
    pooled = torch.randn(1, 16) * torch.tensor([[1.0], [3.0]])
    layer = RegionFeatureExtractor(tiny_region_config(feature_norm="layer"), input_size=32).feature_norm
    batch = RegionFeatureExtractor(
        tiny_region_config(feature_norm="batch"), input_size=32
    ).feature_norm.train()
    assert torch.allclose(layer(pooled)[0], layer(pooled)[1], atol=1e-4)
    assert not torch.allclose(batch(pooled)[0], batch(pooled)[1], atol=1e-2)


def test_box_batch_norm_trains_on_a_single_box_with_its_running_statistics():
    norm = BoxBatchNorm(4).train()
    with torch.no_grad():
        norm.running_mean.fill_(1.0)
        norm.running_var.fill_(4.0)
    x = torch.full((1, 4), 3.0, requires_grad=True)
    y = norm(x)
    assert torch.allclose(y, torch.full((1, 4), 1.0), atol=1e-3)  # (3 - 1) / sqrt(4)
    y.sum().backward()
    assert norm.weight.grad is not None
    many = norm(torch.randn(5, 4))  # two or more boxes: ordinary batch statistics
    assert torch.allclose(many.mean(0), torch.zeros(4), atol=1e-5)


def test_attribute_heads_loss_uses_labelled_images_only_and_checks_counts():
    heads = RegionAttributeHeads(16)
    tokens = torch.randn(5, 16)
    labels = [[{"color": "red", "shape": "circle", "size": "small"}] * 2, None, [{"color": "blue"}]]
    loss = heads.loss(tokens, labels, [2, 2, 1])
    assert loss is not None and loss.ndim == 0 and loss > 0
    assert heads.loss(tokens, [None, None], [3, 2]) is None
    with pytest.raises(ValueError, match="region tokens"):
        heads.loss(tokens, labels, [2, 2, 2])
    with pytest.raises(ValueError, match="box labels"):
        heads.loss(tokens, [[{"color": "red"}], None, [{"color": "red"}]], [2, 2, 1])


def test_position_heads_ask_the_column_and_row_of_every_labelled_box():
    from model.training.aux_heads import with_positions

    boxes = [torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.5, 0.7, 0.9, 0.9]]), torch.tensor([[0.4, 0.4, 0.6, 0.6]])]
    labels = with_positions([[{"color": "red"}, {}], None], boxes)
    assert labels == [
        [{"color": "red", "row": "top", "column": "left"}, {"row": "bottom", "column": "right"}],
        None,
    ]
    heads = RegionAttributeHeads(16, position=True)
    assert set(heads.vocab) == {"color", "shape", "size", "column", "row"}
    assert heads.loss(torch.randn(3, 16), labels, [2, 1]) > 0
    assert "column" not in RegionAttributeHeads(16).vocab  # off unless asked
    cfg = TrainConfig(steps=2, batch_size=2, region_aux_weight=1.0, region_aux_position=True)
    assert all(h["loss"] > 0 for h in train(tiny_model(), tiny_records(4), cfg, TrainOptions(show_bar=False)))


def test_synthetic_records_carry_box_labels_matching_their_captions():
    rec = tiny_records(1)[0]
    assert len(rec["box_labels"]) == len(rec["boxes"])
    assert set(rec["box_labels"][0]) == {"color", "shape", "size"}


def test_training_with_the_auxiliary_loss_puts_colour_into_the_region_token():
    """With ``region_aux_weight`` the region tokens of the tiny model become linearly readable for
    colour; the heads are not part of the model afterwards (checkpoint layout unchanged)."""
    m = tiny_model()
    keys = set(m.state_dict())
    hooks = len(m.region_encoder._forward_hooks)
    cfg = TrainConfig(stage=1, steps=60, batch_size=8, lr=5e-3, warmup_steps=5, seed=0, region_aux_weight=1.0)
    hist = train(m, tiny_records(64), cfg, TrainOptions(show_bar=False, separate_turns=True))
    assert set(m.state_dict()) == keys
    assert len(m.region_encoder._forward_hooks) == hooks
    assert all(h["loss"] == h["loss"] for h in hist)
    # A fresh linear probe on held-out boxes reads the colour well above chance (1/6).
    records = tiny_records(96, seed=9)
    tokens, colours = [], []
    with torch.no_grad():
        for rec in records:
            pixels = m.processor.batch([rec["image"]])
            from model.geometry import boxes_tensor

            boxes = boxes_tensor(rec["boxes"], rec["width"], rec["height"])
            tokens.append(m.region_features(m.encode_images(pixels), [boxes])[0])
            colours += [b["color"] for b in rec["box_labels"]]
    x = torch.cat(tokens)
    names = sorted(set(colours))
    y = torch.tensor([names.index(c) for c in colours])
    cut = int(len(y) * 0.7)
    heads = torch.nn.Linear(x.shape[1], len(names))
    opt = torch.optim.Adam(heads.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(heads(x[:cut]), y[:cut]).backward()
        opt.step()
    accuracy = (heads(x[cut:]).argmax(1) == y[cut:]).float().mean().item()
    assert accuracy > 0.5, accuracy


def test_fine_tuning_keeps_the_batch_norm_statistics_when_asked():
    """``update_norm_stats=False`` (what fine-tuning jobs use): the running statistics of the box
    norm stay the parent's while its affine part trains; the default build updates them."""
    from model.checkpoint import build_model
    from model.config import load_model_config
    from tests.model_helpers import tiny_tokenizer

    cfg = load_model_config("roi-test")
    cfg.region.feature_norm = "batch"
    for update in (False, True):
        torch.manual_seed(0)
        m = build_model(cfg, tiny_tokenizer())
        norm = m.region_encoder.roi_align.feature_norm
        assert isinstance(norm, BoxBatchNorm)
        mean, weight = norm.running_mean.clone(), norm.weight.detach().clone()
        tcfg = TrainConfig(stage=2, steps=3, batch_size=4, lr=1e-2, warmup_steps=1, update_norm_stats=update)
        train(m, tiny_records(8), tcfg, TrainOptions(show_bar=False))
        assert torch.equal(norm.running_mean, mean) != update
        assert not torch.equal(norm.weight.detach(), weight)
        assert not norm.frozen_stats  # restored after training


def test_grouped_roi_align_and_stacked_conv_equal_one_pass_per_level():
    """The extractor pools same-size levels in one RoIAlign call and runs the per-level convs as one
    conv over stacked channels; the result must be the per-level sum GPT4RoI describes."""
    from torchvision.ops import roi_align

    from model.geometry import input_to_feature_scale, normalized_to_input

    torch.manual_seed(0)
    cfg = tiny_region_config(level_sizes=[8, 4, 8, 4], feature_norm="none")
    ex = RegionFeatureExtractor(cfg, input_size=32).eval()
    feats = [torch.randn(2, cfg.fuse_channels, s, s) for s in cfg.level_sizes]
    boxes = [torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.3, 0.3, 0.5, 0.9]])]
    rois = [normalized_to_input(b, 32) for b in boxes]
    summed = sum(
        ex.pconvs[lvl](
            roi_align(
                fmap,
                rois,
                output_size=cfg.roi_output_size,
                spatial_scale=input_to_feature_scale(fmap.shape[-1], 32),
                sampling_ratio=cfg.sampling_ratio,
                aligned=True,
            )
        )
        for lvl, fmap in enumerate(feats)
    )
    expected = ex.flatten_linear(torch.relu(summed).flatten(1)) + ex.pos_embedd(
        ex.box_features(torch.cat(boxes))
    )
    with torch.no_grad():
        torch.testing.assert_close(ex(feats, boxes), expected.detach(), rtol=1e-5, atol=1e-5)


def test_stacked_conv_copy_follows_weight_updates_and_training_uses_the_live_weights():
    """Outside autograd the extractor runs on a kept stacked copy of its per-level convs; an
    in-place update (a training step) must show in the next inference, and with autograd on the
    gradients must reach every level's conv."""
    import copy

    torch.manual_seed(0)
    cfg = tiny_region_config(level_sizes=[8, 4, 8, 4], feature_norm="none")
    ex = RegionFeatureExtractor(cfg, input_size=32).eval()
    feats = [torch.randn(1, cfg.fuse_channels, s, s) for s in cfg.level_sizes]
    boxes = [torch.tensor([[0.1, 0.2, 0.6, 0.7]])]
    with torch.no_grad():
        before = ex(feats, boxes)
        ex.pconvs[2].weight.add_(0.05 * torch.randn_like(ex.pconvs[2].weight))
        after = ex(feats, boxes)
        fresh = copy.deepcopy(ex)(feats, boxes)  # a new module: nothing kept
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)
    ex(feats, boxes).sum().backward()
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in ex.pconvs)
    with pytest.raises(ValueError, match="level_sizes"):
        ex.group_levels(feats[::-1])
