"""``python -m model.build --config X.json --out DIR``: a model config naming pretrained parts
becomes a servable checkpoint folder.

The config's vision tower (``vision.checkpoint``: an open_clip tag such as ``openai``, an open_clip
or Hugging Face CLIP file or folder, or a Hub repo id) and LM (``lm.pretrained_path`` /
``lm.tokenizer_path``: a Hugging Face folder or Hub repo id) are loaded — Hub names through the
Hugging Face cache, downloaded when online (``HF_HUB_OFFLINE=1``: the cache only) — and written as
``config.json`` + ``model.safetensors`` + ``vision.safetensors`` + ``tokenizer/`` + ``version.json``.
The region encoder and projector start untrained (train them with ``python -m model.train``).
Relative paths in the config are taken from the config file's folder.  A LoRA config keeps the base
outside the folder: referenced by repo id, or by a path relative to ``--out``, plus its hash.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from model.checkpoint import CheckpointError, build_model, load_model, save_checkpoint, smoke_check
from model.config import load_model_config
from model.convert.clip import VisionSourceError
from model.device import DTYPES
from model.lm import BaseMismatchError

__all__ = ["build_folder", "main"]


def build_folder(config: str, out: Path, dtype: torch.dtype = torch.float32, version: str = "0.1.0") -> Path:
    """Build the model of ``config`` (a file, or a bundled config name) and save it to ``out``."""
    path = Path(config)
    root = path.resolve().parent if path.is_file() else None
    cfg = load_model_config(config)
    t0 = time.time()
    model = build_model(cfg, root=root, dtype=dtype)
    if dtype != torch.float32:
        model.to(dtype)  # the new region encoder and projector too
    meta = {
        "version": version,
        "parent": None,
        "stage": 0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "builder": "python -m model.build",
            "config": str(config),
            "seconds": round(time.time() - t0, 1),
        },
    }
    return save_checkpoint(model, out, metadata=meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config", required=True, help="model config file, or a bundled name (gpt4roi-7b)")
    ap.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the stored weights")
    ap.add_argument("--version", default="0.1.0", help="version recorded in version.json")
    ap.add_argument("--check", action="store_true", help="load the folder back and run a smoke forward")
    args = ap.parse_args(argv)
    try:
        folder = build_folder(args.config, args.out, DTYPES[args.dtype], args.version)
        if args.check:
            smoke_check(load_model(folder))
    except (OSError, ValueError, CheckpointError, VisionSourceError, BaseMismatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps({"out": str(folder), "config": json.loads((folder / "config.json").read_text())["name"]})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
