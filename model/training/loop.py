"""Training loop shared by the CLI (``model.train``), the default-model build and the RQ fine-tuning job.

``python -m model.train --init CKPT --data data.jsonl --stage 2 --steps 500 --out OUT`` continues
training from a checkpoint folder on region-text JSONL records.  Runs unchanged under
``torchrun --nproc_per_node N`` (DDP; each rank draws a disjoint shard of every global batch);
``--fsdp`` shards parameters, gradients and optimizer state instead (models that do not fit one
device).  Either way the global batch, and so the loss curve, does not depend on N.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.config import TrainConfig
from model.data.dataset import RecordDataset, collate_samples
from model.mllm import RegionMLLM
from model.region_encoder import freeze_norm_statistics
from model.training.aux_heads import RegionAttributeHeads, with_positions
from model.training.distributed import average_grads, gather_into, shard_copy, world

__all__ = ["ProgressFn", "TrainOptions", "hide_image_tokens", "lm_only_loss", "train"]

ProgressFn = Callable[[dict], None]


def lm_only_loss(lm: nn.Module, device: torch.device, batch: dict) -> torch.Tensor:
    """Text-only LM loss (placeholders keep their token embeddings); used to pre-train a fresh LM.
    ``lm`` is the causal LM, possibly wrapped for distributed training."""
    out = lm(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        labels=batch["labels"].to(device),
    )
    return out.loss


def hide_image_tokens(batch: dict, image_patch_id: int, share: float, rng: random.Random) -> None:
    """Mask the image tokens out of attention for about ``share`` of the prompts of ``batch``.

    A small LM trained from scratch otherwise learns to answer from the image tokens (its attention
    all but ignores the ``<bbox>`` token for colour questions), which cannot say *which* object
    is meant; prompts without them can only be answered from their region tokens.  Serving always
    shows the image tokens, and the model is trained on both kinds of prompts.
    """
    if share <= 0:
        return
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for row in range(ids.shape[0]):
        if rng.random() < share:
            mask[row, ids[row] == image_patch_id] = 0


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


@dataclass(frozen=True)
class TrainOptions:
    """How a run is fed, distributed and reported (the hyper-parameters are :class:`TrainConfig`'s)."""

    text_only: bool = False  # LM pre-training: conversations as plain text, the LM alone trained
    max_turns: int | None = 4  # turns taken from a record (a random subset, fixed per index)
    separate_turns: bool = False  # every turn its own single-question prompt (as the engine asks)
    root: Path | None = None  # folder that relative image paths of records resolve against
    fsdp: bool = False  # under torchrun: shard with FSDP instead of replicating with DDP
    progress: ProgressFn | None = None  # gets {"step", "steps", "loss", "lr", "eta_s"}
    show_bar: bool = True  # tqdm bar on rank 0


def train(
    model: RegionMLLM, records: Sequence[dict], cfg: TrainConfig, options: TrainOptions | None = None
) -> list[dict]:
    """Train ``model`` in place for ``cfg.steps`` steps of global batch ``cfg.batch_size``.

    Sampling is with replacement from ``records`` using ``cfg.seed``, so a run is reproducible and
    the global batch is the same for any number of DDP ranks.  ``options.progress`` receives
    ``{"step", "steps", "loss", "lr", "eta_s"}`` every ``cfg.log_every`` steps and after the last.
    Returns the history.  Under torchrun the trainable part is wrapped in DDP (or FSDP with
    ``options.fsdp``); ``model`` is left a plain module with the trained weights on every rank.
    """
    opts = options or TrainOptions()
    text_only, fsdp, progress = opts.text_only, opts.fsdp, opts.progress
    if not records:
        raise ValueError("no training records")
    rank, world_size = world()
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {world_size}")
    torch.manual_seed(cfg.seed)
    if text_only and cfg.freeze:
        raise ValueError("text-only training trains the LM alone: freeze does not apply to it")
    model.set_stage(1 if text_only else cfg.stage, cfg.freeze)
    if text_only:
        model.requires_grad_(False)
        model.lm.requires_grad_(True)
    dataset = RecordDataset(
        records,
        model,
        root=opts.root,
        max_turns=opts.max_turns,
        text_only=text_only,
        separate_turns=opts.separate_turns,
        focal=cfg.focal_crops,
    )
    # Text-only pre-training runs the LM alone, so only the LM is wrapped for gradient sync.
    trained: nn.Module = model.lm if text_only else model
    wrapped, sharded = _wrap_for_ranks(trained, world_size, fsdp)
    stepped = sharded if sharded is not None else trained  # the module whose parameters are stepped
    params = [p for p in stepped.parameters() if p.requires_grad]
    groups = _param_groups(params, stepped if text_only else stepped.lm, cfg)
    aux = _aux_heads(model, cfg, text_only)
    if aux is not None:
        groups.append({"params": list(aux.heads.parameters()), "lr": cfg.lr})
        captured: list[torch.Tensor] = []
        encoder = (sharded if sharded is not None else trained).region_encoder
        hook = encoder.register_forward_hook(lambda _m, _i, out: captured.append(out))
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    rng = random.Random(cfg.seed)
    hide_rng = random.Random(cfg.seed + 1)  # its own stream: the data order does not depend on it
    local = cfg.batch_size // world_size
    history: list[dict] = []
    model.train()
    wrapped.train()  # an FSDP copy has its own modules
    # A held region encoder keeps its box norm's statistics too: they are part of what it computes.
    freeze_norm_statistics(wrapped, not cfg.update_norm_stats or "region_encoder" in cfg.freeze)
    start = time.monotonic()
    bar = tqdm(
        range(cfg.steps),
        desc=f"stage {0 if text_only else cfg.stage}",
        disable=not opts.show_bar or rank != 0,
    )
    for step in bar:
        indices = [rng.randrange(len(dataset)) for _ in range(cfg.batch_size)]
        samples = [dataset[i] for i in indices[rank * local : (rank + 1) * local]]
        batch = collate_samples(model, samples)
        if not text_only:
            hide_image_tokens(batch, model.image_patch_id, cfg.image_token_dropout, hide_rng)
        if text_only:
            loss = lm_only_loss(wrapped, model.device, batch)
        else:
            loss = wrapped(**batch).loss
        if aux is not None:
            tokens = captured.pop()
            captured.clear()
            labels = [s.box_labels for s in samples]
            if cfg.region_aux_position:
                labels = with_positions(labels, [s.boxes for s in samples])
            aux_loss = aux.loss(tokens, labels, [len(s.boxes) for s in samples])
            if aux_loss is not None:
                loss = loss + cfg.region_aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if aux is not None and world_size > 1:
            average_grads(aux)
        if cfg.grad_clip:
            # With FSDP the gradients are DTensors: the norm is taken over every rank's shard.
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        value = loss.detach()
        if world_size > 1:
            dist.all_reduce(value)
            value /= world_size
        entry = {"step": step + 1, "loss": float(value), "lr": sched.get_last_lr()[0]}
        history.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}")
        if progress and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            elapsed = time.monotonic() - start
            eta = elapsed / (step + 1) * (cfg.steps - step - 1)
            progress({**entry, "steps": cfg.steps, "eta_s": round(eta, 1)})
    if sharded is not None:
        gather_into(sharded, trained)
    if aux is not None:
        hook.remove()
    freeze_norm_statistics(wrapped, False)
    model.eval()
    return history


def _wrap_for_ranks(trained: nn.Module, world_size: int, fsdp: bool) -> tuple[nn.Module, nn.Module | None]:
    """The module to run forward through (``trained`` itself on one process, else its DDP wrapper
    or FSDP copy) and the FSDP copy, if any (its parameters are the ones stepped)."""
    if world_size == 1:
        return trained, None
    if fsdp:
        frozen = [n for n, p in trained.named_parameters() if not p.requires_grad]
        sharded = shard_copy(trained, frozen)
        return sharded, sharded
    return DistributedDataParallel(trained), None


def _param_groups(params: list[nn.Parameter], lm: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: ``params`` outside ``lm`` at ``cfg.lr``, inside it at ``cfg.lm_lr`` (or ``lr``)."""
    lm_params = {id(p) for p in lm.parameters()}
    return [
        {"params": [p for p in params if id(p) not in lm_params], "lr": cfg.lr},
        {"params": [p for p in params if id(p) in lm_params], "lr": cfg.lm_lr or cfg.lr},
    ]


def _aux_heads(model: RegionMLLM, cfg: TrainConfig, text_only: bool) -> RegionAttributeHeads | None:
    """The auxiliary attribute heads when ``cfg.region_aux_weight`` asks for them (else ``None``)."""
    if text_only or cfg.region_aux_weight <= 0:
        return None
    dim = model.region_encoder.updims.out_features
    return RegionAttributeHeads(dim, position=cfg.region_aux_position).to(model.device)
