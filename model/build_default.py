"""Build the embedded default model from nothing, on CPU, reproducibly, in one command.

    python -m model.build_default --out model/default

Steps: tokenizer (``tokenizers`` BPE on the synthetic text) -> open_clip vision tower (ClipLoss on
synthetic pairs) -> LM text pre-training -> stage 1 (region encoder) -> stage 2 (region encoder +
projector + LM) -> checkpoint folder + held-out evaluation.  ``--scale`` shrinks every step count
(for smoke tests).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from model.checkpoint import build_model, save_checkpoint
from model.config import TrainConfig, load_model_config
from model.synthetic import HELD_OUT_COLORS, SceneSpec, SyntheticRecords, corpus_texts
from model.tokenizer import train_tokenizer
from model.train import train
from model.train_clip import train_clip

DEFAULT_DIR = Path(__file__).parent / "default"
DEFAULT_VERSION = "1.0.0"


def build_default(
    out: Path,
    config: str = "roi-tiny",
    scale: float = 1.0,
    seed: int = 0,
    threads: int | None = None,
    show_bar: bool = True,
    vision: Path | None = None,
) -> dict:
    """Run every stage and write the checkpoint folder ``out``; returns the figures recorded."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.monotonic()
    cfg = load_model_config(config)
    spec = SceneSpec()

    def steps(n: int) -> int:
        return max(2, int(n * scale))

    # The template text goes into the tokenizer corpus so the shared prompt prefix stays short.
    template = [cfg.prompt.system, cfg.prompt.image_intro, "\n### Human: ", "\n### Assistant:"] * 200
    texts = itertools.chain(corpus_texts(), template)
    tokenizer = train_tokenizer(texts, vocab_size=int(cfg.lm.hf_config["vocab_size"]) - 16)
    with tempfile.TemporaryDirectory() as tmp:
        if vision is None:
            vision_file = Path(tmp) / "vision.safetensors"
            clip_losses = train_clip(cfg.vision, vision_file, steps=steps(600), seed=seed, spec=spec)
        else:
            vision_file, clip_losses = Path(vision), [float("nan")]
        cfg.vision.checkpoint = str(vision_file)
        model = build_model(cfg, tokenizer)
        records = SyntheticRecords(seed=seed + 100, count=50_000, spec=spec)
        figures: dict = {"clip_loss": [clip_losses[0], clip_losses[-1]]}
        runs = [
            (
                "lm",
                TrainConfig(stage=1, steps=steps(300), batch_size=32, lr=2e-3, warmup_steps=20, seed=seed),
            ),
            (
                "stage1",
                TrainConfig(
                    stage=1, steps=steps(400), batch_size=16, lr=1e-3, warmup_steps=30, seed=seed + 1
                ),
            ),
            (
                "stage2",
                TrainConfig(
                    stage=2, steps=steps(1500), batch_size=16, lr=6e-4, warmup_steps=50, seed=seed + 2
                ),
            ),
        ]
        for name, tcfg in runs:
            hist = train(model, records, tcfg, text_only=name == "lm", show_bar=show_bar)
            figures[f"{name}_loss"] = [
                hist[0]["loss"],
                sum(h["loss"] for h in hist[-20:]) / min(20, len(hist)),
            ]
        figures["build_seconds"] = round(time.monotonic() - t0, 1)
        meta = {
            "version": DEFAULT_VERSION,
            "parent": None,
            "stage": 2,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": "model.build_default",
            "held_out_colors": list(HELD_OUT_COLORS),
            "scale": scale,
            "figures": figures,
        }
        save_checkpoint(model, out, runs[-1][1], meta, vision_source=vision_file)
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--config", default="roi-tiny")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vision", type=Path, default=None, help="reuse trained vision weights (skip CLIP)")
    args = ap.parse_args(argv)
    figures = build_default(args.out, args.config, args.scale, args.seed, args.threads, vision=args.vision)
    print(json.dumps(figures, indent=2))
    print(f"default model written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
