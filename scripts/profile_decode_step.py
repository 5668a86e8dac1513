"""Where a decode step's time goes: torch.profiler over the engine's one-token LM forwards.

    PYTHONPATH=. .venv/bin/python scripts/profile_decode_step.py [--config roi-base] [--batch 16]
        [--dtype fp32|bf16] [--layout mm|packed|linear]

Builds the model of ``--config`` with random weights (the default's tokenizer), warms the image
cache, then profiles ``--runs`` requests of ``--batch`` captions of ``--max-new-tokens`` tokens.
Every forward of the decode steps the engine makes (``model.inference.kv_decode.make_steps``) is
labelled; the operators under the one-token forwards are summed and divided by their count, so the
table is the mean cost of one decode step, top operators by self CPU time.  The whole step's wall
time is printed beside the sum of its weight matmuls (``aten::mm``/``addmm``, oneDNN's linear;
attention's ``bmm`` not included).
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from model import bench
from model.checkpoint import DEFAULT_DIR, build_model
from model.config import load_model_config
from model.device import DTYPES
from model.geometry import boxes_tensor
from model.inference import engine as engine_module
from model.inference import kv_decode
from model.inference.engine import InferenceEngine
from model.inference.image_input import decode_rgb
from model.tasks import CAPTION_QUESTION
from model.tokenizer import load_tokenizer

MATMULS = {"aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"}  # the weight matmuls


class _Labelled:
    """Decode steps whose forwards are profiler ranges (one-token forwards: ``decode_step``)."""

    def __init__(self, steps: object, walls: list[float]) -> None:
        self.steps = steps
        self.walls = walls

    def forward(self, embeds: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        name = "decode_step" if embeds.shape[1] == 1 else "question_forward"
        t0 = time.perf_counter()
        with record_function(name):
            out = self.steps.forward(embeds, *args, **kwargs)  # type: ignore[attr-defined]
        if name == "decode_step":
            self.walls.append(time.perf_counter() - t0)
        return out

    def __getattr__(self, name: str) -> object:
        return getattr(self.steps, name)


def _descendants(event: object) -> list:
    out, todo = [], list(event.cpu_children)  # type: ignore[attr-defined]
    while todo:
        e = todo.pop()
        out.append(e)
        todo.extend(e.cpu_children)
    return out


def eng_layout(model: torch.nn.Module) -> str:
    """The weight layout the lean decode steps picked for ``model``'s LM."""
    return kv_decode.lean_weights(model.lm).layout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="roi-base")
    ap.add_argument("--model", default=str(DEFAULT_DIR))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="the weights' dtype")
    ap.add_argument(
        "--layout", default=None, choices=["mm", "packed", "linear"], help="force a weight layout"
    )
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = load_tokenizer(Path(args.model) / "tokenizer")
    model = build_model(load_model_config(args.config), tokenizer).eval().to(DTYPES[args.dtype])
    kv_decode.LAYOUT = args.layout
    image = decode_rgb((Path(args.model) / bench.SAMPLE_IMAGE).read_bytes())
    rng = random.Random(0)
    boxes = boxes_tensor(
        bench.random_boxes(rng, args.batch, image.width, image.height), image.width, image.height
    )
    queries = [(0, CAPTION_QUESTION.format(a=f"<region{i + 1}>")) for i in range(args.batch)]
    eng = InferenceEngine(model, "profile", max_new_tokens=args.max_new_tokens)
    walls: list[float] = []
    original = engine_module.make_steps

    def labelled(*a: object, **k: object) -> _Labelled:
        return _Labelled(original(*a, **k), walls)

    engine_module.make_steps = labelled  # type: ignore[assignment]
    with torch.inference_mode():
        eng.answer([image], [boxes], queries)  # warm: image cache, weight copies, rotary tables
        walls.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.runs):
                eng.answer([image], [boxes], queries)
    engine_module.make_steps = original  # type: ignore[assignment]

    steps = [e for e in prof.events() if e.name == "decode_step"]
    self_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for step in steps:
        for e in _descendants(step):
            self_us[e.name] += e.self_cpu_time_total
            calls[e.name] += 1
    n = max(1, len(steps))
    total = sum(self_us.values()) / n
    step_ms = sorted(walls)[len(walls) // 2] * 1e3 if walls else float("nan")
    mm_ms = sum(v for k, v in self_us.items() if k in MATMULS) / n / 1e3
    print(
        f"{args.config} ({args.dtype}, {eng_layout(model)} weights), batch {args.batch}, "
        f"{len(steps)} decode steps profiled; "
        f"median step wall (unprofiled timer around the profiled call) {step_ms:.1f} ms; "
        f"ops' self CPU {total / 1e3:.1f} ms a step, of which matmuls {mm_ms:.1f} ms"
    )
    print(f"{'op':32s} {'ms/step':>8s} {'share':>6s} {'calls/step':>10s}")
    for name, us in sorted(self_us.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{name:32s} {us / n / 1e3:8.2f} {us / n / total:6.1%} {calls[name] / n:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
