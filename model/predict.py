"""One-off question about regions of an image.

    python -m model.predict img.png --box 10,20,80,90 --box 100,20,150,60 \
        "How is <region1> related to <region2>?"

Boxes are ``x0,y0,x1,y1`` in pixels of the image; ``<regionN>`` refers to the N-th ``--box``.
Without a question, every box gets a caption and attributes (and relations between boxes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from model.geometry import BoxError, boxes_tensor
from model.prompt import PromptError, expand_regions

__all__ = ["main"]


def _parse_box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"box {text!r} is not four comma-separated numbers") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"box {text!r} needs 4 numbers x0,y0,x1,y1")
    return values


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint import DEFAULT_DIR, load_model, read_metadata
    from model.device import DTYPES, parse_dtype, pick_device
    from model.inference.describe import answer_with_presence, describe_regions
    from model.inference.engine import InferenceEngine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", type=Path)
    ap.add_argument("question", nargs="?", default=None)
    ap.add_argument("--box", type=_parse_box, action="append", required=True, help="x0,y0,x1,y1 in pixels")
    ap.add_argument("--model", default=str(DEFAULT_DIR), help="checkpoint folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
        help="weights' dtype (auto: bf16 on CUDA, fp32 on CPU; bf16 halves a large model's memory)",
    )  # fmt: skip
    ap.add_argument("--max-new-tokens", type=int, default=32)
    # Intermixed: the question may follow the --box options (argparse otherwise binds both
    # positionals at the first one and rejects a question given after --box).
    args = ap.parse_intermixed_args(argv)
    try:
        with Image.open(args.image) as im:
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        ap.error(f"cannot read image {args.image}: {exc}")
    try:
        boxes = boxes_tensor(args.box, image.width, image.height)
    except BoxError as exc:
        ap.error(str(exc))
    device = pick_device(args.device)
    model = load_model(args.model, device=device, dtype=parse_dtype(args.dtype, device))
    engine = InferenceEngine(
        model, read_metadata(args.model).get("version", "?"), max_new_tokens=args.max_new_tokens
    )
    if args.question:
        try:
            _, order = expand_regions(args.question, len(boxes))
            # A box the model calls empty is answered "no object", as the backend answers it.
            ((answer, empty),) = answer_with_presence(engine, image, boxes, [(args.question, order)])
        except (PromptError, ValueError) as exc:
            ap.error(str(exc))
        if empty:
            named = ", ".join(str(k + 1) for k in empty)
            print(f"(the model sees no object in region {named})", file=sys.stderr)
        print(answer.text)
        print(f"(confidence {answer.score:.3f})", file=sys.stderr)
        return 0
    (report,) = describe_regions(engine, [image], [boxes])
    out = {
        "regions": [
            {
                "region": i + 1,
                "caption": r.caption.text,
                **({"empty": True} if r.empty else {}),
                **{k: a.text for k, a in r.attributes.items()},
            }
            for i, r in enumerate(report.regions)
        ],
        "relations": [
            {"from": rel.source + 1, "to": rel.target + 1, "labels": rel.labels} for rel in report.relations
        ],
        "score": round(report.score, 4),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
