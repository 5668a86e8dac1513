"""Model versions as a trust boundary (issue 14): names that stay inside ``versions/``, a SHA-256
manifest per version, a smoke forward before serving, a memory estimate before allocating,
candidates checked in a child process, bad versions recorded, copies (not links) of the default."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.registry import ModelRegistry, RegistryError
from backend.serving import ModelHolder
from backend.settings import Settings
from model.checkpoint import DEFAULT_DIR, CheckpointError, load_model, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
BAD_NAMES = [
    "../../x", "/etc", "..", ".", "1.0.0/../../x", "1.0", "1.0.0.0", "v1.0.0", "1.0.0 ", "1.0.0\n",
    "", "\uff11.0.0", "1.0.0/", "-1.0.0", "1..0", "1.0.0;rm -rf /", "1" * 40 + ".0.0",
]  # fmt: skip


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds (a state), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def holder_settings(tmp_path: Path, default: Path) -> Settings:
    return Settings(
        model_dir=tmp_path / "models", default_model=default, max_new_tokens=4, model_poll_seconds=0.0
    )


def copy_version(registry: ModelRegistry, source: str, version: str, edit=None) -> Path:
    """Commit a copy of ``source`` as ``version``; ``edit(folder)`` changes the copy before the commit."""
    staged = registry.staging()
    shutil.rmtree(staged)
    shutil.copytree(registry.path(source), staged)
    for p in staged.rglob("*"):
        p.chmod(p.stat().st_mode | 0o200)  # committed files are read-only; the copy is being edited
    if edit is not None:
        edit(staged)
    return registry.commit_folder(staged, version)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_a_weight_bit(weights: Path) -> None:
    """Flip the lowest mantissa bit of a float32 in the middle of the tensor data (still finite)."""
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    pos = start + ((len(data) - start) // 2) // 4 * 4
    data[pos] ^= 0x01
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))


# ---------------------------------------------------------------------- version names
def test_version_names_must_match_the_pattern_and_stay_inside_versions(tiny_registry, tmp_path):
    registry = tiny_registry
    outside = tmp_path / "x"
    shutil.copytree(registry.path("1.0.0"), outside)  # a complete model where ../../x points
    for name in BAD_NAMES:
        for call in (
            lambda n: registry.path(n),
            lambda n: registry.promote(n, reason="test"),
            lambda n: registry.commit_folder(outside, n, copy=True),
            lambda n: registry.next_version(n),
        ):
            with pytest.raises(RegistryError, match="invalid version name"):
                call(name)
    assert registry.current() == "1.0.0" and registry.version_names() == ["1.0.0"]

    # A version folder that is a symlink out of versions/ is neither listed nor served.
    (registry.versions_dir / "9.9.9").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RegistryError, match="outside"):
        registry.path("9.9.9")
    assert registry.version_names() == ["1.0.0"]

    # A pointer file edited to point out of the registry is refused, not followed.
    (registry.root / "current.json").write_text(json.dumps({"version": "../../x", "history": []}))
    with pytest.raises(RegistryError, match="invalid version name"):
        registry.current()


def test_cli_promote_refuses_names_outside_the_registry(tiny_checkpoint, tmp_path):
    root = tmp_path / "models"
    ModelRegistry(root, tiny_checkpoint).ensure_initialized()
    shutil.copytree(tiny_checkpoint, tmp_path / "x")  # where versions/../../x resolves
    env = {**os.environ, "MODEL_DIR": str(root), "DEFAULT_MODEL": str(tiny_checkpoint)}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "backend.registry", "promote", name],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in ("../../x", "/etc")
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, (name, out, err)
        assert "invalid version name" in err and "Traceback" not in err, err
    assert json.loads((root / "current.json").read_text())["version"] == "1.0.0"


# ---------------------------------------------------------------------- copies, not links
def test_seeded_version_is_a_copy_of_the_default_not_a_hard_link(tmp_path):
    registry = ModelRegistry(tmp_path / "real", DEFAULT_DIR)
    registry.ensure_initialized()
    seeded = registry.path("1.0.0")
    for src in DEFAULT_DIR.rglob("*"):
        if src.is_file() and src.name not in ("version.json", "manifest.json"):  # rewritten by the commit
            dst = seeded / src.relative_to(DEFAULT_DIR)
            assert os.stat(dst).st_ino != os.stat(src).st_ino, src
            assert sha256(dst) == sha256(src), src
            assert not dst.stat().st_mode & 0o222, f"{dst} is writable"

    # Editing the registry's copy leaves the source folder intact (checked on a copy of the default,
    # so a regression cannot damage the tracked files).
    source = tmp_path / "default"
    shutil.copytree(DEFAULT_DIR, source)
    before = {p.name: sha256(p) for p in source.iterdir() if p.is_file()}
    other = ModelRegistry(tmp_path / "models", source)
    other.ensure_initialized()
    target = other.path("1.0.0") / "config.json"
    target.chmod(0o644)
    target.write_text("{}")
    assert {p.name: sha256(p) for p in source.iterdir() if p.is_file()} == before


def test_save_checkpoint_copies_a_writable_vision_source(tmp_path, tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    writable = tmp_path / "vision.safetensors"
    shutil.copy(tiny_checkpoint / "vision.safetensors", writable)
    out = save_checkpoint(model, tmp_path / "out", vision_source=writable)
    assert os.stat(out / "vision.safetensors").st_ino != os.stat(writable).st_ino
    assert sha256(out / "vision.safetensors") == sha256(writable)
    # A read-only file (a committed registry version) may be shared by a hard link.
    frozen = tmp_path / "frozen.safetensors"
    shutil.copy(writable, frozen)
    frozen.chmod(0o444)
    linked = save_checkpoint(model, tmp_path / "linked", vision_source=frozen)
    assert sha256(linked / "vision.safetensors") == sha256(frozen)


# ---------------------------------------------------------------------- manifests
def test_the_shipped_default_has_a_manifest_that_matches_its_files():
    from model.checkpoint import MANIFEST, verify_checkpoint

    listed = json.loads((DEFAULT_DIR / MANIFEST).read_text())["files"]
    expected = {"config.json", "model.safetensors", "vision.safetensors", "tokenizer/tokenizer.json"}
    assert set(listed) >= expected
    verify_checkpoint(DEFAULT_DIR)


def test_every_version_records_a_manifest_and_a_flipped_bit_is_refused(tiny_registry, tmp_path):
    from model.checkpoint import MANIFEST, verify_checkpoint

    registry = tiny_registry
    folder = copy_version(registry, "1.0.0", "1.1.0")
    manifest = json.loads((folder / MANIFEST).read_text())["files"]
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
    on_disk = sorted(str(p.relative_to(folder)) for p in files)
    assert sorted(manifest) == on_disk
    assert all(manifest[name]["sha256"] == sha256(folder / name) for name in manifest)
    verify_checkpoint(folder)

    flip_a_weight_bit(folder / "model.safetensors")
    load_model(folder)  # the damage is invisible to the file format: only the manifest catches it
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_checkpoint(folder)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder, verify=True)

    # Serving refuses it, records it as bad and keeps the good version.
    settings = holder_settings(tmp_path, registry.default_model)
    holder = ModelHolder(settings)
    assert holder.get()[1] == "1.0.0"
    registry.promote("1.1.0", reason="test")
    holder.poll(force=True)
    wait_until(lambda: registry.bad_reason("1.1.0"), 60, "1.1.0 to be marked bad")
    assert "model.safetensors" in registry.bad_reason("1.1.0")
    assert holder.get()[1] == "1.0.0" and "1.1.0" in holder.error


def test_unlisted_symlinked_or_outside_files_are_refused(tiny_registry, tmp_path):
    from model.checkpoint import verify_checkpoint

    registry = tiny_registry
    added = copy_version(registry, "1.0.0", "1.1.0")
    (added / "tokenizer" / "added_tokens.json").write_text("{}")  # changes the tokenizer
    with pytest.raises(CheckpointError, match="added_tokens.json"):
        verify_checkpoint(added)

    secret = tmp_path / "secret.txt"
    secret.write_text("not a model file")
    linked = copy_version(registry, "1.0.0", "1.2.0")
    (linked / "notes.txt").symlink_to(secret)
    with pytest.raises(CheckpointError, match="symlink"):
        verify_checkpoint(linked)
    with pytest.raises(RegistryError, match="symlink"):  # never copied into the registry either
        registry.commit_folder(linked, "1.3.0", copy=True)

    def outside_vision(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["vision"]["checkpoint"] = str(registry.path("1.0.0") / "vision.safetensors")
        (folder / "config.json").write_text(json.dumps(cfg))

    absolute = copy_version(registry, "1.0.0", "1.4.0", outside_vision)
    with pytest.raises(CheckpointError, match="inside the checkpoint folder"):
        verify_checkpoint(absolute)


# ---------------------------------------------------------------------- smoke forward
def _nan_fill(folder: Path) -> None:
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.startswith("projector.") and k.endswith("weight"))
    state[name] = torch.full_like(state[name], math.nan)
    save_file(state, str(weights), metadata={"format": "pt"})


def test_nan_weights_with_a_fresh_manifest_are_refused_by_the_smoke_check(tiny_registry, tmp_path, capsys):
    from backend.registry import main
    from model.checkpoint import verify_checkpoint

    registry = tiny_registry
    folder = copy_version(registry, "1.0.0", "1.1.0", _nan_fill)  # the commit writes a fresh manifest
    verify_checkpoint(folder)  # every hash matches: only running the model shows the damage
    with pytest.raises(CheckpointError, match="non-finite"):
        registry.check_version("1.1.0")
    assert "non-finite" in registry.bad_reason("1.1.0")

    # The CLI refuses to promote it and says why; the pointer does not move.
    assert main(["--root", str(registry.root), "promote", "1.1.0"]) != 0
    assert "non-finite" in capsys.readouterr().err
    assert registry.current() == "1.0.0"

    # A version promoted behind the CLI's back is checked before any worker serves it.
    copy_version(registry, "1.0.0", "1.2.0", _nan_fill)
    holder = ModelHolder(holder_settings(tmp_path, registry.default_model))
    assert holder.get()[1] == "1.0.0"
    registry.promote("1.2.0", reason="test")
    holder.poll(force=True)
    wait_until(lambda: registry.bad_reason("1.2.0"), 120, "1.2.0 to be marked bad")
    assert "non-finite" in registry.bad_reason("1.2.0")
    assert holder.get()[1] == "1.0.0" and "1.2.0" in holder.error


# ---------------------------------------------------------------------- memory estimate
def _huge_lm(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    hf = cfg["lm"]["hf_config"]
    hf.pop("head_dim", None)
    hf.update(hidden_size=20_000, intermediate_size=80_000, num_hidden_layers=48)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_huge_config_is_refused_from_its_estimate_before_allocating(tiny_registry, tmp_path):
    registry = tiny_registry
    copy_version(registry, "1.0.0", "1.1.0", _huge_lm)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        registry.check_version("1.1.0")
    message = str(info.value)
    assert "estimate" in message and "available" in message and "MiB" in message, message
    assert time.monotonic() - started < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB: nothing allocated
    assert "estimate" in registry.bad_reason("1.1.0")

    # An explicit budget applies to any version, the small ones too; a later check clears the record.
    copy_version(registry, "1.0.0", "1.3.0")
    with pytest.raises(CheckpointError, match="budget"):
        registry.check_version("1.3.0", memory_budget=2**20)
    assert "budget" in registry.bad_reason("1.3.0")
    registry.check_version("1.3.0")
    assert registry.bad_reason("1.3.0") is None and registry.is_cleared("1.3.0")

    # Serving refuses it without loading, keeps the current version, and does not try again.
    calls: list[str] = []

    def loader(folder: Path, version: str):
        calls.append(version)
        return load_model(folder)

    copy_version(registry, "1.0.0", "1.2.0", _huge_lm)
    holder = ModelHolder(holder_settings(tmp_path, registry.default_model), loader=loader)
    assert holder.get()[1] == "1.0.0"
    registry.promote("1.2.0", reason="test")
    holder.poll(force=True)
    wait_until(lambda: registry.bad_reason("1.2.0"), 60, "1.2.0 to be marked bad")
    attempts = holder.load_attempts.get("1.2.0")
    for _ in range(5):
        holder.poll(force=True)
        assert holder.get()[1] == "1.0.0"
    assert holder.load_attempts.get("1.2.0") == attempts == 1
    assert calls == ["1.0.0"] and "estimate" in holder.error


def test_the_estimate_counts_the_parameters_the_loader_builds(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from model.config import load_model_config
    from model.footprint import estimate_parameters, lm_parameters
    from model.vision import build_clip

    for folder in (tiny_checkpoint, DEFAULT_DIR):
        model = load_model(folder)
        counts = estimate_parameters(load_model_config(folder), folder)

        def n(module: torch.nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        clip = build_clip(model.cfg.vision.open_clip_model)
        assert counts["vision_tower"] == n(model.vision.visual)
        assert counts["clip_text_tower"] == n(clip) - n(clip.visual)
        assert counts["region_encoder"] == n(model.region_encoder)
        assert counts["projector"] == n(model.projector)
        assert counts["lm"] == n(model.lm)
    # A LLaMA-7B-sized LM, built without memory on the meta device.
    cfg = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "tie_word_embeddings": False}  # fmt: skip
    with torch.device("meta"):
        llama = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
        lm = AutoModelForCausalLM.from_config(llama)
    assert lm_parameters(cfg) == sum(p.numel() for p in lm.parameters())


# ---------------------------------------------------------------------- isolation and bad records
def test_a_candidate_that_kills_its_loader_leaves_serving_up(tiny_registry, tmp_path, monkeypatch):
    import backend.registry as registry_module

    def die(*args, **kwargs):  # what the kernel's OOM killer does to a process mid-load
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(registry_module, "run_check", die)
    registry = tiny_registry
    copy_version(registry, "1.0.0", "1.1.0")
    holder = ModelHolder(holder_settings(tmp_path, registry.default_model))
    assert holder.get()[1] == "1.0.0"
    registry.promote("1.1.0", reason="test")
    holder.poll(force=True)
    wait_until(lambda: registry.bad_reason("1.1.0"), 60, "1.1.0 to be marked bad")
    assert "signal 9" in registry.bad_reason("1.1.0")
    for _ in range(3):
        holder.poll(force=True)
        assert holder.get()[1] == "1.0.0"
    assert holder.load_attempts["1.1.0"] == 1


def test_a_restarted_worker_serves_the_last_good_version(tiny_registry, tmp_path):
    registry = tiny_registry
    assert registry.bad_reason("1.0.0") is None
    copy_version(registry, "1.0.0", "1.1.0")
    registry.promote("1.1.0", reason="good")
    copy_version(registry, "1.0.0", "1.2.0", _huge_lm)
    registry.promote("1.2.0", reason="bad")
    calls: list[str] = []

    def loader(folder: Path, version: str):
        calls.append(version)
        return load_model(folder)

    holder = ModelHolder(holder_settings(tmp_path, registry.default_model), loader=loader)
    engine, version = holder.get()  # a fresh gunicorn worker: the current version cannot load
    assert version == "1.1.0" and calls == ["1.1.0"]
    assert "1.2.0" in holder.error and "estimate" in registry.bad_reason("1.2.0")
    assert registry.current() == "1.2.0"  # the operator's pointer is left as it is

    # A second fresh worker does not try the recorded bad version again.
    calls.clear()
    assert ModelHolder(holder_settings(tmp_path, registry.default_model), loader=loader).get()[1] == "1.1.0"
    assert calls == ["1.1.0"]
    with pytest.raises(RegistryError, match="marked bad"):
        registry.promote("1.2.0", reason="again")
