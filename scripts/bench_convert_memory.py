"""Peak host memory of ``python -m model.convert gpt4roi`` on a ~1B-parameter LLaMA-shaped random
checkpoint (official GPT4RoI key names, fp16 ``.bin`` shards), merged and delta + base; then of
loading the converted folder on the CPU in fp32 and in bf16 (``MODEL_DTYPE`` / ``--dtype``).

    PYTHONPATH=. .venv/bin/python scripts/bench_convert_memory.py [--work /tmp/convert-bench] [--layers 19]

Writes the checkpoints under ``--work`` (about 2 GB each), converts each in a child process,
reads the child's peak RSS (``ru_maxrss``), prints one JSON line per case and deletes ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.gpt4roi_fake import (
    SPM_VOCAB,
    TINY_CLIP,
    TINY_OPEN_CLIP,
    llava_config,
    make_hf_clip,
    official_layout,
    save_shards,
    write_tokenizer,
)

VOCAB = SPM_VOCAB + 6


def _state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("inv_freq"):
            d = shape[0] * 2
            out[key] = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        else:
            out[key] = torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=g)
    return out


# The child reports its own VmHWM (reset by exec): a parent's ru_maxrss would include the pages
# the forked child shared with this (large) process before exec.
RUNNER = """
import sys
from model.convert.__main__ import main
rc = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("VmHWM_kB", hwm)
sys.exit(rc)
"""


LOADER = """
import sys
from model.checkpoint import load_model
from model.device import DTYPES
load_model(sys.argv[1], dtype=DTYPES[sys.argv[2]])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("VmHWM_kB", hwm)
"""


def _peak(args: list[str], runner: str = RUNNER) -> tuple[int, float]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", runner, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed: {proc.stderr[-2000:]}")
    kb = int(proc.stdout.strip().splitlines()[-1].split()[1])
    return kb * 1024, time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("/tmp/convert-bench"))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=19)
    args = ap.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    try:
        clip = make_hf_clip(work / "clip")
        region = {"fuse": 32, "roi": 2, "pos_hidden": 16, "region_hidden": 48}
        shapes = official_layout(
            args.hidden, args.layers, args.inter, VOCAB, TINY_CLIP["width"],
            inv_freq_dim=args.hidden // args.heads, **region,
        )  # fmt: skip
        params = sum(torch.Size(s).numel() for k, s in shapes.items() if not k.endswith("inv_freq"))
        cfg = llava_config(args.hidden, args.layers, args.heads, args.inter, VOCAB, TINY_CLIP["width"])
        merged = _state(shapes, 0)
        for name in ("merged", "delta"):
            (work / name).mkdir(parents=True)
            (work / name / "config.json").write_text(json.dumps(cfg))
            write_tokenizer(work / name)
        save_shards(merged, work / "merged", "bin")
        base = {
            k: v.clone() for k, v in merged.items() if not k.startswith(("model.spi_module", "model.mm_"))
        }
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            base[key] = base[key][:SPM_VOCAB].clone()
        # Delta values do not matter for memory, but the rotary buffers are checked: 0 + base.
        save_shards({k: torch.zeros_like(v) if k.endswith("inv_freq") else v for k, v in merged.items()},
                    work / "delta", "bin")  # fmt: skip
        save_shards(base, work / "base", "bin")
        (work / "base" / "config.json").write_text(
            json.dumps({**cfg, "model_type": "llama", "vocab_size": SPM_VOCAB})
        )
        del merged, base
        idle, _ = _peak([])
        cases = {
            "merged": ["--merged", str(work / "merged")],
            "delta": ["--delta", str(work / "delta"), "--base", str(work / "base")],
        }
        for case, src in cases.items():
            out = work / f"out-{case}"
            flags = ["--vision", str(clip), "--open-clip-model", TINY_OPEN_CLIP, "--out", str(out)]
            peak, seconds = _peak(["gpt4roi", *src, *flags])
            size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
            print(json.dumps({
                "case": case, "source": ".bin fp16, 2 shards", "parameters": params,
                "output_bytes": size, "peak_rss_bytes": peak, "ratio": round(peak / size, 3),
                "idle_process_rss_bytes": idle, "seconds": round(seconds, 1),
            }))  # fmt: skip
            if case == "merged":
                for dtype in ("fp32", "bf16"):
                    peak, seconds = _peak([str(out), dtype], LOADER)
                    print(json.dumps({
                        "case": f"load {dtype}", "source": "the merged conversion's folder (fp16)",
                        "parameters": params, "output_bytes": size, "peak_rss_bytes": peak,
                        "ratio": round(peak / size, 3), "idle_process_rss_bytes": idle,
                        "seconds": round(seconds, 1),
                    }))  # fmt: skip
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
