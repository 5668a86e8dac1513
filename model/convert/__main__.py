"""``python -m model.convert gpt4roi (--merged DIR | --delta DIR --base LLAMA_DIR) --vision CLIP
--out DIR [--dtype fp16]``: an official GPT4RoI checkpoint -> a checkpoint folder that
``model.predict``, ``model.train`` and ``scripts/serve.sh`` load.

``--vision``: a Hugging Face CLIP folder or Hub repo id (default: the source config's
``mm_vision_tower``, ``openai/clip-vit-large-patch14``), an open_clip checkpoint file, or an
open_clip pretrained tag (``openai``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.convert.clip import VisionSourceError
from model.convert.gpt4roi import convert_gpt4roi
from model.convert.shards import ConversionError
from model.device import DTYPES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="format", required=True)
    g = sub.add_parser("gpt4roi", help="official GPT4RoI (LLaVA-type) checkpoint")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--merged", type=Path, help="merged GPT4RoI folder (apply_delta output)")
    src.add_argument("--delta", type=Path, help="GPT4RoI delta folder (shilongz/GPT4RoI-7B-delta-V0)")
    g.add_argument("--base", type=Path, help="LLaMA-1 base folder (with --delta)")
    g.add_argument("--vision", default=None, help="CLIP weights: HF folder/repo id, open_clip file or tag")
    g.add_argument("--open-clip-model", default="ViT-L-14-quickgelu", help="open_clip architecture")
    g.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="stored dtype (source: fp16)")
    g.add_argument("--name", default="gpt4roi-7b", help="model name recorded in the folder")
    g.add_argument("--version", default="1.0.0", help="version (MAJOR.MINOR.PATCH) recorded in version.json")
    args = ap.parse_args(argv)
    if args.delta is not None and args.base is None:
        ap.error("--delta needs --base LLAMA_DIR")
    if args.base is not None and args.delta is None:
        ap.error("--base goes with --delta")
    try:
        summary = convert_gpt4roi(
            args.out,
            merged=args.merged,
            delta=args.delta,
            base=args.base,
            vision=args.vision,
            open_clip_model=args.open_clip_model,
            dtype=DTYPES[args.dtype],
            name=args.name,
            version=args.version,
        )
    except (ConversionError, VisionSourceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
