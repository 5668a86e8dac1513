"""Inference benchmark: batched engine vs the naive per-box loop, measured side by side.

    python -m model.bench [--model model/default] [--repeats 3] [--json out.json] [--dtype bf16]

Prints medians of interleaved repeats (each repeat runs every compared variant once, so a slow
spell on a shared machine slows all of them alike instead of flipping one row):
* K = 1, 4, 16, 64 boxes on one image, one caption question per box: engine (cold image cache)
  vs naive loop (per box: encode the image, build the prompt, ``generate``) - time and ratio;
* interactive: a new box on an image already seen vs on a cold image - latency ratio, with the
  image given decoded and as a JPEG file (what a server receives; decoded only on a cache miss)
  at the scene's size and at 1280x960, beside warm requests that decode the file each time; and
  for the backend's whole request about a new box (caption, attributes, relations) on the scene
  and on the 1280x960 file;
* decode throughput at batch 1 and 16: tokens/s of the one-token decode steps (and of the whole
  request, question forward included), the share of the machine's matmul FLOP/s in the weights'
  dtype (``--dtype``) it reaches (2 x LM parameters FLOPs per token; the peak measured between
  the repeats) and, at batch 1, of the memory-bandwidth bound (every step reads all LM weights);
* peak resident memory.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from model.device import DTYPES
from model.geometry import boxes_tensor
from model.inference.describe import describe_regions
from model.inference.engine import InferenceEngine
from model.inference.image_input import EncodedImage, ImageLike, decode_rgb, encode_image
from model.inference.reference import generate_naive
from model.tasks import CAPTION_QUESTION

__all__ = ["format_results", "interleaved_medians", "main", "memory_bandwidth", "run"]

# A scene of the default's world shipped beside its weights (``--image`` picks another picture).
SAMPLE_IMAGE = "sample.png"


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each of ``variants``, timed in turn within every repeat."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_flops(size: int = 1024, seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul FLOP/s of this machine in ``dtype`` (all torch threads)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0)


def memory_bandwidth(nbytes: int = 256 * 2**20, seconds: float = 0.5) -> float:
    """Measured bytes/s of reading a float32 tensor far larger than the caches (all threads)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x.sum()
        n += 1
    return nbytes * n / (time.perf_counter() - t0)


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
    positions: dict[str, list[int]] = {"warm": [], "cold": []}  # question positions computed

    def computed(eng: InferenceEngine) -> int:
        return eng.stats.extra.get("question_nodes", 0)

    for _ in range(samples):
        new_box = boxes_tensor(random_boxes(rng, 1, width, height), width, height)
        boxes = torch.cat([base, new_box])
        before = computed(engine)
        t0 = time.perf_counter()
        ask(engine, image_input(), boxes)
        warm_times.append(time.perf_counter() - t0)
        positions["warm"].append(computed(engine) - before)
        if decoded_input is not None:
            t0 = time.perf_counter()
            ask(engine, decoded_input(), boxes)
            decoded_times.append(time.perf_counter() - t0)
        cold = new_engine()
        t0 = time.perf_counter()
        ask(cold, image_input(), boxes)
        cold_times.append(time.perf_counter() - t0)
        positions["cold"].append(computed(cold))
    warm, cold_t = statistics.median(warm_times), statistics.median(cold_times)
    row = {"warm_s": warm, "cold_s": cold_t, "ratio": warm / cold_t}
    if positions["cold"][-1]:  # lean decode steps: the question tree's positions
        row["question_positions"] = {k: statistics.median(v) for k, v in positions.items()}
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
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Every figure of the module docstring for the checkpoint ``model_dir``; with ``config``, for a
    model of that config with random weights (and ``model_dir``'s tokenizer) instead: the same
    engine on a model of realistic proportions, where the image encode and the prefix cost what
    they cost in practice.  ``lean=False`` runs every LM forward through the library (no
    :class:`model.inference.kv_decode.LlamaSteps`), for comparison.  ``dtype``: the weights' (the
    matmul peak is measured in it too)."""
    from model.checkpoint import build_model, load_model, read_metadata

    if config is None:
        model = load_model(model_dir, dtype=dtype)
        version = read_metadata(model_dir).get("version", "?")
    else:
        from model.config import load_model_config
        from model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(model_dir) / "tokenizer")
        model = build_model(load_model_config(config), tokenizer).eval().to(dtype)
        version = f"{config} (random weights)"
    rng = random.Random(0)
    image = decode_rgb(Path(image_path or Path(model_dir) / SAMPLE_IMAGE).read_bytes())
    results: dict = {
        "boxes": [],
        "threads": torch.get_num_threads(),
        "model": version,
        "lean": lean,
        "max_new_tokens": max_new,
        "dtype": str(dtype).removeprefix("torch."),
    }

    variants: dict[str, Callable[[], None]] = {}
    for k in ks:
        boxes = boxes_tensor(random_boxes(rng, k, image.width, image.height), image.width, image.height)
        queries = [(0, CAPTION_QUESTION.format(a=f"<region{i + 1}>")) for i in range(k)]

        def engine_run(boxes=boxes, queries=queries) -> None:
            InferenceEngine(model, version, max_new_tokens=max_new, lean=lean).answer(
                [image], [boxes], queries
            )

        def naive_run(boxes=boxes, queries=queries) -> None:
            for _, q in queries:
                generate_naive(model, image, boxes, q, max_new_tokens=max_new)

        variants[f"{k}/engine"], variants[f"{k}/naive"] = engine_run, naive_run
    medians = interleaved_medians(variants, repeats)  # every K's engine and naive run once a repeat
    for k in ks:
        t_engine, t_naive = medians[f"{k}/engine"], medians[f"{k}/naive"]
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
    photo_file = jpeg_bytes(image.resize(PHOTO_SIZE, Image.Resampling.BILINEAR))
    results["interactive_full_photo"] = {
        "size": list(PHOTO_SIZE),
        **interactive_latency(new_engine, lambda: EncodedImage(photo_file), rng, samples, full=True),
    }

    # Decode throughput at batch 1 and 16 (prefix cached), interleaved with measurements of the
    # machine's matmul peak and memory bandwidth, which a shared machine's load moves too.
    lm = model.lm
    lm_params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    weight_bytes = sum(
        p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n
    )
    boxes16 = boxes_tensor(random_boxes(rng, 16, image.width, image.height), image.width, image.height)
    batches = (1, 16)
    engines = {b: InferenceEngine(model, version, max_new_tokens=max_new, lean=lean) for b in batches}
    asks = {b: [(0, CAPTION_QUESTION.format(a=f"<region{i + 1}>")) for i in range(b)] for b in batches}
    for b in batches:
        engines[b].answer([image], [boxes16], asks[b])  # warm the image cache
    peaks, bandwidths = [], []
    samples_by_batch: dict[int, dict[str, list[float]]] = {
        b: {"step_tps": [], "request_tps": [], "step_s": []} for b in batches
    }
    for _ in range(repeats):
        peaks.append(matmul_flops(seconds=0.5, dtype=dtype))
        bandwidths.append(memory_bandwidth())
        for b in batches:
            eng = engines[b]
            before, tokens_before = dataclasses.replace(eng.stats.times), eng.stats.generated_tokens
            wall = _timed(lambda eng=eng, b=b: eng.answer([image], [boxes16], asks[b]))
            t = eng.stats.times
            decode_s, steps = t.decode_s - before.decode_s, t.steps - before.steps
            got = samples_by_batch[b]
            got["step_tps"].append((t.tokens - before.tokens) / decode_s)
            got["request_tps"].append((eng.stats.generated_tokens - tokens_before) / wall)
            got["step_s"].append(decode_s / steps)
    flops, bandwidth = statistics.median(peaks), statistics.median(bandwidths)
    results["matmul_gflops"] = flops / 1e9
    results["bandwidth_gbs"] = bandwidth / 1e9
    results["lm_weight_bytes"] = weight_bytes
    results["decode"] = []
    for b in batches:
        got = samples_by_batch[b]
        tps = statistics.median(got["step_tps"])
        row = {
            "batch": b,
            "tokens_per_s": tps,
            "request_tokens_per_s": statistics.median(got["request_tps"]),
            "step_ms": statistics.median(got["step_s"]) * 1e3,
            "matmul_ms": 2 * lm_params * b / flops * 1e3,  # a step's matmuls at the measured peak
            "flops_fraction": tps * 2 * lm_params / flops,
        }
        if b == 1:  # a batch-1 step reads every weight for one token: bandwidth bounds it
            row["bandwidth_bound_tokens_per_s"] = bandwidth / weight_bytes
            row["bandwidth_fraction"] = tps * weight_bytes / bandwidth
        results["decode"].append(row)
    # The whole new-box request's floor: its longest answer takes max_new - 1 one-token steps after
    # the question forward, one after the other, and every step reads all LM weights at least once.
    full = results["interactive_full_photo"]
    floor = (max_new - 1) * weight_bytes / bandwidth
    full["warm_floor_s"] = floor
    cold_only = max(full["cold_s"] - full["warm_s"], 0.0)
    full["ratio_floor"] = floor / (floor + cold_only) if floor + cold_only > 0 else 1.0
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        results["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return results


def format_results(r: dict) -> str:
    lines = [
        f"model: {r.get('model', '?')}; LM forward: {'lean' if r.get('lean', True) else 'library'}; "
        f"max new tokens: {r.get('max_new_tokens', 16)}",
        f"torch threads: {r['threads']}; weights: {r.get('dtype', 'float32')}; "
        f"measured matmul: {r['matmul_gflops']:.1f} GFLOP/s",
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
    for key, label in (("interactive_full", "scene JPEG"), ("interactive_full_photo", "1280x960 JPEG")):
        full = r.get(key)
        if full:
            lines.append(
                f"  caption + attributes + relations of the new box ({label}): "
                f"warm {full['warm_s'] * 1e3:.1f} ms, cold {full['cold_s'] * 1e3:.1f} ms, "
                f"ratio {full['ratio']:.2f}"
            )
            if "warm_floor_s" in full:
                lines.append(
                    f"    (floor of warm: {r.get('max_new_tokens', 16) - 1} decode steps, each reading the "
                    f"LM weights once, {full['warm_floor_s'] * 1e3:.1f} ms; ratio floor with this cold-only "
                    f"work {full['ratio_floor']:.2f})"
                )
            if "question_positions" in full:
                n = full["question_positions"]
                lines.append(f"    (question positions computed: warm {n['warm']:.0f}, cold {n['cold']:.0f})")
    lines += [
        "",
        f"decode (prefix cached): measured memory bandwidth {r.get('bandwidth_gbs', float('nan')):.1f} GB/s, "
        f"LM weights {r.get('lm_weight_bytes', 0) / 2**20:.0f} MiB",
        f"{'batch':>6s} {'tokens/s':>10s} {'of matmul peak':>15s} {'step ms':>8s} {'matmuls ms':>11s} "
        f"{'request tok/s':>14s}",
    ]
    for row in r["decode"]:
        lines.append(
            f"{row['batch']:6d} {row['tokens_per_s']:10.1f} {row['flops_fraction']:14.2%} "
            f"{row.get('step_ms', float('nan')):8.1f} {row.get('matmul_ms', float('nan')):11.1f} "
            f"{row.get('request_tokens_per_s', float('nan')):14.1f}"
        )
        if "bandwidth_bound_tokens_per_s" in row:
            lines.append(
                f"{'':6s} bandwidth bound {row['bandwidth_bound_tokens_per_s']:.1f} tokens/s "
                f"(reached {row['bandwidth_fraction']:.0%})"
            )
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
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="weights' dtype (the matmul peak is measured in it too)",
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
            dtype=DTYPES[args.dtype],
        )
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
