"""The backend's whole new-box request, warm vs cold, with the warm request's time split.

    PYTHONPATH=. .venv/bin/python scripts/bench_new_box.py [--config roi-base] [--pairs 5]

Builds the model of ``--config`` with random weights (the default's tokenizer), draws four boxes on
the bench's 1280x960 JPEG and asks about the fourth (the image and its question tokens now cached),
then ``--pairs`` times asks about a new fifth box - caption, attributes, relations to the four
(``describe_regions(..., only=[[4]])``) - on that engine (warm) and on a fresh one (cold).  Prints
the medians: warm and cold wall time, their ratio, the warm request's question forward and decode
steps (``EngineStats.times``) and the question positions it computed.  Short: for before/after
comparisons of the engine on a shared machine (run both versions alternately, one thread).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from model import bench
from model.checkpoint import DEFAULT_DIR, build_model
from model.config import load_model_config
from model.geometry import boxes_tensor
from model.inference.describe import describe_regions
from model.inference.engine import InferenceEngine
from model.inference.image_input import EncodedImage, decode_rgb
from model.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="roi-base")
    ap.add_argument("--model", default=str(DEFAULT_DIR))
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = build_model(load_model_config(args.config), load_tokenizer(Path(args.model) / "tokenizer")).eval()
    image = decode_rgb((Path(args.model) / bench.SAMPLE_IMAGE).read_bytes())
    photo = bench.jpeg_bytes(image.resize(bench.PHOTO_SIZE, Image.Resampling.BILINEAR))
    rng = random.Random(0)
    width, height = bench.PHOTO_SIZE
    base = boxes_tensor(bench.random_boxes(rng, 4, width, height), width, height)

    def new_engine() -> InferenceEngine:
        return InferenceEngine(model, "bench", max_new_tokens=args.max_new_tokens)

    got: dict[str, list[float]] = {"warm": [], "cold": [], "question": [], "decode": [], "positions": []}
    with torch.inference_mode():
        engine = new_engine()
        describe_regions(engine, [EncodedImage(photo)], [base], only=[[3]])
        for _ in range(args.pairs):
            boxes = torch.cat([base, boxes_tensor(bench.random_boxes(rng, 1, width, height), width, height)])
            for eng, name in ((engine, "warm"), (new_engine(), "cold")):
                times, nodes = eng.stats.times, eng.stats.extra.get("question_nodes", 0)
                question, decode = times.question_s, times.decode_s
                t0 = time.perf_counter()
                describe_regions(eng, [EncodedImage(photo)], [boxes], only=[[4]])
                got[name].append(time.perf_counter() - t0)
                if name == "warm":
                    got["question"].append(times.question_s - question)
                    got["decode"].append(times.decode_s - decode)
                    got["positions"].append(eng.stats.extra.get("question_nodes", 0) - nodes)
    m = {k: statistics.median(v) for k, v in got.items()}
    print(
        f"{args.config}, {torch.get_num_threads()} thread(s), {args.pairs} pairs: "
        f"warm {m['warm'] * 1e3:.0f} ms "
        f"(question forward {m['question'] * 1e3:.0f} ms, {m['positions']:.0f} question positions computed; "
        f"decode steps {m['decode'] * 1e3:.0f} ms), cold {m['cold'] * 1e3:.0f} ms, "
        f"warm / cold {m['warm'] / m['cold']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
