"""Inference benchmark: batched engine vs the naive per-box loop, measured side by side.

    python -m model.bench [--model model/default] [--repeats 3] [--json out.json]

Prints (median of ``--repeats``):
* K = 1, 4, 16, 64 boxes on one image, one caption question per box: engine (cold image cache)
  vs naive loop (per box: encode the image, build the prompt, ``generate``) - time and ratio;
* interactive: a new box on an image already seen vs on a cold image - latency ratio, with the
  image given decoded and as a JPEG file (what a server receives; decoded only on a cache miss)
  at the scene's size and at 1280x960, beside warm requests that decode the file each time; and
  for the backend's whole request about a new box (caption, attributes, relations);
* decode throughput (generated tokens/s) at batch 1 and 16, and the share of the machine's
  measured float32 matmul FLOP/s that it reaches (2 x LM parameters FLOPs per token);
* peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from model.checkpoint import DEFAULT_DIR
from model.geometry import boxes_tensor
from model.inference.describe import describe_regions
from model.inference.engine import InferenceEngine
from model.inference.image_input import EncodedImage, ImageLike, decode_rgb, encode_image
from model.inference.reference import generate_naive
from model.tasks import CAPTION_QUESTION

__all__ = ["format_results", "main", "run"]

# A scene of the default's world shipped beside its weights (``--image`` picks another picture).
SAMPLE_IMAGE = "sample.png"


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(size: int = 1024, seconds: float = 1.0) -> float:
    """Measured float32 matmul FLOP/s of this machine (all torch threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0)


def random_boxes(rng: random.Random, k: int, w: int, h: int) -> list[list[float]]:
    boxes = []
    for _ in range(k):
        bw, bh = rng.uniform(0.1, 0.4) * w, rng.uniform(0.1, 0.4) * h
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes.append([x0, y0, x0 + bw, y0 + bh])
    return boxes


PHOTO_SIZE = (1280, 960)  # a typical photo as annotators upload it


def jpeg_bytes(image: Image.Image) -> bytes:
    """The bench's image files: ``image`` as a JPEG at quality 90."""
    return encode_image(image, "JPEG", quality=90)


def interactive_latency(
    new_engine: Callable[[], InferenceEngine],
    image_input: Callable[[], ImageLike],
    rng: random.Random,
    samples: int,
    decoded_input: Callable[[], ImageLike] | None = None,
    full: bool = False,
) -> dict:
    """Median latency of a request asking about one box just drawn (four boxes already on the
    image): on an image the engine has seen (warm) vs on a fresh engine (cold).  ``image_input()``
    is what a request hands the engine (a new object per request); with ``decoded_input``, warm
    requests handing it that instead are timed too, interleaved (``warm_decoded_s``).  The request
    is the box's caption, or with ``full`` what the backend asks for a box drawn with the bundled
    label config: caption, every attribute and the relations to the other boxes."""

    def ask(engine: InferenceEngine, image: ImageLike, boxes: torch.Tensor) -> None:
        if full:
            describe_regions(engine, [image], [boxes], only=[[len(boxes) - 1]])
        else:
            engine.answer([image], [boxes], [(0, CAPTION_QUESTION.format(a=f"<region{len(boxes)}>"))])

    engine = new_engine()
    probe = image_input()
    width, height = probe.size
    base = boxes_tensor(random_boxes(rng, 4, width, height), width, height)
    ask(engine, probe, base)
    warm_times, cold_times, decoded_times = [], [], []
    for _ in range(samples):
        new_box = boxes_tensor(random_boxes(rng, 1, width, height), width, height)
        boxes = torch.cat([base, new_box])
        t0 = time.perf_counter()
        ask(engine, image_input(), boxes)
        warm_times.append(time.perf_counter() - t0)
        if decoded_input is not None:
            t0 = time.perf_counter()
            ask(engine, decoded_input(), boxes)
            decoded_times.append(time.perf_counter() - t0)
        cold = new_engine()
        t0 = time.perf_counter()
        ask(cold, image_input(), boxes)
        cold_times.append(time.perf_counter() - t0)
    warm, cold_t = statistics.median(warm_times), statistics.median(cold_times)
    row = {"warm_s": warm, "cold_s": cold_t, "ratio": warm / cold_t}
    if decoded_times:
        row["warm_decoded_s"] = statistics.median(decoded_times)
    return row


def run(
    model_dir: str,
    repeats: int = 3,
    ks: tuple[int, ...] = (1, 4, 16, 64),
    config: str | None = None,
    lean: bool = True,
    max_new: int = 16,
    image_path: str | None = None,
) -> dict:
    """Every figure of the module docstring for the checkpoint ``model_dir``; with ``config``, for a
    model of that config with random weights (and ``model_dir``'s tokenizer) instead: the same
    engine on a model of realistic proportions, where the image encode and the prefix cost what
    they cost in practice.  ``lean=False`` runs every LM forward through the library (no
    :class:`model.inference.kv_decode.LlamaSteps`), for comparison."""
    from model.checkpoint import build_model, load_model, read_metadata

    if config is None:
        model = load_model(model_dir)
        version = read_metadata(model_dir).get("version", "?")
    else:
        from model.config import load_model_config
        from model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(model_dir) / "tokenizer")
        model = build_model(load_model_config(config), tokenizer).eval()
        version = f"{config} (random weights)"
    rng = random.Random(0)
    image = decode_rgb(Path(image_path or Path(model_dir) / SAMPLE_IMAGE).read_bytes())
    results: dict = {
        "boxes": [],
        "threads": torch.get_num_threads(),
        "model": version,
        "lean": lean,
        "max_new_tokens": max_new,
    }

    for k in ks:
        boxes = boxes_tensor(random_boxes(rng, k, image.width, image.height), image.width, image.height)
        queries = [(0, CAPTION_QUESTION.format(a=f"<region{i + 1}>")) for i in range(k)]

        def engine_run(boxes=boxes, queries=queries) -> None:
            InferenceEngine(model, version, max_new_tokens=max_new, lean=lean).answer(
                [image], [boxes], queries
            )

        def naive_run(boxes=boxes, queries=queries) -> None:
            for _, q in queries:
                generate_naive(model, model.processor(image), boxes, q, max_new_tokens=max_new)

        t_engine = _median_time(engine_run, repeats)
        t_naive = _median_time(naive_run, repeats)
        results["boxes"].append(
            {"k": k, "engine_s": t_engine, "naive_s": t_naive, "speedup": t_naive / t_engine}
        )

    # Interactive: one new box on an image whose prefix is cached vs on a cold image; the image
    # given decoded, and as the JPEG file a server receives (at the scene's size and a photo's).
    def new_engine() -> InferenceEngine:
        return InferenceEngine(model, version, max_new_tokens=max_new, lean=lean)

    samples = max(15, 3 * repeats)  # single requests are short: more samples for a stable median
    results["interactive"] = interactive_latency(new_engine, lambda: image, rng, samples)
    results["interactive_files"] = []
    for size in (image.size, PHOTO_SIZE):
        data = jpeg_bytes(image.resize(size, Image.Resampling.BILINEAR))
        row = interactive_latency(
            new_engine,
            lambda data=data: EncodedImage(data),
            rng,
            samples,
            decoded_input=lambda data=data: decode_rgb(data),  # the file decoded per request
        )
        results["interactive_files"].append({"size": list(size), "jpeg_bytes": len(data), **row})
    scene_file = jpeg_bytes(image)
    results["interactive_full"] = interactive_latency(
        new_engine, lambda: EncodedImage(scene_file), rng, samples, full=True
    )

    # Decode throughput at batch 1 and 16 (prefix cached, so this is decode-dominated).
    flops = matmul_flops()
    lm = model.lm
    lm_params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    results["matmul_gflops"] = flops / 1e9
    results["decode"] = []
    boxes16 = boxes_tensor(random_boxes(rng, 16, image.width, image.height), image.width, image.height)
    for batch in (1, 16):
        eng = InferenceEngine(model, version, max_new_tokens=max_new, lean=lean)
        queries = [(0, CAPTION_QUESTION.format(a=f"<region{i + 1}>")) for i in range(batch)]
        eng.answer([image], [boxes16], queries)  # warm the image cache
        before = eng.stats.generated_tokens
        t = _median_time(lambda eng=eng, queries=queries: eng.answer([image], [boxes16], queries), repeats)
        tokens = (eng.stats.generated_tokens - before) / repeats
        tps = tokens / t
        results["decode"].append(
            {"batch": batch, "tokens_per_s": tps, "flops_fraction": tps * 2 * lm_params / flops}
        )
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        results["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return results


def format_results(r: dict) -> str:
    lines = [
        f"model: {r.get('model', '?')}; LM forward: {'lean' if r.get('lean', True) else 'library'}; "
        f"max new tokens: {r.get('max_new_tokens', 16)}",
        f"torch threads: {r['threads']}; measured matmul: {r['matmul_gflops']:.1f} GFLOP/s",
        "",
    ]
    lines.append(f"{'boxes':>6s} {'engine ms':>10s} {'naive ms':>10s} {'speedup':>8s}")
    for row in r["boxes"]:
        lines.append(
            f"{row['k']:6d} {row['engine_s'] * 1e3:10.1f} {row['naive_s'] * 1e3:10.1f} {row['speedup']:7.1f}x"
        )
    it = r["interactive"]
    lines += [
        "",
        f"interactive new box: warm {it['warm_s'] * 1e3:.1f} ms, cold {it['cold_s'] * 1e3:.1f} ms, "
        f"ratio {it['ratio']:.2f}",
    ]
    for row in r.get("interactive_files", []):
        w, h = row["size"]
        lines.append(
            f"  from a {w}x{h} JPEG file ({row['jpeg_bytes'] / 1e3:.0f} kB): "
            f"warm {row['warm_s'] * 1e3:.1f} ms, cold {row['cold_s'] * 1e3:.1f} ms, ratio {row['ratio']:.2f}"
        )
        if "warm_decoded_s" in row:
            lines.append(f"    (warm, decoding the file per request: {row['warm_decoded_s'] * 1e3:.1f} ms)")
    full = r.get("interactive_full")
    if full:
        lines.append(
            "  caption + attributes + relations of the new box (scene JPEG): "
            f"warm {full['warm_s'] * 1e3:.1f} ms, cold {full['cold_s'] * 1e3:.1f} ms, "
            f"ratio {full['ratio']:.2f}"
        )
    lines += [
        "",
        f"{'batch':>6s} {'tokens/s':>10s} {'of matmul peak':>15s}",
    ]
    for row in r["decode"]:
        lines.append(f"{row['batch']:6d} {row['tokens_per_s']:10.1f} {row['flops_fraction']:14.2%}")
    lines.append(f"\npeak RSS: {r['peak_rss_mib']:.0f} MiB")
    if "peak_cuda_mib" in r:
        lines.append(f"peak CUDA memory: {r['peak_cuda_mib']:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_DIR))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--config", default=None, help="model config: random weights of that size instead")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64], help="box counts to compare")
    ap.add_argument("--image", default=None, help=f"picture (default: {SAMPLE_IMAGE} in --model)")
    ap.add_argument("--no-lean", action="store_true", help="every LM forward through the library")
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        help="answer length cap (random weights never emit EOS: every answer runs to the cap)",
    )
    args = ap.parse_args(argv)
    with torch.inference_mode():
        results = run(
            args.model,
            args.repeats,
            tuple(args.ks),
            args.config,
            lean=not args.no_lean,
            max_new=args.max_new_tokens,
            image_path=args.image,
        )
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
