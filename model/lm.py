"""The causal language model of a :class:`model.mllm.RegionMLLM`: pretrained (a local Hugging Face
folder or a Hub repo id), built from ``hf_config`` (weights to be loaded from a checkpoint), or a
LoRA wrapper around a pretrained base identified by a content hash.

Pretrained weights are loaded in the target dtype with low host memory (``dtype=``,
``low_cpu_mem_usage``); ``device_map`` only for CUDA (accelerate's dispatch on CPU adds nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from model.config import ModelConfig
from model.empty_init import empty_weights
from model.tokenizer import resize_embeddings

__all__ = [
    "BaseMismatchError",
    "base_fingerprint",
    "build_lm",
    "relative_source",
    "resolve_pretrained",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHTS = re.compile(r".*\.(safetensors|bin)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BaseMismatchError(ValueError):
    """A LoRA version whose base LM differs from the one it was trained on."""


def resolve_pretrained(name: str, root: Path | None = None) -> Path:
    """A local folder for ``name``: an existing folder (relative paths are taken from ``root``,
    the checkpoint folder, when given) or a Hugging Face Hub repo id, fetched through the Hub cache
    (``HF_HOME``; with ``HF_HUB_OFFLINE=1`` only the cache is read)."""
    path = Path(name).expanduser()
    if root is not None and not path.is_absolute() and (root / path).is_dir():
        return root / path
    if path.is_dir():
        return path
    if path.is_absolute() or not _REPO_ID.match(name):
        raise FileNotFoundError(f"pretrained model {name!r}: no such folder and not a Hub repo id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name))
    except OSError as exc:  # not cached while offline, unknown repo, network (all OSError subclasses)
        raise FileNotFoundError(
            f"pretrained model {name!r} is neither a folder nor in the Hugging Face cache "
            f"(offline, or the download failed): {exc}"
        ) from None


def relative_source(name: str, old_root: Path | None, new_root: Path) -> str:
    """``name`` as a config stored in ``new_root`` must spell it: a local folder as a path relative
    to ``new_root`` (checkpoint folders move together with what they reference), a repo id as is."""
    path = Path(name).expanduser()
    if old_root is not None and not path.is_absolute() and (old_root / path).is_dir():
        path = old_root / path
    if path.is_dir():
        return os.path.relpath(path.resolve(), new_root.resolve())
    return name


def base_fingerprint(folder: Path) -> str:
    """SHA-256 over the weight files of a pretrained LM folder (names and contents).  Files of a Hub
    cache snapshot are symlinks to blobs named by their SHA-256 (LFS), so those are not re-read."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if _WEIGHTS.match(p.name) and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors/.bin weights")
    for path in files:
        blob = path.resolve().name
        if path.is_symlink() and _SHA256.match(blob):
            file_hash = blob
        else:
            with path.open("rb") as f:
                file_hash = hashlib.file_digest(f, "sha256").hexdigest()
        digest.update(f"{path.name}\0{file_hash}\n".encode())
    return digest.hexdigest()


def _device_map(device: torch.device | None) -> dict[str, str] | None:
    return {"": str(device)} if device is not None and device.type == "cuda" else None


def build_lm(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    root: Path | None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    empty: bool = False,
) -> PreTrainedModel:
    """Causal LM for ``cfg.lm`` with its embeddings resized to ``tokenizer`` (new rows: the mean).

    Pretrained weights load in ``dtype`` (default float32) with low host memory, placed on
    ``device`` by ``device_map`` when that is a CUDA device.  ``empty``: an ``hf_config``
    architecture with parameters on the meta device (no memory, no random init), for a caller that
    assigns every parameter from a checkpoint.  A LoRA config records the base's
    :func:`base_fingerprint` in ``cfg.lm.base_sha256`` on first build and refuses
    (:class:`BaseMismatchError`) a base that differs from it afterwards.
    """
    lm_cfg = cfg.lm
    if lm_cfg.pretrained_path:
        path = resolve_pretrained(lm_cfg.pretrained_path, root)
        if lm_cfg.lora:
            found = base_fingerprint(path)
            if lm_cfg.base_sha256 is None:
                lm_cfg.base_sha256 = found
            elif lm_cfg.base_sha256 != found:
                raise BaseMismatchError(
                    f"LoRA base {lm_cfg.pretrained_path!r} ({path}) has weights hash {found[:16]}..., "
                    f"but these adapters were trained on {lm_cfg.base_sha256[:16]}..."
                )
        if _model_type(path) not in (None, *_causal_types()):
            raise ValueError(
                f"{path}: model_type {_model_type(path)!r} is not a causal LM this project can load; "
                "a GPT4RoI/LLaVA folder is converted first (python -m model.convert gpt4roi)"
            )
        lm = AutoModelForCausalLM.from_pretrained(
            str(path),
            local_files_only=True,
            dtype=dtype or torch.float32,
            low_cpu_mem_usage=True,
            device_map=_device_map(device),
        )
    elif lm_cfg.hf_config:
        hf = dict(lm_cfg.hf_config)
        config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        if empty:
            with empty_weights():
                lm = AutoModelForCausalLM.from_config(config)
        else:
            lm = AutoModelForCausalLM.from_config(config)
    else:
        raise ValueError("lm config needs pretrained_path (a folder or Hub repo id) or hf_config")
    if lm.get_input_embeddings().weight.shape[0] != len(tokenizer):
        if empty and lm.get_input_embeddings().weight.is_meta:
            raise ValueError(
                f"hf_config vocab_size {lm.get_input_embeddings().weight.shape[0]} != tokenizer "
                f"size {len(tokenizer)}: the checkpoint does not match its tokenizer"
            )
        resize_embeddings(lm, len(tokenizer))
    if lm_cfg.lora:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM", **lm_cfg.lora))
    return lm


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _causal_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
