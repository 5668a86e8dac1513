"""Memory a checkpoint needs, estimated from its config before anything is allocated.

Parameter counts come from the architecture alone: the open_clip config of the vision tower, the
Hugging Face config of the LM (hidden size, intermediate size, layers, heads, vocabulary), the
region encoder and projector sizes.  :func:`load_peak_bytes` turns them into the peak that
:func:`model.checkpoint.load_model` reaches; :func:`available_memory` is what the machine (or the
process's cgroup) can still give.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import ModelConfig

__all__ = [
    "MemoryEstimate",
    "available_memory",
    "clip_parameters",
    "estimate_memory",
    "estimate_parameters",
    "lm_parameters",
    "load_peak_bytes",
    "region_parameters",
]

FLOAT32 = 4
# Slack beyond the tensors: allocator fragmentation and code first run by a load (docs/security.md).
SLACK_FACTOR = 1.1
SLACK_BYTES = 64 * 2**20
# HF model types whose MLP has a gate projection (three matrices, not two).
GATED_MLP = frozenset(
    "llama mistral mixtral qwen2 qwen2_moe qwen3 gemma gemma2 gemma3_text phi3 olmo olmo2 granite "
    "cohere stablelm deepseek_v2 internlm2 yi".split()
)


@dataclass(frozen=True)
class MemoryEstimate:
    """``parameters``: per part; ``peak_bytes``: the loader's estimated peak; ``available_bytes``:
    what may be used (the smaller of the machine's free memory and an explicit budget)."""

    parameters: dict[str, int]
    peak_bytes: int
    available_bytes: int
    available_source: str

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.available_bytes

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in self.parameters.items())
        return (
            f"estimate {self.peak_bytes / 2**20:,.0f} MiB to load ({parts} parameters); "
            f"available {self.available_bytes / 2**20:,.0f} MiB ({self.available_source})"
        )


def _first(cfg: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return int(value)
    return None


def _transformer_block(width: int, mlp: int) -> int:
    """One open_clip residual block: fused qkv + out projection, two LayerNorms, a 2-layer MLP."""
    return 4 * width * width + 4 * width + 4 * width + 2 * width * mlp + mlp + width


def clip_parameters(open_clip_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """``(vision tower, text tower)`` parameters of an open_clip ``VisionTransformer`` CLIP config
    (the loader builds the whole CLIP, then keeps the vision tower).  Raises ``ValueError`` for
    towers this formula does not cover (timm or Hugging Face towers)."""
    vision = open_clip_cfg["vision_cfg"]
    text = open_clip_cfg.get("text_cfg", {})
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise ValueError("cannot size timm / Hugging Face towers from their open_clip config")
    embed = int(open_clip_cfg["embed_dim"])
    w, layers, patch = int(vision["width"]), int(vision["layers"]), int(vision["patch_size"])
    size = vision["image_size"]
    side = int(size[0] if isinstance(size, (list, tuple)) else size)
    grid = side // patch
    mlp = int(w * float(vision.get("mlp_ratio", 4.0)))
    visual = 3 * patch * patch * w + w + (grid * grid + 1) * w + 4 * w + layers * _transformer_block(w, mlp)
    visual += w * embed
    tw, tl = int(text.get("width", 512)), int(text.get("layers", 12))
    t_mlp = int(tw * float(text.get("mlp_ratio", 4.0)))
    text_params = int(text.get("vocab_size", 49408)) * tw + int(text.get("context_length", 77)) * tw
    text_params += tl * _transformer_block(tw, t_mlp) + 2 * tw + tw * embed + 1  # + logit_scale
    return visual, text_params


def lm_parameters(hf: Mapping[str, Any], vocab: int | None = None) -> int:
    """Parameters of a decoder-only Hugging Face LM from its config dict (``vocab``: the resized
    vocabulary, when the tokenizer is larger or smaller than ``vocab_size``).  Raises ``ValueError``
    when the size keys are missing."""
    hidden = _first(hf, "hidden_size", "n_embd", "d_model")
    layers = _first(hf, "num_hidden_layers", "n_layer", "num_layers")
    vocab = vocab or _first(hf, "vocab_size")
    if hidden is None or layers is None or vocab is None:
        raise ValueError("cannot size the language model: its config lacks hidden_size, layers or vocab_size")
    inter = _first(hf, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    heads = _first(hf, "num_attention_heads", "n_head") or 1
    head_dim = _first(hf, "head_dim") or hidden // heads
    kv = _first(hf, "num_key_value_heads") or heads
    attn = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    if hf.get("attention_bias"):
        attn += (heads + 2 * kv) * head_dim + hidden
    gated = hf.get("model_type") in GATED_MLP
    experts = _first(hf, "num_local_experts", "num_experts") or 1
    mlp = experts * (3 if gated else 2) * hidden * inter + (experts * hidden if experts > 1 else 0)
    if hf.get("mlp_bias"):
        mlp += experts * (2 * inter + hidden if gated else inter + hidden)
    per_layer = attn + mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if hf.get("tie_word_embeddings", False) else 2)
    positions = (_first(hf, "n_positions") or 0) * hidden  # learned positions (GPT-2 style)
    return layers * per_layer + embeddings + positions + hidden


def region_parameters(cfg: ModelConfig, lm_hidden: int) -> tuple[int, int]:
    """``(region encoder, projector)`` parameters (``model.region_encoder`` / ``nn.Linear``)."""
    r, c, h = cfg.region, cfg.vision.width, lm_hidden
    f, levels, o = r.fuse_channels, len(r.level_sizes), r.roi_output_size
    hd, ph = r.hidden_dim, r.pos_hidden_dim
    fuse = levels * ((c + 2) * f + f) + r.num_fuse * (9 * f * f + 2 * f)
    pool = levels * (9 * f * f + f) + f * o * o * hd + hd
    pool += 2 * hd if r.feature_norm in ("batch", "layer") else 0
    pool += 4 * (1 + 2 * r.pos_fourier_bands) * ph + ph + 2 * ph + ph * hd + hd + 2 * hd
    out = hd * h + h + (2 * h if r.out_norm else 0)
    return fuse + pool + out, c * h + h


def _tokenizer_size(folder: Path) -> int | None:
    """``len(tokenizer)`` read from ``tokenizer.json`` (largest id + 1), or None if unreadable."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    vocab = data.get("model", {}).get("vocab", {})
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t.get("id", 0) for t in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def _resolve(root: Path | None, path: str) -> Path:
    p = Path(path)
    return root / p if root is not None and not p.is_absolute() else p


def estimate_parameters(cfg: ModelConfig, root: Path | None = None) -> dict[str, int]:
    """Parameters per part: ``vision_tower``, ``clip_text_tower`` (built, then dropped),
    ``region_encoder``, ``projector``, ``lm``.  ``root``: the checkpoint folder relative paths
    refer to.  Raises ``ValueError`` for an architecture it cannot size."""
    import open_clip

    from model.vision import register_open_clip_configs

    register_open_clip_configs()
    clip_cfg = open_clip.get_model_config(cfg.vision.open_clip_model)
    if clip_cfg is None:
        raise ValueError(f"unknown open_clip architecture {cfg.vision.open_clip_model!r}")
    visual, text = clip_parameters(clip_cfg)
    hf: Mapping[str, Any] | None = cfg.lm.hf_config
    if cfg.lm.pretrained_path:
        try:
            hf = json.loads((_resolve(root, cfg.lm.pretrained_path) / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the language model's config: {exc}") from None
    if not hf:
        raise ValueError("lm config needs pretrained_path or hf_config")
    vocab = _tokenizer_size(_resolve(root, cfg.lm.tokenizer_path)) if cfg.lm.tokenizer_path else None
    lm = lm_parameters(hf, vocab)
    if cfg.lm.lora:
        lm += int(lm * 0.01)  # adapters: a small share of the base (rank-dependent; bounded here)
    hidden = _first(hf, "hidden_size", "n_embd", "d_model") or 0
    region, projector = region_parameters(cfg, hidden)
    return {"vision_tower": visual, "clip_text_tower": text, "region_encoder": region,
            "projector": projector, "lm": lm}  # fmt: skip


def load_peak_bytes(parameters: Mapping[str, int]) -> int:
    """Peak memory of :func:`model.checkpoint.load_model` in float32: the whole CLIP and the
    vision state read from disk at once, then the trainable parts built while their stored state
    (``model.safetensors``) is held in memory too."""
    trainable = parameters["region_encoder"] + parameters["projector"] + parameters["lm"]
    vision = parameters["vision_tower"] + parameters["clip_text_tower"] + parameters["vision_tower"]
    return int(SLACK_FACTOR * FLOAT32 * (2 * trainable + vision)) + SLACK_BYTES


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1), or None if unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            for folder in (base, Path("/sys/fs/cgroup")):
                limit = _read_int(folder / "memory.max")
                used = _read_int(folder / "memory.current")
                if limit is not None and used is not None:
                    return max(0, limit - used)
        elif "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory")
            limit = _read_int(folder / "memory.limit_in_bytes")
            used = _read_int(folder / "memory.usage_in_bytes")
            if limit is not None and used is not None and limit < 2**60:
                return max(0, limit - used)
    return None


def available_memory() -> tuple[int, str]:
    """``(bytes, where from)``: ``MemAvailable`` of /proc/meminfo (``os.sysconf`` elsewhere),
    lowered to what the cgroup's memory limit leaves."""
    free, source = None, "MemAvailable"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if free is None:
        free, source = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"
    cgroup = _cgroup_free()
    if cgroup is not None and cgroup < free:
        return cgroup, "cgroup memory limit"
    return free, source


def estimate_memory(cfg: ModelConfig, root: Path | None = None, budget: int | None = None) -> MemoryEstimate:
    """Estimate for ``cfg`` against the machine's free memory, or ``budget`` bytes if smaller."""
    parameters = estimate_parameters(cfg, root)
    free, source = available_memory()
    if budget is not None and budget < free:
        free, source = budget, "budget"
    return MemoryEstimate(parameters, load_peak_bytes(parameters), free, source)
