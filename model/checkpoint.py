"""Build, save and load :class:`RegionMLLM` checkpoint folders (never unpickles).

A checkpoint folder holds everything needed to rebuild the model::

    config.json          ModelConfig (architecture, paths relative to the folder)
    train_config.json    TrainConfig of the run that produced it (optional)
    version.json         version metadata: version, parent, stage, created, data counts, metrics
    model.safetensors    trainable parts: region_encoder.*, projector.*, lm.* (or LoRA adapter weights)
    vision.safetensors   frozen vision tower weights (``visual.*``), hard-linked from the parent
                         when that file is read-only (a committed registry version), else copied
    tokenizer/           Hugging Face tokenizer files
    manifest.json        SHA-256 and size of every other file (:func:`write_manifest`), written when
                         the folder is committed; :func:`verify_checkpoint` checks it

``load_model(folder, verify=True)`` is the guarded path for folders that may have been tampered
with: manifest, self-containment and file headers first, then a memory estimate from the config
(nothing allocated yet), then the load, then a smoke forward that must give finite outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from model import lm as lm_module
from model.calibration import ScoreCalibration
from model.config import ModelConfig, TrainConfig, load_model_config, save_json
from model.device import pick_dtype
from model.footprint import MemoryEstimate, estimate_memory
from model.mllm import RegionMLLM
from model.tokenizer import load_tokenizer

__all__ = [
    "DEFAULT_DIR",
    "MANIFEST",
    "VISION_WEIGHTS",
    "WEIGHTS",
    "CheckpointError",
    "build_model",
    "check_memory",
    "load_model",
    "read_metadata",
    "read_train_config",
    "save_checkpoint",
    "smoke_check",
    "verify_checkpoint",
    "write_manifest",
]

# The embedded default (built by ``python -m toyworld.build_default``): served when nothing else is.
DEFAULT_DIR = Path(__file__).resolve().parent / "default"
WEIGHTS = "model.safetensors"
VISION_WEIGHTS = "vision.safetensors"
MANIFEST = "manifest.json"
SMOKE_QUESTION = "What is <region1>?"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded (missing, truncated, tampered, wrong keys)."""


# Builds take turns: they seed torch's global RNG, and transformers sets the global default dtype
# while it builds an LM.
_BUILD_LOCK = threading.RLock()


def _fresh_build_lock() -> None:
    global _BUILD_LOCK
    _BUILD_LOCK = threading.RLock()


# A child forked while another thread builds would wait forever for a lock no thread of it holds.
os.register_at_fork(after_in_child=_fresh_build_lock)


def build_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    root: Path | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    empty_lm: bool = False,
) -> RegionMLLM:
    """Fresh model from a config (weights of vision tower / LM from their configured sources;
    ``empty_lm``: an ``hf_config`` LM left on the meta device for :func:`load_model` to assign)."""
    if tokenizer is None:
        if not cfg.lm.tokenizer_path:
            raise ValueError("no tokenizer given and lm.tokenizer_path is not set")
        tokenizer = load_tokenizer(lm_module.resolve_pretrained(cfg.lm.tokenizer_path, root))
    with _BUILD_LOCK:
        torch.manual_seed(0)
        lm = lm_module.build_lm(cfg, tokenizer, root, dtype=dtype, device=device, empty=empty_lm)
        model = RegionMLLM(cfg, tokenizer, lm, checkpoint_root=root)
    model.source_root = root  # where the config's relative paths start (save_checkpoint re-bases them)
    return model


def _trainable_state(model: RegionMLLM) -> dict[str, torch.Tensor]:
    """Everything but the frozen vision tower; tied tensors stored once.  With a LoRA LM only the
    adapters of the LM are stored (the base comes from ``lm.pretrained_path``, checked by hash)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    lora = bool(model.cfg.lm.lora)
    for name, tensor in model.state_dict().items():
        if name.startswith("vision.") or (lora and name.startswith("lm.") and "lora_" not in name):
            continue
        ptr = tensor.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def save_checkpoint(
    model: RegionMLLM,
    folder: str | Path,
    train_cfg: TrainConfig | None = None,
    metadata: dict[str, Any] | None = None,
    vision_source: str | Path | None = None,
) -> Path:
    """Write a complete checkpoint folder.  ``vision_source`` is an existing vision weights file:
    hard-linked when it is read-only (a committed registry version, which nothing edits), copied
    otherwise (a link to a writable file, e.g. the tracked ``model/default``, would let an edit of
    one folder change the other); without it the tower's weights are written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(model.cfg.to_dict())
    save_file(_trainable_state(model), str(folder / WEIGHTS), metadata={"format": "pt"})
    vision_path = folder / VISION_WEIGHTS
    if vision_source is not None and Path(vision_source).resolve() != vision_path.resolve():
        if vision_path.exists() and os.path.samefile(vision_source, vision_path):
            pass  # already this very file (a hard link from an earlier save into the folder)
        else:
            vision_path.unlink(missing_ok=True)
            try:
                if os.stat(vision_source).st_mode & 0o222:
                    raise PermissionError("writable source: copy it")
                os.link(vision_source, vision_path)
            except OSError:
                shutil.copyfile(vision_source, vision_path)
    elif not vision_path.exists():
        vstate = {f"visual.{k}": v.contiguous() for k, v in model.vision.visual.state_dict().items()}
        save_file(vstate, str(vision_path), metadata={"format": "pt"})
    cfg.vision.checkpoint = VISION_WEIGHTS
    model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    cfg.lm.tokenizer_path = "tokenizer"
    if not cfg.lm.lora:
        # The full LM is in model.safetensors: record its architecture so the folder stands alone.
        cfg.lm.hf_config = model.lm.config.to_dict()
        cfg.lm.pretrained_path = None
    elif cfg.lm.pretrained_path:
        # The base stays outside: a folder is referenced relative to this one, a repo id as is.
        cfg.lm.pretrained_path = lm_module.relative_source(
            cfg.lm.pretrained_path, getattr(model, "source_root", None), folder
        )
    save_json(cfg.to_dict(), folder / "config.json")
    if train_cfg is not None:
        save_json(train_cfg.to_dict(), folder / "train_config.json")
    save_json(metadata or {}, folder / "version.json")
    calibration = getattr(model, "score_calibration", None)
    if calibration is not None:  # a fine-tuned version keeps its parent's until fitted again
        calibration.save(folder)
    return folder


def read_metadata(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "version.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_train_config(folder: str | Path) -> TrainConfig | None:
    """The TrainConfig of the run that produced ``folder`` (None: the folder records none)."""
    path = Path(folder) / "train_config.json"
    return TrainConfig.from_dict(json.loads(path.read_text())) if path.exists() else None


def load_model(
    folder: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = False,
    memory_budget: int | None = None,
) -> RegionMLLM:
    """Rebuild a model from its checkpoint folder alone, on ``device`` in ``dtype`` (default: bf16
    on CUDA, float32 on CPU; RoIAlign always runs in float32).  Raises :class:`CheckpointError`
    with a clear message for a missing, truncated or tampered folder.

    ``verify``: first :func:`verify_checkpoint` and :func:`check_memory` (``memory_budget`` bytes at
    most), then :func:`smoke_check` on the loaded model — for folders that may have been tampered
    with (model registry versions)."""
    folder = Path(folder)
    if verify:
        verify_checkpoint(folder)
        check_memory(folder, memory_budget)
    model = _load(folder, device, dtype)
    if verify:
        smoke_check(model)
    model.score_calibration = _calibration(folder, model)  # None: the engine's scores stay raw
    return model


def _calibration(folder: Path, model: RegionMLLM) -> ScoreCalibration | None:
    """The folder's score calibration, checked against the model it is to score."""
    try:
        calibration = ScoreCalibration.load(folder)
    except (ValueError, KeyError, SafetensorError) as exc:  # a file this code cannot read, or damaged
        raise CheckpointError(f"{folder}: unreadable score calibration: {exc}") from exc
    if calibration is None:
        return None
    if calibration.mean.shape[1] != model.projector.out_features:
        raise CheckpointError(
            f"{folder}: the score calibration is for {calibration.mean.shape[1]}-wide region tokens"
        )
    probe = calibration.image_probe
    width = 2 * model.vision.width * len(model.cfg.vision.region_layers)  # image_descriptors of its levels
    if probe is not None and probe.weights.numel() != width:
        raise CheckpointError(f"{folder}: the score calibration's image probe reads {probe.weights.numel()} "
                              f"features, the model's image descriptors have {width}")  # fmt: skip
    return calibration


def _load(folder: Path, device: torch.device | str, dtype: torch.dtype | None) -> RegionMLLM:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder (no config.json)")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS}")
    try:
        state = _read_state(weights)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"cannot load checkpoint {folder}: {WEIGHTS} is damaged (truncated or tampered?): {exc}"
        ) from exc
    try:
        cfg = load_model_config(folder)
        # A full LM is assigned from the file: build it on the meta device (no random init, no
        # float32 copy of a large model); a LoRA base loads its pretrained weights.
        model = build_model(cfg, root=folder, empty_lm=not cfg.lm.lora)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot load checkpoint {folder}: {exc}") from exc
    model.lm.tie_weights()  # tie on the meta device too, so tied keys are recognised by identity
    own = {k for k in model.state_dict() if not k.startswith("vision.")}
    if cfg.lm.lora:  # the base LM's own weights come from lm.pretrained_path
        own = {k for k in own if not k.startswith("lm.") or "lora_" in k or k in state}
    unexpected = sorted(set(state) - own)
    missing = sorted(own - set(state))
    # Tied weights (e.g. lm_head tied to embeddings) are stored once; anything else missing is an error.
    missing = [k for k in missing if not _is_tied(model, k, state)]
    if unexpected or missing:
        raise CheckpointError(
            f"checkpoint {folder} does not match its config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    shapes = model.state_dict()
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(shapes[k].shape)]
    if bad:
        raise CheckpointError(f"checkpoint {folder}: tensor shapes differ from the config for {bad[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    # The parameters are these very tensors now: drop the dict so that casting below frees each
    # stored tensor as its converted copy is made (peak: the model once, not stored + converted).
    del state
    model.lm.tie_weights()
    empty = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if empty:
        raise CheckpointError(f"checkpoint {folder}: no weights for {empty[:5]}")
    device = torch.device(device)
    return model.to(device=device, dtype=dtype or pick_dtype(device)).eval()


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, each in its own allocation: they become the model's
    parameters (``assign=True``), and the reader's buffers are not aligned as torch's allocator
    aligns, which changes float rounding in some kernels (outputs would differ in the last bits
    from the model that was saved).  Each tensor through its own short-lived ``safe_open``: the
    file's mapped pages leave this process's memory as soon as the tensor is copied (one mapping
    for the whole file would hold the file's size in resident pages on top of the copies)."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    state = {}
    for key in keys:
        with safe_open(str(path), framework="pt") as f:
            state[key] = f.get_tensor(key).clone()
    return state


def _is_tied(model: RegionMLLM, key: str, state: dict[str, torch.Tensor]) -> bool:
    """``key`` is the same parameter as a key stored in ``state`` (identity, not storage address:
    parameters on the meta device all share address 0)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    return any(k in state and p is params[key] for k, p in params.items() if k != key)


# ---------------------------------------------------------------------- integrity
def _walk(folder: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``folder``; refuses symlinks and special files."""
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                raise CheckpointError(f"{folder}: {rel} is a symlink; a checkpoint holds only regular files")
            if name in filenames:
                if not path.is_file():
                    raise CheckpointError(f"{folder}: {rel} is not a regular file")
                files.append(rel)
    return sorted(files)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Record the SHA-256 and size of every file of ``folder`` in ``manifest.json`` (written to a
    new file, then renamed over the old one); returns the manifest."""
    folder = Path(folder)
    files = {
        rel: {"sha256": _sha256(folder / rel), "bytes": (folder / rel).stat().st_size}
        for rel in _walk(folder)
        if rel != MANIFEST
    }
    manifest = {"algorithm": "sha256", "files": files}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return manifest


def _inside(folder: Path, value: str | None, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    resolved = (folder / path).resolve()
    if path.is_absolute() or not resolved.is_relative_to(folder.resolve()):
        raise CheckpointError(
            f"{folder}: {what} {value!r} must be a relative path inside the checkpoint folder"
        )
    return resolved


def verify_checkpoint(folder: str | Path) -> None:
    """Check a folder without building anything: every file listed in ``manifest.json`` with its
    SHA-256, no file missing or added, no symlinks, config paths inside the folder (but a LoRA base
    recorded with its weights hash, checked at load), vision weights
    as safetensors, and every safetensors header readable.  Raises :class:`CheckpointError`
    naming the offending file."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder")
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not an object")
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {MANIFEST}: its files cannot be verified") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: {MANIFEST} is unreadable: {exc}") from None
    present = [rel for rel in _walk(folder) if rel != MANIFEST]
    for rel in present:
        if rel not in listed:
            raise CheckpointError(f"{folder}: {rel} is not in {MANIFEST} (added after the commit?)")
    for rel, entry in sorted(listed.items()):
        path = folder / rel
        if rel not in present:
            raise CheckpointError(f"{folder}: {rel} is listed in {MANIFEST} but missing")
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("bytes"):
            raise CheckpointError(f"{folder}: {rel} has another size than {MANIFEST} records (tampered?)")
        if _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{folder}: {rel} does not match its SHA-256 in {MANIFEST} (tampered?)")
    try:
        cfg = load_model_config(folder)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{folder}: config.json is unusable: {exc}") from None
    vision = _inside(folder, cfg.vision.checkpoint, "vision.checkpoint")
    if vision is None or vision.suffix != ".safetensors":
        raise CheckpointError(f"{folder}: vision.checkpoint must name a .safetensors file in the folder")
    _inside(folder, cfg.lm.tokenizer_path, "lm.tokenizer_path")
    if not (cfg.lm.lora and cfg.lm.base_sha256):
        # A LoRA base lives outside the folder by design; its hash is checked when it is loaded.
        _inside(folder, cfg.lm.pretrained_path, "lm.pretrained_path")
    if WEIGHTS not in listed:
        raise CheckpointError(f"{folder} has no {WEIGHTS}")
    for rel in (r for r in listed if r.endswith(".safetensors")):
        try:
            with safe_open(str(folder / rel), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"cannot load checkpoint {folder}: {rel} is damaged (truncated or tampered?): {exc}"
            ) from None


def check_memory(folder: str | Path, budget: int | None = None) -> MemoryEstimate:
    """Refuse (:class:`CheckpointError`) a checkpoint whose config needs more memory than is
    available (or than ``budget`` bytes) — estimated from the config, before allocating."""
    folder = Path(folder)
    try:
        estimate = estimate_memory(load_model_config(folder), folder, budget)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {folder}: cannot estimate its memory: {exc}") from None
    if not estimate.fits:
        raise CheckpointError(f"checkpoint {folder} does not fit in memory: {estimate.describe()}")
    return estimate


@torch.inference_mode()
def smoke_check(model: RegionMLLM) -> dict[str, float]:
    """One forward on a fixed input (a gradient image, one box, one question); raises
    :class:`CheckpointError` unless every logit is finite.  Returns the largest ``|logit|``."""
    side = model.cfg.vision.image_size
    image = Image.linear_gradient("L").resize((side + side // 2, side)).convert("RGB")
    enc = model.prompts.encode_question(SMOKE_QUESTION, num_boxes=1)
    ids = torch.tensor([enc.input_ids])
    was_training = model.training
    model.eval()
    try:
        out = model(
            model.processor(image).unsqueeze(0),
            [torch.tensor([[0.25, 0.25, 0.75, 0.75]])],
            ids,
            torch.ones_like(ids),
            None,
            [enc.region_order],
        )
    finally:
        model.train(was_training)
    logits = out.logits.float()
    if not torch.isfinite(logits).all():
        tensors = chain(model.named_parameters(), model.named_buffers())
        bad = [n for n, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
        where = f"; non-finite weights: {', '.join(bad[:5])}" if bad else ""
        raise CheckpointError(f"smoke forward on a fixed input gave non-finite outputs (NaN/inf){where}")
    return {"logits_abs_max": float(logits.abs().max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="checkpoint folder manifests (SHA-256 of every file)")
    ap.add_argument("command", choices=["manifest", "verify"])
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.command == "manifest":
            print(f"{len(write_manifest(args.folder)['files'])} files recorded in {args.folder / MANIFEST}")
        else:
            verify_checkpoint(args.folder)
            print(f"{args.folder}: every file matches {MANIFEST}")
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
