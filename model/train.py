"""``python -m model.train --init CKPT --data data.jsonl --stage 2 --steps 500 --out OUT`` continues
training from a checkpoint folder on region-text JSONL records.  Runs unchanged under
``torchrun --nproc_per_node N`` (DDP; each rank draws a disjoint shard of every global batch);
``--fsdp`` shards parameters, gradients and optimizer state instead (models that do not fit one
device).  Either way the global batch, and so the loss curve, does not depend on N.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from model.checkpoint import load_model, read_metadata, save_checkpoint
from model.config import TRAINABLE_MODULES, TrainConfig
from model.data.dataset import load_jsonl_records
from model.training.distributed import init_distributed, world
from model.training.loop import TrainOptions, train

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Continue training a checkpoint on region-text JSONL")
    ap.add_argument("--init", required=True, help="checkpoint folder to start from")
    ap.add_argument("--data", required=True, nargs="+", help="region-text JSONL file(s)")
    ap.add_argument("--out", required=True, help="output checkpoint folder")
    ap.add_argument("--stage", type=int, default=2, choices=[1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP instead of DDP")
    ap.add_argument(
        "--freeze", nargs="+", default=[], choices=TRAINABLE_MODULES, metavar="MODULE",
        help=f"stage 2: keep these as --init has them (of {', '.join(TRAINABLE_MODULES)}; vision: always)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    try:
        cfg = TrainConfig(
            stage=args.stage, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            freeze=args.freeze,
        )  # fmt: skip
    except ValueError as exc:  # e.g. --freeze with --stage 1, before any model is loaded
        ap.error(str(exc))
    distributed = init_distributed()
    model = load_model(args.init)
    records = [rec for path in args.data for rec in load_jsonl_records(path)]
    history = train(model, records, cfg, TrainOptions(fsdp=args.fsdp))
    if world()[0] == 0:
        parent = read_metadata(args.init)
        save_checkpoint(
            model,
            args.out,
            cfg,
            {
                "parent": parent.get("version"),
                "stage": args.stage,
                "records": len(records),
                "final_loss": history[-1]["loss"],
            },
            vision_source=Path(args.init) / "vision.safetensors",
        )
        print(f"saved {args.out}; final loss {history[-1]['loss']:.4f}")
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
