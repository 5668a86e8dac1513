"""Build the embedded default model from nothing, on CPU, reproducibly, in one command.

    python -m toyworld.build_default --out model/default

Steps (sizes and schedules from the recipe, by default :data:`DEFAULT_RECIPE` built with
:data:`DEFAULT_SEED`, what the shipped ``model/default`` was built from): tokenizer
(``tokenizers`` BPE on the synthetic text) -> open_clip vision tower (``ClipLoss`` on synthetic
pairs) -> LM text pre-training -> stage 1 (region encoder) -> stage 2 (region encoder + projector +
LM) -> held-out evaluation -> score calibration -> checkpoint folder with the figures of every
phase.  A ``world_share`` of the records comes from the wider world (:mod:`toyworld.world`).

The build resumes phase by phase: every finished phase is written to ``<out>.partial``, and a build
started again with the same recipe, seed and scale continues from there (an interrupted build loses
at most the phase it was in; ``--restart`` ignores it).  ``--scale`` shrinks every step count (smoke
tests); ``--vision`` reuses trained vision weights instead of training them again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from model.checkpoint import DEFAULT_DIR, build_model, load_model, read_metadata, save_checkpoint
from model.config import TrainConfig
from model.inference.engine import InferenceEngine
from model.mllm import RegionMLLM
from model.tokenizer import train_tokenizer
from model.training import TrainOptions, train
from toyworld.calibrate import fit_calibration
from toyworld.evaluate import evaluate
from toyworld.recipe import (
    DEFAULT_RECIPE,
    DEFAULT_SEED,
    BuildRecipe,
    load_recipe,
    recipe_model_config,
    training_records,
)
from toyworld.scenes import HELD_OUT_COLORS, SceneSpec, corpus_texts
from toyworld.train_clip import train_clip

__all__ = [
    "DEFAULT_VERSION",
    "build_default",
    "eval_progress",
    "evaluation_rates",
    "loss_summary",
    "main",
    "partial_folder",
]

DEFAULT_VERSION = "1.0.0"


def _scaled(cfg: TrainConfig, scale: float, seed: int) -> TrainConfig:
    data = cfg.to_dict()
    data["steps"] = max(2, int(cfg.steps * scale))
    data["warmup_steps"] = min(cfg.warmup_steps, data["steps"] // 2)
    data["seed"] = cfg.seed + seed
    return TrainConfig.from_dict(data)


def partial_folder(out: Path) -> Path:
    """Where a build of ``out`` keeps its finished phases until it completes."""
    return Path(out).with_name(Path(out).name + ".partial")


def _recipe_record(recipe: BuildRecipe, seed: int, scale: float) -> dict:
    """The recipe as a build's metadata records it (and as a resumed build must match it)."""
    return json.loads(json.dumps({"seed": seed, "scale": scale, **asdict(recipe)}))


def _build_meta(recipe: BuildRecipe, seed: int, scale: float, figures: dict, complete: bool) -> dict:
    return {
        "version": DEFAULT_VERSION,
        "parent": None,
        "stage": 2,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": "toyworld.build_default",
        "recipe": _recipe_record(recipe, seed, scale),
        "held_out_colors": list(HELD_OUT_COLORS),
        "build": {"complete": complete},
        "figures": figures,
    }


def _resumable(folder: Path, recipe: BuildRecipe, seed: int, scale: float) -> bool:
    """Whether ``folder`` holds an unfinished build of exactly this recipe, seed and scale."""
    if not (folder / "version.json").is_file():
        return False
    meta = read_metadata(folder)
    same = meta.get("recipe") == _recipe_record(recipe, seed, scale)
    return same and meta.get("build", {}).get("complete") is False


def build_default(
    out: Path,
    recipe: BuildRecipe | None = None,
    scale: float = 1.0,
    seed: int = DEFAULT_SEED,
    threads: int | None = None,
    show_bar: bool = True,
    vision: Path | None = None,
    eval_images: int = 200,
    eval_every: int = 0,
    resume: Path | None = None,
    calibration_images: int = 40,
    restart: bool = False,
) -> dict:
    """Run every phase and write the checkpoint folder ``out``; returns the figures recorded.

    Each finished phase is saved to :func:`partial_folder` (``<out>.partial``); an unfinished build
    of the same recipe, seed and scale found there is continued unless ``restart``.  ``resume``: a
    complete folder an earlier build wrote; its model is loaded and the phases it records as done
    are skipped (e.g. a recipe that adds a ``stage2_restart``).

    ``calibration_images``: images per stress condition the answer-score calibration is fitted on
    (:mod:`toyworld.calibrate`; 0: none, the scores stay raw).
    """
    recipe = recipe or load_recipe()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.monotonic()
    spec = SceneSpec()
    partial = partial_folder(out)
    figures: dict = {}
    if restart and partial.exists():
        shutil.rmtree(partial)
    if resume is None and _resumable(partial, recipe, seed, scale):
        resume = partial
        print(f"continuing the unfinished build in {partial}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if resume is not None:
            model = load_model(resume)
            vision_file = Path(resume) / "vision.safetensors"
            figures = dict(read_metadata(resume).get("figures", {}))
            if resume != partial:
                figures.pop("evaluation", None)
        else:
            model, vision_file = _fresh_model(recipe, Path(tmp), scale, seed, spec, figures, vision)
        spent = figures.get("build_seconds", 0.0)
        # The regime the model ends in (train_config.json: fine-tuning jobs continue its dropout).
        last_phase = recipe.stage2_restart if recipe.stage2_restart.steps > 0 else recipe.stage2

        def save(folder: Path, complete: bool) -> None:
            figures["build_seconds"] = round(spent + time.monotonic() - t0, 1)
            meta = _build_meta(recipe, seed, scale, figures, complete)
            save_checkpoint(model, folder, _scaled(last_phase, scale, seed), meta, vision_source=vision_file)

        if resume is None:
            save(partial, complete=False)
            vision_file = partial / "vision.safetensors"
        records = training_records(recipe, seed, spec)
        phases = [("lm", recipe.lm), ("stage1", recipe.stage1), ("stage2", recipe.stage2)]
        if recipe.stage2_restart.steps > 0:
            phases.append(("stage2_restart", recipe.stage2_restart))
        for name, phase in phases:
            if f"{name}_loss" in figures:
                continue  # done by the build being resumed
            tcfg = _scaled(phase, scale, seed)
            started = time.monotonic()
            text_only = name == "lm"  # LM pre-training: whole conversations, no images
            progress = eval_progress(model, name, eval_every) if eval_every and not text_only else None
            options = TrainOptions(
                text_only=text_only,
                max_turns=recipe.turns if text_only else recipe.prompts_per_image,
                separate_turns=not text_only,
                progress=progress,
                show_bar=show_bar,
            )
            hist = train(model, records, tcfg, options)
            figures[f"{name}_loss"] = loss_summary(hist)
            figures[f"{name}_seconds"] = round(time.monotonic() - started, 1)
            save(partial, complete=False)
        if eval_images and "evaluation" not in figures:
            figures["evaluation"] = evaluation_rates(
                evaluate(InferenceEngine(model, DEFAULT_VERSION), images=eval_images, seed=0)
            )
            save(partial, complete=False)
        if calibration_images:
            started = time.monotonic()
            engine = InferenceEngine(model, DEFAULT_VERSION)
            model.score_calibration, figures["calibration"] = fit_calibration(
                engine, fit_images=calibration_images, world_share=recipe.world_share,
                world=recipe.world_spec(),
            )  # fmt: skip
            figures["calibration_seconds"] = round(time.monotonic() - started, 1)
        save(Path(out), complete=True)
    shutil.rmtree(partial, ignore_errors=True)
    return figures


def _fresh_model(
    recipe: BuildRecipe,
    tmp: Path,
    scale: float,
    seed: int,
    spec: SceneSpec,
    figures: dict,
    vision: Path | None,
) -> tuple[RegionMLLM, Path]:
    """Tokenizer + vision tower (CLIP) + a fresh model around them; returns it and the vision file."""
    cfg = recipe_model_config(recipe)
    # The template text goes into the tokenizer corpus so the shared prompt prefix stays short.
    template = [cfg.prompt.system, cfg.prompt.image_intro, "\n### Human: ", "\n### Assistant:"] * 200
    texts = itertools.chain(corpus_texts(), template)
    tokenizer = train_tokenizer(texts, vocab_size=int(cfg.lm.hf_config["vocab_size"]) - 16)
    if vision is None:
        vision_file = tmp / "vision.safetensors"
        clip = recipe.clip
        steps = max(2, int(clip.steps * scale))
        started = time.monotonic()
        losses = train_clip(
            cfg.vision, vision_file, steps, clip.batch_size, clip.lr, seed=seed, spec=spec,
            world_share=clip.world_share, world=clip.world_spec(),
            focal_share=clip.focal_share, focal_fill=cfg.region.focal_fill,
        )  # fmt: skip
        figures["clip_loss"] = [losses[0], losses[-1]]
        figures["clip_seconds"] = round(time.monotonic() - started, 1)
    else:
        vision_file = Path(vision)
        figures["clip_loss"] = f"reused {vision_file}"
    cfg.vision.checkpoint = str(vision_file)
    return build_model(cfg, tokenizer), vision_file


def loss_summary(history: list[dict]) -> list[float]:
    """[first loss, mean of the last 20] of a :func:`model.training.train` history (a phase's figure)."""
    tail = history[-20:]
    return [history[0]["loss"], sum(h["loss"] for h in tail) / len(tail)]


def evaluation_rates(result: dict) -> dict[str, float]:
    """The rates of an :func:`toyworld.evaluate.evaluate` result (counts and answers left out)."""
    return {k: v for k, v in result.items() if isinstance(v, float)}


def eval_progress(model: RegionMLLM, phase: str, every: int) -> Callable[[dict], None]:
    """A training progress callback that prints a quick held-out evaluation every ``every`` steps."""

    def report(entry: dict) -> None:
        if entry["step"] % every and entry["step"] != entry["steps"]:
            return
        model.eval()
        result = evaluation_rates(evaluate(InferenceEngine(model, "building"), images=60, seed=1))
        model.train()
        rates = {k: round(v, 3) for k, v in result.items()}
        print(
            json.dumps({"phase": phase, "step": entry["step"], "loss": round(entry["loss"], 4), **rates}),
            flush=True,
        )

    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe name or JSON file")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (smoke tests)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vision", type=Path, default=None, help="reuse trained vision weights (skip CLIP)")
    ap.add_argument("--eval-images", type=int, default=200, help="held-out scenes scored at the end")
    ap.add_argument("--resume", type=Path, default=None, help="a finished build: skip the phases it did")
    ap.add_argument("--restart", action="store_true", help="ignore an unfinished build in <out>.partial")
    ap.add_argument("--eval-every", type=int, default=0, help="quick evaluation every N steps (0: off)")
    ap.add_argument("--calibration-images", type=int, default=40, help="per stress condition (0: none)")
    args = ap.parse_args(argv)
    figures = build_default(
        args.out,
        load_recipe(args.recipe),
        args.scale,
        args.seed,
        args.threads,
        vision=args.vision,
        eval_images=args.eval_images,
        eval_every=args.eval_every,
        resume=args.resume,
        calibration_images=args.calibration_images,
        restart=args.restart,
    )
    print(json.dumps(figures, indent=2))
    print(f"default model written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
