"""``python -m model.build``: configs naming pretrained parts by Hub repo id, resolved through a
Hugging Face cache written here (``HF_HOME``, ``HF_HUB_OFFLINE=1``), so the hub code path itself
runs; LM loading in the target dtype; LoRA folders holding adapters only, with a base hash."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from model.lm import base_fingerprint
from tests.gpt4roi_fake import SPM_VOCAB, TINY_OPEN_CLIP, make_hf_clip, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LM_REPO = "tiny-org/tiny-llama"
CLIP_REPO = "tiny-org/tiny-clip"


def cache_repo(hf_home: Path, repo: str, files: Path, revision: str = "0" * 40) -> Path:
    """Put the files of ``files`` into ``hf_home`` in huggingface_hub's cache layout: blobs named
    by their SHA-256, a snapshot of symlinks, refs/main naming the snapshot."""
    base = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / revision
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in files.rglob("*") if p.is_file()):
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        blob = base / "blobs" / digest
        shutil.copyfile(src, blob)
        link = snapshot / src.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An HF_HOME holding a tiny LLaMA (SentencePiece tokenizer without GPT4RoI's tokens) and a
    tiny Hugging Face CLIP vision model, both under repo ids."""
    tmp = tmp_path_factory.mktemp("hub")
    lm_dir = tmp / "src-lm"
    write_tokenizer(lm_dir, added=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=SPM_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(str(lm_dir))
    hf_home = tmp / "hf"
    cache_repo(hf_home, LM_REPO, lm_dir)
    cache_repo(hf_home, CLIP_REPO, make_hf_clip(tmp / "src-clip"))
    return hf_home, load_file(str(lm_dir / "model.safetensors"))


def model_config(tmp: Path, **lm) -> Path:
    cfg = {
        "name": "tiny-pretrained",
        "vision": {"open_clip_model": TINY_OPEN_CLIP, "checkpoint": CLIP_REPO, "width": 32,
                   "image_token_layer": -2, "region_layers": [2, 5, 8, 11], "preprocess": "gpt4roi"},
        "region": {"fuse_channels": 16, "level_sizes": [16, 8, 4, 4], "num_fuse": 1, "gn_groups": 4,
                   "roi_output_size": 2, "hidden_dim": 32, "pos_hidden_dim": 16},
        "lm": {"pretrained_path": LM_REPO, "tokenizer_path": LM_REPO, "max_length": 512, **lm},
        "prompt": {"template": "gpt4roi_v0"},
    }  # fmt: skip
    path = tmp / "cfg" / "model.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def run(hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )


LOAD_AND_REPORT = """
import json, sys, torch
from model.checkpoint import load_model
from model.convert.gpt4roi import GPT4ROI_TOKENS
m = load_model(sys.argv[1])
emb = m.lm.get_input_embeddings().weight
ids = [m.tokenizer.convert_tokens_to_ids(t) for t in GPT4ROI_TOKENS]
print(json.dumps({"ids": ids, "rows": emb.shape[0]}))
"""


def test_build_from_hub_names(hub, tmp_path):
    hf_home, lm_state = hub
    out = tmp_path / "built"
    proc = run(
        hf_home, "-m", "model.build", "--config", str(model_config(tmp_path)), "--out", str(out), "--check"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lm"]["pretrained_path"] is None and cfg["lm"]["tokenizer_path"] == "tokenizer"
    assert cfg["vision"]["checkpoint"] == "vision.safetensors" and cfg["vision"]["image_size"] == 56
    state = load_file(str(out / "model.safetensors"))
    emb = state["lm.model.embed_tokens.weight"]
    assert emb.shape[0] == SPM_VOCAB + 6
    assert torch.equal(emb[:SPM_VOCAB], lm_state["model.embed_tokens.weight"])
    mean = lm_state["model.embed_tokens.weight"].mean(0)
    assert torch.allclose(emb[SPM_VOCAB:], mean.expand(6, -1), atol=1e-7)  # exactly the mean, not a draw
    head = state["lm.lm_head.weight"]
    assert torch.allclose(head[SPM_VOCAB:], lm_state["lm_head.weight"].mean(0).expand(6, -1), atol=1e-7)
    report = run(hf_home, "-c", LOAD_AND_REPORT, str(out))
    assert report.returncode == 0, report.stderr[-3000:]
    ids = json.loads(report.stdout.strip().splitlines()[-1])["ids"]
    assert ids == list(range(SPM_VOCAB, SPM_VOCAB + 6))  # [PAD] <im_patch> <bbox> <point> <im_start> <im_end>


def test_offline_without_cache_entry_is_a_clear_error(hub, tmp_path):
    hf_home, _ = hub
    path = model_config(tmp_path, pretrained_path="tiny-org/not-cached", tokenizer_path="tiny-org/not-cached")
    proc = run(hf_home, "-m", "model.build", "--config", str(path), "--out", str(tmp_path / "x"))
    assert proc.returncode == 1 and "tiny-org/not-cached" in proc.stderr and "Traceback" not in proc.stderr


def test_build_in_target_dtype(hub, tmp_path):
    hf_home, _ = hub
    out = tmp_path / "bf16"
    proc = run(
        hf_home,
        "-m",
        "model.build",
        "--config",
        str(model_config(tmp_path)),
        "--out",
        str(out),
        "--dtype",
        "bf16",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_lora_folder_holds_adapters_and_refuses_another_base(hub, tmp_path):
    hf_home, _ = hub
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    out = tmp_path / "lora"
    proc = run(
        hf_home, "-m", "model.build", "--config", str(model_config(tmp_path, lora=lora)), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lm"]["pretrained_path"] == LM_REPO and len(cfg["lm"]["base_sha256"]) == 64
    keys = set(load_file(str(out / "model.safetensors")))
    lm_keys = {k for k in keys if k.startswith("lm.")}
    assert lm_keys and all("lora_" in k for k in lm_keys)
    assert any(k.startswith("region_encoder.") for k in keys) and "projector.weight" in keys
    assert run(hf_home, "-c", LOAD_AND_REPORT, str(out)).returncode == 0
    # Another base under the same repo id: refused with the reason.
    snapshot = next((hf_home / "hub" / f"models--{LM_REPO.replace('/', '--')}" / "snapshots").iterdir())
    weights = snapshot / "model.safetensors"
    other = {k: v + 1 for k, v in load_file(str(weights)).items()}
    from safetensors.torch import save_file

    fresh = tmp_path / "other.safetensors"
    save_file(other, str(fresh))
    weights.unlink()
    shutil.copyfile(fresh, weights)
    proc = run(hf_home, "-c", LOAD_AND_REPORT, str(out))
    assert proc.returncode != 0 and "trained on" in proc.stderr


def test_lora_on_a_local_base_keeps_a_relative_path(tmp_path, hub):
    hf_home, _ = hub
    snapshot = next((hf_home / "hub" / f"models--{LM_REPO.replace('/', '--')}" / "snapshots").iterdir())
    local = tmp_path / "models" / "tiny-llama"
    shutil.copytree(snapshot, local, symlinks=False)
    lora = {"r": 2, "target_modules": ["q_proj"]}
    path = model_config(
        tmp_path, lora=lora, pretrained_path="../models/tiny-llama", tokenizer_path="../models/tiny-llama"
    )
    out = tmp_path / "versions" / "v1"
    proc = run(hf_home, "-m", "model.build", "--config", str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lm"]["pretrained_path"] == "../../models/tiny-llama"
    assert cfg["lm"]["base_sha256"] == base_fingerprint(local)
    assert run(hf_home, "-c", LOAD_AND_REPORT, str(out)).returncode == 0


REGISTRY_CHECK = """
import json, shutil, sys
from pathlib import Path
from backend.registry import ModelRegistry
from model.checkpoint import CheckpointError
registry = ModelRegistry(Path(sys.argv[2]))
staged = registry.staging()
shutil.rmtree(staged)
shutil.copytree(sys.argv[1], staged)
registry.commit_folder(staged, sys.argv[3])
try:
    print(json.dumps({"ok": True, **registry.check_version(sys.argv[3])}))
except CheckpointError as exc:
    print(json.dumps({"ok": False, "error": str(exc)}))
"""


def test_lora_version_on_a_local_base_passes_the_registry_check(tmp_path, hub):
    """A LoRA version references its base outside the folder (by path + weights hash): the
    registry's manifest check accepts it, loads it and runs the smoke forward; once the base's
    weights change, the check refuses the version with the reason."""
    hf_home, _ = hub
    snapshot = next((hf_home / "hub" / f"models--{LM_REPO.replace('/', '--')}" / "snapshots").iterdir())
    local = tmp_path / "models" / "tiny-llama"
    shutil.copytree(snapshot, local, symlinks=False)
    path = model_config(
        tmp_path, lora={"r": 2, "target_modules": ["q_proj"]}, pretrained_path="../models/tiny-llama",
        tokenizer_path="../models/tiny-llama",
    )  # fmt: skip
    built = tmp_path / "built" / "v1"  # two levels below tmp_path, as registry versions are
    proc = run(hf_home, "-m", "model.build", "--config", str(path), "--out", str(built))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(hf_home, "-c", REGISTRY_CHECK, str(built), str(tmp_path), "1.1.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"], report
    weights = local / "model.safetensors"
    changed = {k: v + 1 for k, v in load_file(str(weights)).items()}
    from safetensors.torch import save_file

    save_file(changed, str(weights))
    proc = run(hf_home, "-c", REGISTRY_CHECK, str(built), str(tmp_path), "1.2.0")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["ok"] and "trained on" in report["error"], report


def test_full_version_pointing_outside_its_folder_is_refused(tmp_path):
    """Without LoRA (no base hash) every path of a version's config stays inside its folder."""
    from model.checkpoint import CheckpointError, verify_checkpoint, write_manifest

    folder = tmp_path / "v"
    shutil.copytree(ROOT / "model" / "default", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["lm"]["pretrained_path"] = "../elsewhere"
    (folder / "config.json").write_text(json.dumps(cfg))
    write_manifest(folder)
    with pytest.raises(CheckpointError, match="inside the checkpoint folder"):
        verify_checkpoint(folder)
