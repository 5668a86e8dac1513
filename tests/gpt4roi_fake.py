"""Fake official GPT4RoI folders at reduced sizes (official key names, LLaVA-type config.json,
SentencePiece tokenizer with GPT4RoI's 6 added tokens) for the converter's tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.convert.gpt4roi import GPT4ROI_TOKENS

SPM_VOCAB = 300
TINY = {"hidden": 64, "layers": 2, "heads": 4, "inter": 128, "vocab": SPM_VOCAB + len(GPT4ROI_TOKENS)}
TINY_REGION = {"fuse": 32, "roi": 2, "region_hidden": 48, "pos_hidden": 16}
TINY_CLIP = {"width": 32, "layers": 12, "heads": 2, "image_size": 56, "patch": 14}
TINY_OPEN_CLIP = "roi-vit-test-quickgelu"
CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "The image provides an overview of the picture.",
    "What is in region1? a red square at the top left of the picture",
    "### Human: describe region2 ### Assistant: a small dog next to a blue car",
]


def official_layout(
    hidden: int,
    layers: int,
    inter: int,
    vocab: int,
    clip_width: int,
    fuse: int | None = None,
    levels: int = 4,
    num_fuse: int = 5,
    roi: int = 14,
    pos_hidden: int = 256,
    region_hidden: int = 1024,
    inv_freq_dim: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official GPT4RoI state dict (spi_llava.py / layers.py names, written out
    from the official module definitions, not from this project's modules)."""
    f = fuse or clip_width
    s: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            s[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
        s[p + "mlp.gate_proj.weight"] = (inter, hidden)
        s[p + "mlp.up_proj.weight"] = (inter, hidden)
        s[p + "mlp.down_proj.weight"] = (hidden, inter)
        s[p + "input_layernorm.weight"] = (hidden,)
        s[p + "post_attention_layernorm.weight"] = (hidden,)
        if inv_freq_dim:
            s[p + "self_attn.rotary_emb.inv_freq"] = (inv_freq_dim // 2,)
    s["model.norm.weight"] = (hidden,)
    r = "model.spi_module."
    for i in range(levels):
        s[r + f"mlvl_fuse.input_conv.{i}.weight"] = (f, clip_width + 2, 1, 1)
        s[r + f"mlvl_fuse.input_conv.{i}.bias"] = (f,)
        s[r + f"roi_align.pconvs.{i}.weight"] = (f, f, 3, 3)
        s[r + f"roi_align.pconvs.{i}.bias"] = (f,)
    for i in range(num_fuse):
        s[r + f"mlvl_fuse.fuse_convs.{i}.conv.weight"] = (f, f, 3, 3)
        s[r + f"mlvl_fuse.fuse_convs.{i}.gn.weight"] = (f,)
        s[r + f"mlvl_fuse.fuse_convs.{i}.gn.bias"] = (f,)
    pos = {"0": (pos_hidden, 4), "2": (pos_hidden,), "3": (region_hidden, pos_hidden), "5": (region_hidden,)}
    for idx, shape in pos.items():
        s[r + f"roi_align.pos_embedd.{idx}.weight"] = shape
        s[r + f"roi_align.pos_embedd.{idx}.bias"] = (shape[0],)
    s[r + "roi_align.flatten_linear.weight"] = (region_hidden, f * roi * roi)
    s[r + "roi_align.flatten_linear.bias"] = (region_hidden,)
    s[r + "roi_align.updims.weight"] = (hidden, region_hidden)
    s[r + "roi_align.updims.bias"] = (hidden,)
    s["model.mm_projector.weight"] = (hidden, clip_width)
    s["model.mm_projector.bias"] = (hidden,)
    return s


def llava_config(hidden: int, layers: int, heads: int, inter: int, vocab: int, clip_width: int) -> dict:
    """A config.json as the official checkpoint's (transformers 4.29 LLaVA type)."""
    return {
        "_name_or_path": "gpt4roi-7b",
        "architectures": ["SPILlavaMPTForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": 1,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_sequence_length": 2048,
        "mm_hidden_size": clip_width,
        "mm_use_im_start_end": True,
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "model_type": "llava",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": -1,
        "rms_norm_eps": 1e-06,
        "sep_image_conv_front": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.28.0.dev0",
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vocab_size": vocab,
    }


def write_tokenizer(folder: Path, added: bool = True) -> None:
    """A LLaMA-style SentencePiece tokenizer (tokenizer.model, byte fallback) with GPT4RoI's
    added_tokens.json (ids from 300), as the official folder ships it."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 40),
        model_writer=buf,
        vocab_size=SPM_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 2048,
                "add_bos_token": True,
                "add_eos_token": False,
            }
        )  # fmt: skip
    )
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if added:
        special["pad_token"] = "[PAD]"
        ids = {name: SPM_VOCAB + i for i, name in enumerate(GPT4ROI_TOKENS)}
        (folder / "added_tokens.json").write_text(json.dumps(ids))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


def random_state(
    shapes: dict[str, tuple[int, ...]], seed: int, hidden: int, heads: int
) -> dict[str, torch.Tensor]:
    """fp16 values (LayerNorm/GroupNorm weights near 1, rotary buffers exact)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("inv_freq"):
            d = hidden // heads
            state[key] = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        elif (
            key.endswith("norm.weight")
            or ".gn.weight" in key
            or "pos_embedd.2.weight" in key
            or "pos_embedd.5.weight" in key
        ):
            state[key] = (1 + 0.1 * torch.randn(shape, generator=g)).half()
        else:
            state[key] = (0.05 * torch.randn(shape, generator=g)).half()
    return state


def save_shards(state: dict[str, torch.Tensor], folder: Path, fmt: str, shards: int = 2) -> None:
    """Write ``state`` as a sharded Hugging Face checkpoint with its index (``bin`` or
    ``safetensors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    parts = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        if fmt == "bin":
            name = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
            torch.save({k: state[k].clone() for k in part}, folder / name)
        else:
            name = f"model-{i:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k].contiguous() for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_gpt4roi(folder: Path, fmt: str = "bin", seed: int = 0) -> dict[str, torch.Tensor]:
    """A merged GPT4RoI folder at reduced sizes; returns its state dict."""
    t, r, c = TINY, TINY_REGION, TINY_CLIP
    shapes = official_layout(
        t["hidden"], t["layers"], t["inter"], t["vocab"], c["width"], fuse=r["fuse"], roi=r["roi"],
        pos_hidden=r["pos_hidden"], region_hidden=r["region_hidden"], inv_freq_dim=t["hidden"] // t["heads"],
    )  # fmt: skip
    state = random_state(shapes, seed, t["hidden"], t["heads"])
    save_shards(state, folder, fmt)
    cfg = llava_config(t["hidden"], t["layers"], t["heads"], t["inter"], t["vocab"], c["width"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(folder)
    return state


def make_delta(merged: dict[str, torch.Tensor], delta_dir: Path, base_dir: Path, fmt: str, seed: int = 1):
    """A LLaMA base (vocab 300) and the delta that gives ``merged`` back (as make_delta.py: the
    shared keys minus the base, added-token rows and the GPT4RoI modules absolute)."""
    t = TINY
    g = torch.Generator().manual_seed(seed)
    base = {}
    for key, value in merged.items():
        if key.startswith(("model.spi_module.", "model.mm_projector.")):
            continue
        if key.endswith("inv_freq"):
            base[key] = value.clone()
            continue
        shape = list(value.shape)
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            shape[0] = SPM_VOCAB
        base[key] = (0.05 * torch.randn(shape, generator=g)).half()
    delta = {}
    for key, value in merged.items():
        if key not in base:
            delta[key] = value.clone()
        elif key.endswith("inv_freq"):
            delta[key] = torch.zeros_like(value)
        else:
            d = value.clone()
            d[: base[key].shape[0]] -= base[key]
            delta[key] = d
    save_shards(delta, delta_dir, fmt)
    cfg = llava_config(t["hidden"], t["layers"], t["heads"], t["inter"], t["vocab"], TINY_CLIP["width"])
    (delta_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(delta_dir)
    save_shards(base, base_dir, fmt)
    base_cfg = {
        k: v for k, v in cfg.items() if not k.startswith(("mm_", "use_mm", "sep_", "tune_", "freeze_"))
    }
    base_cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=SPM_VOCAB)
    (base_dir / "config.json").write_text(json.dumps(base_cfg, indent=2))
    return delta, base


def make_hf_clip(folder: Path, seed: int = 0) -> Path:
    """A Hugging Face CLIPVisionModel folder (QuickGELU, like openai/clip-vit-large-patch14) of
    the ``roi-vit-test-quickgelu`` shape."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    c = TINY_CLIP
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=c["width"], intermediate_size=4 * c["width"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], image_size=c["image_size"], patch_size=c["patch"],
        hidden_act="quick_gelu",
    )  # fmt: skip
    CLIPVisionModel(cfg).save_pretrained(str(folder))
    return folder
