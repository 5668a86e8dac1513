"""open_clip's "initialized randomly" warning only when the tower really stays random (issue 15, item 10).

Loading a checkpoint builds the bare tower and fills it from ``vision.safetensors`` right after, so
the warning there would be false; building a tower with no weights must still say so.
"""

from __future__ import annotations

import logging

import torch

from model.checkpoint import load_model
from model.config import load_model_config
from model.vision import build_visual

RANDOM_INIT = "No pretrained weights loaded"


def warnings_in(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_loading_a_checkpoint_does_not_claim_random_weights(tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO)
    model = load_model(tiny_checkpoint)
    assert not [m for m in warnings_in(caplog) if RANDOM_INIT in m], warnings_in(caplog)
    # ... and the tower really holds the checkpoint's weights, not a fresh random draw.
    again = load_model(tiny_checkpoint)
    for (name, a), (_, b) in zip(model.vision.state_dict().items(), again.vision.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_tower_without_weights_still_warns(caplog):
    caplog.set_level(logging.INFO)
    name = load_model_config("roi-test").vision.open_clip_model
    build_visual(name, None)
    assert any(RANDOM_INIT in m and name in m for m in warnings_in(caplog)), warnings_in(caplog)


def test_the_filter_is_removed_after_a_load(tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO)
    load_model(tiny_checkpoint)
    assert not logging.getLogger().filters
    name = load_model_config("roi-test").vision.open_clip_model
    logging.warning(f"No pretrained weights loaded for model '{name}'. Model initialized randomly.")
    assert any(RANDOM_INIT in m for m in warnings_in(caplog))
