"""Official GPT4RoI checkpoints (merged, or delta + LLaMA base) -> a servable checkpoint folder.

Key map (every source tensor is consumed, every target filled, or :class:`ConversionError` names
the key):

* ``model.spi_module.*`` -> ``region_encoder.*``, with 17 renames: ``mlvl_fuse.fuse_convs.{i}.conv``
  -> ``.{i}.0`` and ``.gn`` -> ``.{i}.1`` (our ``nn.Sequential(conv, GroupNorm, ReLU)``), and
  ``roi_align.updims`` -> ``updims`` (one level up);
* ``model.mm_projector.*`` -> ``projector.*``;
* the LLaMA body ``model.*`` and ``lm_head.weight`` -> ``lm.model.*`` / ``lm.lm_head.weight``;
* ``model.layers.{i}.self_attn.rotary_emb.inv_freq`` (a buffer transformers 4.29 saved) is
  checked against ``rope_theta`` and dropped (current transformers computes it).

A delta is applied as the official ``scripts/apply_delta.py`` does: in float16, ``delta + base``
for every shared key, ``embed_tokens``/``lm_head`` summed over the base's rows only (the added
tokens' rows are stored absolute), ``mm_projector``/``spi_module`` taken as stored.  Sizes come
from the source's ``config.json`` (LLaVA type) and tensor shapes; the tokenizer is the GPT4RoI
folder's own.  Shards are streamed (:mod:`model.convert.shards`).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from model.config import LMConfig, ModelConfig, PromptConfig, RegionEncoderConfig, VisionConfig, save_json
from model.convert.shards import ConversionError, ShardSet, StreamWriter
from model.empty_init import empty_weights
from model.region_encoder import RegionEncoder
from model.vision import OPENAI_MEAN, OPENAI_STD, build_visual, register_open_clip_configs

__all__ = [
    "GPT4ROI_TOKENS",
    "Plan",
    "convert_gpt4roi",
    "plan_conversion",
    "target_key",
    "target_shapes",
]

# [PAD] then the tokens of spi_llava.py, in the order (and so with the ids) of added_tokens.json.
GPT4ROI_TOKENS = ["[PAD]", "<im_patch>", "<bbox>", "<point>", "<im_start>", "<im_end>"]
GPT4ROI_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_INTRO = "The <image> provides an overview of the picture."
EMBEDDING_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
ABSOLUTE_PREFIXES = ("model.mm_projector.", "model.spi_module.")  # not in the base: stored absolute
GN_CHANNELS_PER_GROUP = 16  # GPT4RoI: GroupNorm(64 groups) over 1024 channels
NUM_LEVELS_OFFICIAL_STEP = 3  # spi_llava.py: hidden_states[select_layer::-3]
_INV_FREQ = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_RENAMES = [
    (re.compile(r"^mlvl_fuse\.fuse_convs\.(\d+)\.conv\."), r"mlvl_fuse.fuse_convs.\1.0."),
    (re.compile(r"^mlvl_fuse\.fuse_convs\.(\d+)\.gn\."), r"mlvl_fuse.fuse_convs.\1.1."),
    (re.compile(r"^roi_align\.updims\."), "updims."),
]


def target_key(source: str) -> str | None:
    """Our name for an official tensor; ``None`` for a derived buffer (rotary ``inv_freq``).
    Raises :class:`ConversionError` for a key with no counterpart."""
    if source.startswith("model.spi_module."):
        rest = source[len("model.spi_module.") :]
        for pattern, repl in _RENAMES:
            rest = pattern.sub(repl, rest)
        return "region_encoder." + rest
    if source.startswith("model.mm_projector."):
        return "projector." + source[len("model.mm_projector.") :]
    if _INV_FREQ.match(source):
        return None
    if source.startswith("model.") or source == "lm_head.weight":
        return "lm." + source
    raise ConversionError(f"source tensor {source!r} has no counterpart in this model")


# ---------------------------------------------------------------------- configuration
def _need(src: dict[str, Any], *keys: str) -> list[Any]:
    missing = [k for k in keys if src.get(k) is None]
    if missing:
        raise ConversionError(f"source config.json lacks {missing}")
    return [src[k] for k in keys]


def llama_config(src: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """LLaMA ``hf_config`` from a LLaVA-type config; special ids from the tokenizer (old LLaMA
    configs carry ``pad_token_id: -1`` and shifted bos/eos ids)."""
    hidden, inter, heads, layers, vocab = _need(
        src, "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"
    )
    if src.get("rope_scaling"):
        raise ConversionError(f"rope_scaling {src['rope_scaling']} is not supported by this converter")
    cfg = LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(inter),
        num_hidden_layers=int(layers),
        num_attention_heads=int(heads),
        num_key_value_heads=int(src.get("num_key_value_heads") or heads),
        hidden_act=src.get("hidden_act", "silu"),
        max_position_embeddings=int(
            src.get("max_position_embeddings") or src.get("max_sequence_length") or 2048
        ),
        initializer_range=float(src.get("initializer_range", 0.02)),
        rms_norm_eps=float(src.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(src.get("tie_word_embeddings", False)),
        rope_parameters={"rope_type": "default", "rope_theta": float(src.get("rope_theta", 10000.0))},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = cfg.to_dict()
    out.pop("dtype", None)
    return out


def clip_geometry(open_clip_model: str) -> dict[str, int]:
    """``image_size``, ``patch_size``, ``grid``, ``layers``, ``width`` of an open_clip tower."""
    register_open_clip_configs()
    model_cfg = open_clip.get_model_config(open_clip_model)
    if model_cfg is None:
        raise ConversionError(f"unknown open_clip architecture {open_clip_model!r}")
    v = model_cfg["vision_cfg"]
    side = v["image_size"][0] if isinstance(v["image_size"], (list, tuple)) else v["image_size"]
    patch = v["patch_size"][0] if isinstance(v["patch_size"], (list, tuple)) else v["patch_size"]
    return {
        "image_size": int(side),
        "patch_size": int(patch),
        "grid": int(side) // int(patch),
        "layers": int(v["layers"]),
        "width": int(v["width"]),
    }


def region_layers(num_blocks: int, select_layer: int, num_levels: int) -> list[int]:
    """spi_llava.py's levels: ``hidden_states[select::-3]`` reversed, the last ``num_levels``
    (ViT-L/14, select -2: [14, 17, 20, 23])."""
    top = select_layer % (num_blocks + 1)
    levels = list(range(top, -1, -NUM_LEVELS_OFFICIAL_STEP))[::-1][-num_levels:]
    if len(levels) < num_levels or 0 in levels:
        raise ConversionError(
            f"a {num_blocks}-block tower has no {num_levels} region levels every 3 blocks below "
            f"hidden state {top} (index 0, the embeddings, is not a block output)"
        )
    return levels


def region_config(shapes: dict[str, tuple[int, ...]], vision_width: int) -> tuple[RegionEncoderConfig, int]:
    """The official module's sizes, read from its tensor shapes, and its number of levels."""
    p = "model.spi_module."

    def shape(key: str) -> tuple[int, ...]:
        if p + key not in shapes:
            raise ConversionError(f"source lacks {p + key}")
        return shapes[p + key]

    levels = len([k for k in shapes if re.fullmatch(re.escape(p) + r"mlvl_fuse\.input_conv\.\d+\.weight", k)])
    fuse = len(
        [k for k in shapes if re.fullmatch(re.escape(p) + r"mlvl_fuse\.fuse_convs\.\d+\.conv\.weight", k)]
    )
    channels, in_plus_coords = shape("mlvl_fuse.input_conv.0.weight")[:2]
    if in_plus_coords - 2 != vision_width:
        raise ConversionError(
            f"{p}mlvl_fuse.input_conv.0.weight takes {in_plus_coords - 2} vision channels, "
            f"the vision tower has {vision_width}"
        )
    hidden, flat = shape("roi_align.flatten_linear.weight")
    roi = math.isqrt(flat // channels)
    if roi * roi * channels != flat:
        raise ConversionError(f"{p}roi_align.flatten_linear.weight {flat} inputs is not {channels} x s x s")
    pos_hidden, box_inputs = shape("roi_align.pos_embedd.0.weight")
    if box_inputs != 4:
        raise ConversionError(f"{p}roi_align.pos_embedd.0.weight takes {box_inputs} inputs, not a box (4)")
    return RegionEncoderConfig(
        fuse_channels=int(channels),
        level_sizes=[],  # set from the vision grid by the caller
        num_fuse=fuse,
        gn_groups=max(1, int(channels) // GN_CHANNELS_PER_GROUP),
        roi_output_size=roi,
        sampling_ratio=2,
        hidden_dim=int(hidden),
        pos_hidden_dim=int(pos_hidden),
    ), levels


def model_config(
    src: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    tokenizer: PreTrainedTokenizerBase,
    open_clip_model: str,
    name: str,
) -> ModelConfig:
    """Our :class:`ModelConfig` for an official checkpoint (config.json + tensor shapes)."""
    if src.get("mm_use_im_start_end") is False:
        raise ConversionError(
            "mm_use_im_start_end is false: only the <im_start>/<im_end> layout is supported"
        )
    geo = clip_geometry(open_clip_model)
    width = int(src.get("mm_hidden_size") or geo["width"])
    if width != geo["width"]:
        raise ConversionError(
            f"mm_hidden_size {width} != width {geo['width']} of open_clip {open_clip_model}"
        )
    region, levels = region_config(shapes, width)
    region.level_sizes = [geo["grid"] * 2**lvl for lvl in range(levels)][::-1]
    select = int(src.get("mm_vision_select_layer", -2))
    vision = VisionConfig(
        open_clip_model=open_clip_model,
        checkpoint="vision.safetensors",
        image_size=geo["image_size"],
        width=width,
        image_token_layer=select,
        region_layers=region_layers(geo["layers"], select, levels),
        mean=list(OPENAI_MEAN),
        std=list(OPENAI_STD),
        interpolation="bicubic",
        preprocess="gpt4roi",
    )
    lm = LMConfig(
        hf_config=llama_config(src, tokenizer),
        tokenizer_path="tokenizer",
        max_length=int(src.get("max_position_embeddings") or src.get("max_sequence_length") or 2048),
    )
    prompt = PromptConfig(system=GPT4ROI_SYSTEM, image_intro=IMAGE_INTRO, template="gpt4roi_v0")
    return ModelConfig(name=name, vision=vision, region=region, lm=lm, prompt=prompt)


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor a checkpoint folder of ``cfg`` stores (all but the vision tower),
    from modules built on the meta device (no memory)."""
    hf = dict(cfg.lm.hf_config or {})
    with empty_weights():
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
        hidden = int(lm.get_input_embeddings().weight.shape[1])
        parts = {
            "lm": lm,
            "region_encoder": RegionEncoder(cfg.vision.width, hidden, int(cfg.vision.image_size), cfg.region),
            "projector": nn.Linear(cfg.vision.width, hidden),
        }
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, module in parts.items():
        seen: set[int] = set()
        for key, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in seen:  # tied (stored once)
                continue
            seen.add(id(tensor))
            shapes[f"{prefix}.{key}"] = tuple(tensor.shape)
    return shapes


# ---------------------------------------------------------------------- planning
@dataclass
class Plan:
    """Source key -> target key, in writing order; ``derived``: buffers checked, not stored."""

    order: list[tuple[str, str]] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def plan_conversion(
    source: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    base: dict[str, tuple[int, ...]] | None = None,
) -> Plan:
    """Check that ``source`` (key -> shape; the delta when ``base`` is given) maps one to one onto
    ``expected`` (:func:`target_shapes`) and, for a delta, that every base tensor is used.  Raises
    :class:`ConversionError` naming every unknown, missing or mis-shaped key."""
    plan = Plan(shapes=dict(expected))
    problems: list[str] = []
    claimed: dict[str, str] = {}
    for key, shape in source.items():
        try:
            target = target_key(key)
        except ConversionError as exc:
            problems.append(str(exc))
            continue
        if target is None:
            plan.derived.append(key)
            continue
        if target not in expected:
            problems.append(f"source tensor {key!r} -> {target!r}, which this model does not have")
        elif tuple(shape) != expected[target]:
            problems.append(
                f"source tensor {key!r} has shape {list(shape)}, {target!r} needs {list(expected[target])}"
            )
        elif target in claimed:
            problems.append(f"source tensors {claimed[target]!r} and {key!r} both map to {target!r}")
        else:
            claimed[target] = key
            plan.order.append((key, target))
    missing = sorted(set(expected) - set(claimed))
    if missing:
        problems.append(
            f"no source tensor for {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)})"
        )
    if base is not None:
        for key, shape in base.items():
            if key in source and _INV_FREQ.match(key):
                continue
            if key not in source:
                if not _INV_FREQ.match(key):
                    problems.append(f"base tensor {key!r} is not in the delta")
                continue
            if tuple(shape) != tuple(source[key]):
                grows = key in EMBEDDING_KEYS and all(b <= d for b, d in zip(shape, source[key]))
                if not grows:
                    problems.append(
                        f"base tensor {key!r} {list(shape)} does not fit the delta's {list(source[key])}"
                    )
        for key in source:
            if key not in base and not key.startswith(ABSOLUTE_PREFIXES) and not _INV_FREQ.match(key):
                problems.append(
                    f"delta tensor {key!r} has no base tensor (only {ABSOLUTE_PREFIXES} are absolute)"
                )
    if problems:
        raise ConversionError("; ".join(problems))
    return plan


# ---------------------------------------------------------------------- conversion
def load_source_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The GPT4RoI folder's tokenizer; its added tokens must have ``added_tokens.json``'s ids."""
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ConversionError(f"cannot load the tokenizer of {folder}: {exc}") from None
    vocab = tok.get_vocab()
    absent = [t for t in GPT4ROI_TOKENS if t not in vocab]
    if absent:
        raise ConversionError(f"{folder}: tokenizer lacks GPT4RoI's tokens {absent}")
    ids = [vocab[t] for t in GPT4ROI_TOKENS]
    if ids != list(range(ids[0], ids[0] + len(ids))):
        order = dict(zip(GPT4ROI_TOKENS, ids))
        raise ConversionError(
            f"{folder}: added token ids {order} are not GPT4RoI's (consecutive, in this order)"
        )
    added = folder / "added_tokens.json"
    if added.is_file():
        wrong = {t: (i, vocab.get(t)) for t, i in json.loads(added.read_text()).items() if vocab.get(t) != i}
        if wrong:
            raise ConversionError(f"{folder}: token ids differ from added_tokens.json (want, got): {wrong}")
    if tok.pad_token is None:
        tok.pad_token = "[PAD]"
    return tok


def _check_inv_freq(key: str, value: torch.Tensor, hf: dict[str, Any]) -> None:
    head_dim = int(hf["hidden_size"]) // int(hf["num_attention_heads"])
    theta = float(hf["rope_parameters"]["rope_theta"])
    expected = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if value.shape != expected.shape or not torch.allclose(value.float(), expected, rtol=2e-3, atol=1e-6):
        raise ConversionError(f"{key} does not hold the rotary frequencies of rope_theta {theta}")


def _vision_state(vision: str, open_clip_model: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from model.lm import resolve_pretrained

    source: str | Path = vision
    if not Path(vision).exists() and vision not in open_clip.list_pretrained_tags_by_model(open_clip_model):
        source = resolve_pretrained(vision)  # a Hub repo id (openai/clip-vit-large-patch14)
    visual = build_visual(open_clip_model, source)
    return {f"visual.{k}": v.detach().to(dtype).contiguous() for k, v in visual.state_dict().items()}


def convert_gpt4roi(
    out: Path,
    merged: Path | None = None,
    delta: Path | None = None,
    base: Path | None = None,
    vision: str | None = None,
    open_clip_model: str = "ViT-L-14-quickgelu",
    dtype: torch.dtype = torch.float16,
    name: str = "gpt4roi-7b",
    version: str = "1.0.0",
) -> dict[str, Any]:
    """Write the checkpoint folder ``out`` (config.json, model.safetensors, vision.safetensors,
    tokenizer/, version.json); returns a summary (tensors, bytes, seconds)."""
    t0 = time.time()
    if (merged is None) == (delta is None) or (delta is not None) != (base is not None):
        raise ConversionError("give --merged DIR, or --delta DIR with --base LLAMA_DIR")
    src_dir = Path(merged or delta)
    try:
        src_cfg = json.loads((src_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {src_dir / 'config.json'}: {exc}") from None
    tokenizer = load_source_tokenizer(src_dir)
    if int(src_cfg.get("vocab_size", -1)) != len(tokenizer):
        raise ConversionError(
            f"config vocab_size {src_cfg.get('vocab_size')} != tokenizer size {len(tokenizer)}"
        )
    shards = ShardSet(src_dir)
    base_shards = ShardSet(Path(base)) if base is not None else None
    shapes = {k: i.shape for k, i in shards.infos.items()}
    cfg = model_config(src_cfg, shapes, tokenizer, open_clip_model, name)
    plan = plan_conversion(
        shapes,
        target_shapes(cfg),
        {k: i.shape for k, i in base_shards.infos.items()} if base_shards else None,
    )
    vision = vision or src_cfg.get("mm_vision_tower")
    if not vision:
        raise ConversionError("no --vision given and the source config names no mm_vision_tower")

    out.mkdir(parents=True, exist_ok=True)
    vstate = _vision_state(str(vision), open_clip_model, dtype)
    save_file(vstate, str(out / "vision.safetensors"), metadata={"format": "pt"})
    vision_bytes = sum(t.numel() * t.element_size() for t in vstate.values())
    del vstate

    hf = cfg.lm.hf_config or {}
    for key in plan.derived:
        value = shards.get(key)
        if base_shards is not None and key in base_shards.infos:
            value = value.half() + base_shards.get(key).half()
        _check_inv_freq(key, value, hf)
    specs = [(target, plan.shapes[target], dtype) for _, target in plan.order]
    writer = StreamWriter(out / "model.safetensors", specs, {"format": "pt", "source": "gpt4roi"})
    for key, target in plan.order:
        writer.write(target, _merged_tensor(key, shards, base_shards).to(dtype))
    writer.close()
    shards.close()
    if base_shards is not None:
        base_shards.close()

    tokenizer.save_pretrained(str(out / "tokenizer"))
    save_json(cfg.to_dict(), out / "config.json")
    summary = {
        "tensors": len(plan.order),
        "derived_buffers_checked": len(plan.derived),
        "model_bytes": writer.total,
        "vision_bytes": vision_bytes,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(time.time() - t0, 1),
    }
    save_json(
        {
            "version": version,
            "name": name,
            "parent": None,
            "stage": 2,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {
                "converter": "python -m model.convert gpt4roi",
                "kind": "delta" if delta is not None else "merged",
                "source": str(src_dir),
                "base": str(base) if base is not None else None,
                "vision": str(vision),
                "open_clip_model": open_clip_model,
            },
            "conversion": summary,
        },
        out / "version.json",
    )
    return summary


def _merged_tensor(key: str, shards: ShardSet, base: ShardSet | None) -> torch.Tensor:
    """A source tensor, with the delta applied as apply_delta.py does (float16 sums)."""
    value = shards.get(key)
    if base is None or key not in base.infos:
        return value  # merged checkpoint, or mm_projector / spi_module (absolute in the delta)
    b = base.get(key).half()
    value = value.half()
    if value.shape == b.shape:
        return value + b
    out = value.clone()
    out[: b.shape[0], : b.shape[1]] += b  # added tokens' rows are absolute in the delta
    return out
