"""Train the tiny ``roi-test`` model deterministically and write its loss curve (distributed check).

    python scripts/ddp_check.py --out one.json
    torchrun --nproc_per_node 2 scripts/ddp_check.py --out two.json   # same global batch, 2 ranks
    torchrun --nproc_per_node 2 scripts/ddp_check.py --out fsdp.json --fsdp

Every rank builds the same model (fixed seeds) and trains it with ``model.training.train`` on
``SyntheticRecords(seed=3, count=64)``; ``train`` shards each global batch across the ranks.  Rank 0
writes ``{"world_size", "fsdp", "history", "params"}`` where ``params`` is a fingerprint of the
trained weights (sum and sum of squares of every trainable tensor) and ``params_in_sync`` says
whether every rank ended with the same fingerprint.  ``tests/test_distributed.py`` compares the
one-process and two-process files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fingerprint(model) -> dict[str, list[float]]:
    """``{name: [sum, sum of squares]}`` of every trainable tensor (float64)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach().double()
            out[name] = [float(t.sum()), float((t * t).sum())]
    return out


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as dist

    from model.checkpoint import build_model
    from model.config import TrainConfig, load_model_config
    from model.tokenizer import train_tokenizer
    from model.training import TrainOptions, train
    from model.training.distributed import full_params, init_distributed, world
    from toyworld.scenes import SyntheticRecords, corpus_texts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file written by rank 0")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8, help="global batch size")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--stage", type=int, default=2, choices=[1, 2])
    ap.add_argument("--text-only", action="store_true", help="LM-only pre-training path")
    ap.add_argument("--fsdp", action="store_true", help="shard with FullyShardedDataParallel")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    distributed = init_distributed()
    rank, world = world()
    cfg = load_model_config("roi-test")
    tokenizer = train_tokenizer(corpus_texts(count=200), vocab_size=280)
    model = build_model(cfg, tokenizer)  # seeds torch itself: identical weights on every rank
    records = SyntheticRecords(seed=3, count=64)
    tcfg = TrainConfig(
        stage=args.stage, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=2, seed=0
    )
    options = TrainOptions(text_only=args.text_only, fsdp=args.fsdp, show_bar=False)
    history = train(model, records, tcfg, options)
    with full_params(model):
        prints = fingerprint(model)
    in_sync = True
    if distributed:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, prints)
        in_sync = all(g == gathered[0] for g in gathered)
    if rank == 0:
        result = {
            "world_size": world,
            "fsdp": args.fsdp,
            "text_only": args.text_only,
            "history": history,
            "params": prints,
            "params_in_sync": in_sync,
        }
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(" ".join(f"{h['loss']:.6f}" for h in history))
    if distributed:
        # Every rank reaches teardown before any tears down: a rank destroying the group while
        # rank 0 still writes its result aborted once in gloo's threads (SIGABRT, "terminate
        # called without an active exception") after a successful run.
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
