"""Build, save and load :class:`RegionMLLM` checkpoint folders (never unpickles).

A checkpoint folder holds everything needed to rebuild the model::

    config.json          ModelConfig (architecture, paths relative to the folder)
    train_config.json    TrainConfig of the run that produced it (optional)
    version.json         version metadata: version, parent, stage, created, data counts, metrics
    model.safetensors    trainable parts: region_encoder.*, projector.*, lm.* (or LoRA adapter weights)
    vision.safetensors   frozen vision tower weights (``visual.*``), hard-linked from the parent
    tokenizer/           Hugging Face tokenizer files
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from model.config import ModelConfig, TrainConfig, load_model_config, save_json
from model.device import pick_dtype
from model.mllm import RegionMLLM
from model.tokenizer import load_tokenizer

# The embedded default (built by ``python -m toyworld.build_default``): served when nothing else is.
DEFAULT_DIR = Path(__file__).resolve().parent / "default"
WEIGHTS = "model.safetensors"
VISION_WEIGHTS = "vision.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded (missing, truncated, tampered, wrong keys)."""


def build_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, root: Path | None) -> PreTrainedModel:
    """Causal LM from a local Hugging Face folder or from ``hf_config``; embeddings resized to the
    tokenizer (new rows start at the mean embedding, as GPT4RoI does)."""
    lm_cfg = cfg.lm
    if lm_cfg.pretrained_path:
        path = Path(lm_cfg.pretrained_path)
        if root is not None and not path.is_absolute():
            path = root / path
        if not path.is_dir():
            raise FileNotFoundError(f"language model folder not found: {path}")
        lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    elif lm_cfg.hf_config:
        hf = dict(lm_cfg.hf_config)
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    else:
        raise ValueError("lm config needs pretrained_path (a local HF folder) or hf_config")
    if lm.get_input_embeddings().weight.shape[0] != len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if lm_cfg.lora:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM", **lm_cfg.lora))
    return lm


def build_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None, root: Path | None = None
) -> RegionMLLM:
    """Fresh model from a config (weights of vision tower / LM from their configured sources)."""
    if tokenizer is None:
        if not cfg.lm.tokenizer_path:
            raise ValueError("no tokenizer given and lm.tokenizer_path is not set")
        tok_path = Path(cfg.lm.tokenizer_path)
        tokenizer = load_tokenizer(
            root / tok_path if root is not None and not tok_path.is_absolute() else tok_path
        )
    torch.manual_seed(0)
    lm = build_lm(cfg, tokenizer, root)
    return RegionMLLM(cfg, tokenizer, lm, checkpoint_root=root)


def _trainable_state(model: RegionMLLM) -> dict[str, torch.Tensor]:
    """Everything but the frozen vision tower; tied tensors stored once."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if name.startswith("vision."):
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
    """Write a complete checkpoint folder.  ``vision_source`` is an existing vision weights file to
    hard-link (or copy); otherwise the tower's weights are written."""
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
    save_json(cfg.to_dict(), folder / "config.json")
    if train_cfg is not None:
        save_json(train_cfg.to_dict(), folder / "train_config.json")
    save_json(metadata or {}, folder / "version.json")
    return folder


def read_metadata(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "version.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_model(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> RegionMLLM:
    """Rebuild a model from its checkpoint folder alone, on ``device`` in ``dtype`` (default: bf16
    on CUDA, float32 on CPU; RoIAlign always runs in float32).  Raises :class:`CheckpointError`
    with a clear message for a missing, truncated or tampered folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder (no config.json)")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"cannot load checkpoint {folder}: {WEIGHTS} is damaged (truncated or tampered?): {exc}"
        ) from exc
    try:
        cfg = load_model_config(folder)
        model = build_model(cfg, root=folder)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot load checkpoint {folder}: {exc}") from exc
    own = {k for k in model.state_dict() if not k.startswith("vision.")}
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
    model.load_state_dict(state, strict=False)
    model.lm.tie_weights()
    device = torch.device(device)
    return model.to(device=device, dtype=dtype or pick_dtype(device)).eval()


def _is_tied(model: RegionMLLM, key: str, state: dict[str, torch.Tensor]) -> bool:
    sd = model.state_dict()
    ptr = sd[key].data_ptr()
    return any(k in state and sd[k].data_ptr() == ptr for k in sd if k != key)
