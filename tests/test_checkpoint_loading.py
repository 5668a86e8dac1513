"""Checkpoint round trip, refusal of damaged checkpoints, and the real loading paths
(open_clip checkpoint file, Hugging Face LM folder, LoRA)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from model.checkpoint import CheckpointError, build_model, load_model, save_checkpoint
from model.config import load_model_config
from model.data.dataset import RecordDataset, collate_samples
from model.geometry import boxes_tensor
from model.inference.engine import InferenceEngine
from model.vision import VisionTower, build_clip
from tests.model_helpers import tiny_model, tiny_records, tiny_tokenizer


def _logits(m, records):
    ds = RecordDataset(records, m)
    batch = collate_samples(m, [ds[i] for i in range(len(records))])
    batch["labels"] = None
    with torch.no_grad():
        return m.eval()(**batch).logits


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    m = tiny_model(seed=1)
    recs = [tiny_records(3)[i] for i in range(3)]
    before = _logits(m, recs)
    save_checkpoint(m, tmp_path / "ckpt", metadata={"version": "9.9.9"})
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer", "version.json", "vision.safetensors"]
    loaded = load_model(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, recs), before)
    rec = recs[0]
    boxes = boxes_tensor(rec["boxes"], rec["width"], rec["height"])
    q = [(0, "What is <region1>?")]
    assert InferenceEngine(loaded).answer([rec["image"]], [boxes], q) == InferenceEngine(m).answer(
        [rec["image"]], [boxes], q
    )


def test_truncated_or_tampered_checkpoint_is_refused(tmp_path):
    m = tiny_model()
    folder = save_checkpoint(m, tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_model(folder)
    # A well-formed file whose tensors do not belong to this architecture.
    save_file({"region_encoder.bogus": torch.zeros(2)}, str(weights))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model(folder)


def test_pickle_files_are_never_loaded(tmp_path):
    m = tiny_model()
    folder = save_checkpoint(m, tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_full_checkpoint_file_loads_into_the_vision_tower(tmp_path, suffix):
    torch.manual_seed(5)
    clip = build_clip("roi-vit-test")
    path = tmp_path / f"open_clip_model{suffix}"
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    cfg = load_model_config("roi-test").vision
    cfg.checkpoint = str(path)
    tower = VisionTower(cfg)
    for name, tensor in clip.visual.state_dict().items():
        assert torch.equal(tower.visual.state_dict()[name], tensor), name
    cfg.checkpoint = str(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="open_clip checkpoint not found"):
        VisionTower(cfg)


def _save_hf_lm(folder):
    torch.manual_seed(7)
    tok = tiny_tokenizer()
    lm = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return lm


def test_language_model_from_local_hugging_face_folder(tmp_path):
    lm = _save_hf_lm(tmp_path / "hf-lm")
    cfg = load_model_config("roi-test")
    cfg.lm.hf_config = None
    cfg.lm.pretrained_path = str(tmp_path / "hf-lm")
    cfg.lm.tokenizer_path = str(tmp_path / "hf-lm")
    m = build_model(cfg)
    for name, tensor in lm.state_dict().items():
        assert torch.equal(m.lm.state_dict()[name], tensor), name
    # The saved folder stands alone: its config records the LM architecture, not the source path.
    save_checkpoint(m, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["lm"]["pretrained_path"] is None and saved["lm"]["hf_config"]["model_type"] == "llama"
    (tmp_path / "hf-lm" / "model.safetensors").unlink()
    loaded = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.lm.get_input_embeddings().weight, m.lm.get_input_embeddings().weight)


def test_lora_stage2_trains_adapters_not_the_base_lm(tmp_path):
    _save_hf_lm(tmp_path / "hf-lm")
    cfg = load_model_config("roi-test")
    cfg.lm.hf_config = None
    cfg.lm.pretrained_path = str(tmp_path / "hf-lm")
    cfg.lm.tokenizer_path = str(tmp_path / "hf-lm")
    cfg.lm.lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    m = build_model(cfg)
    m.set_stage(2)
    lm_trainable = [n for n in m.trainable_parameter_names() if n.startswith("lm.")]
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    assert any(n.startswith("projector.") for n in m.trainable_parameter_names())
    # A job's freeze on a LoRA model: the region encoder held, the adapters still trained; the LM
    # held, no adapter trained either.
    m.set_stage(2, ["region_encoder"])
    names = m.trainable_parameter_names()
    assert not any(n.startswith("region_encoder.") for n in names) and lm_trainable == [
        n for n in names if n.startswith("lm.")
    ]
    m.set_stage(2, ["lm"])
    assert {n.split(".")[0] for n in m.trainable_parameter_names()} == {"region_encoder", "projector"}
