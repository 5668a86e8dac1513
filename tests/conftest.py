"""Shared pytest fixtures.  Keep each fixture clearly named after what it provides."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ``roi-test`` checkpoint folder (version 1.0.0), built once per test session.

    Its answers are garbage; tests use it for wiring, shapes and protocol checks only.
    """
    from model.checkpoint import build_model, save_checkpoint
    from model.config import load_model_config
    from model.tokenizer import train_tokenizer
    from toyworld.scenes import corpus_texts

    cfg = load_model_config("roi-test")
    tokenizer = train_tokenizer(corpus_texts(count=200), vocab_size=280)
    model = build_model(cfg, tokenizer)
    folder = tmp_path_factory.mktemp("tiny_ckpt") / "default"
    save_checkpoint(model, folder, metadata={"version": "1.0.0"})
    return folder


@pytest.fixture()
def tiny_registry(tiny_checkpoint: Path, tmp_path: Path):
    """A fresh :class:`backend.registry.ModelRegistry` seeded with :func:`tiny_checkpoint`."""
    from backend.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "models", tiny_checkpoint)
    registry.ensure_initialized()
    return registry
