"""The fine-tuning job's steps in order; :func:`run_finetune_job` is the RQ entry point.

Phases (``job.meta["phase"]``): ``load`` (corrections, images, split; the current version),
``evaluate-parent``, ``train`` (stage 2 on corrections mixed with the lineage's replay data),
``evaluate-candidate`` and the gate, ``commit`` (new version; promoted if the gate passed), ``done``.
The replay source and the base evaluator are inputs (:func:`finetune_project`); the RQ entry point
takes them from :func:`backend.finetune.sources.lineage_data`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from backend.finetune.commit import (
    commit_version,
    promote_if_accepted,
    remove_stale_staging,
    stored_base_scores,
)
from backend.finetune.data import CorrectionSplit, MixedRecords, load_corrections
from backend.finetune.gate import evaluate, gate
from backend.finetune.sources import LineageData, lineage_data
from backend.jobs import progress_reporter, set_phase
from backend.registry import ModelRegistry
from backend.settings import Settings, get_settings
from backend.store import CorrectionStore, open_store
from model.checkpoint import load_model
from model.config import TrainConfig
from model.inference.engine import InferenceEngine
from model.mllm import RegionMLLM
from model.training import TrainOptions, train

__all__ = ["MAX_ROUNDS", "finetune_project", "run_finetune_job"]

log = logging.getLogger(__name__)

MAX_ROUNDS = 3  # follow-up rounds one job runs for requests that arrive while it trains


def run_finetune_job(project_id: int, reason: str = "") -> dict[str, Any]:
    """RQ entry point: fine-tune, then run follow-up rounds for requests made meanwhile."""
    settings = get_settings()
    store = open_store(settings.data_dir)
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    lineage = lineage_data(settings)
    rounds = []
    for n in range(MAX_ROUNDS):
        summary = finetune_project(
            project_id, settings, store, registry, lineage, reason if n == 0 else "follow-up"
        )
        rounds.append({k: summary.get(k) for k in ("version", "decision", "parent", "gate", "data")})
        if not store.take_followup(project_id):
            break
    return {"project": project_id, "rounds": rounds}


def finetune_project(
    project_id: int,
    settings: Settings,
    store: CorrectionStore,
    registry: ModelRegistry,
    lineage: LineageData,
    reason: str = "",
) -> dict[str, Any]:
    """One fine-tuning round for a project; returns the summary recorded in ``metrics.json``."""
    remove_stale_staging(registry, settings.job_timeout)
    previous_seq, snapshot_seq = store.begin_training(project_id)
    try:
        summary = _finetune(
            project_id, settings, store, registry, lineage, previous_seq, snapshot_seq, reason
        )
    except BaseException:
        store.abort_training(project_id, previous_seq, snapshot_seq)
        raise
    store.finish_training(project_id, summary.get("version"), summary["decision"])
    return summary


def train_config(settings: Settings, seed: int) -> TrainConfig:
    """Stage 2 (region encoder + projector + LM or its LoRA adapters; vision frozen) from settings."""
    return TrainConfig(
        stage=2,
        steps=settings.train_steps,
        batch_size=settings.train_batch_size,
        lr=settings.train_lr,
        warmup_steps=min(20, max(1, settings.train_steps // 10)),
        seed=seed,
        log_every=max(1, settings.train_steps // 20),
        replay_fraction=settings.replay_fraction,
        update_norm_stats=False,  # a few skewed correction batches must not renormalise every box
    )


def _finetune(
    project_id: int,
    settings: Settings,
    store: CorrectionStore,
    registry: ModelRegistry,
    lineage: LineageData,
    previous_seq: int,
    snapshot_seq: int,
    reason: str,
) -> dict[str, Any]:
    t0 = time.monotonic()
    parent = registry.current()
    parent_dir = registry.path(parent)
    set_phase("load", project=project_id, parent=parent)
    split = load_corrections(project_id, settings, store, previous_seq)
    if not split.records:
        log.warning(
            "project %s: no usable corrections (%d unreadable images)", project_id, len(split.unreadable)
        )
        set_phase("done", project=project_id, parent=parent, decision="no-data",
                  reasons=[f"no usable corrections ({len(split.unreadable)} unreadable images)"])  # fmt: skip
        return {
            "project": project_id,
            "parent": parent,
            "decision": "no-data",
            "unreadable": split.unreadable,
        }
    model = load_model(parent_dir)

    set_phase("evaluate-parent", project=project_id, parent=parent)
    engine = InferenceEngine(model, version=f"parent-{parent}", max_new_tokens=settings.max_new_tokens)
    stored = stored_base_scores(parent_dir, lineage.evaluator.identity)
    parent_scores = evaluate(engine, split.gate, lineage.evaluator, stored)
    del engine

    cfg = train_config(settings, seed=snapshot_seq)
    history, train_seconds = _train(model, split, lineage, cfg, settings, project_id)

    set_phase("evaluate-candidate", project=project_id)
    engine = InferenceEngine(model, version=f"candidate-{parent}", max_new_tokens=settings.max_new_tokens)
    candidate_scores = {
        **evaluate(engine, split.gate, lineage.evaluator),
        "base_eval": lineage.evaluator.identity,
    }
    accepted, reasons = gate(
        parent_scores, candidate_scores, settings.promote_tolerance, lineage.evaluator.metrics
    )

    set_phase("commit", project=project_id, accepted=accepted)
    summary = {
        "project": project_id,
        "reason": reason,
        "parent": parent,
        "parent_scores": parent_scores,
        "candidate": candidate_scores,
        "gate": {"accepted": accepted, "reasons": reasons, "set": split.gate_set,
                 "tolerance": settings.promote_tolerance},
        "data": _counts(split, candidate_scores, settings, snapshot_seq),
        "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                  "max_turns": settings.train_max_turns, "seconds": round(train_seconds, 1),
                  "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"]},
    }  # fmt: skip
    version = commit_version(registry, model, cfg, summary, history, lineage.evaluator.metrics, t0)
    summary["version"] = version
    promote_if_accepted(registry, settings, summary, version)
    outcome = {
        "project": project_id, "parent": parent, "version": version, "decision": summary["decision"],
        "accepted": accepted, "reasons": list(summary["gate"]["reasons"]),
        "label_studio": summary.get("label_studio"),
    }  # fmt: skip
    log.info("gate decision", extra=outcome)
    set_phase("done", **outcome)
    return summary


def _train(
    model: RegionMLLM,
    split: CorrectionSplit,
    lineage: LineageData,
    cfg: TrainConfig,
    settings: Settings,
    project_id: int,
) -> tuple[list[dict], float]:
    """Train ``model`` in place on the corrections mixed with replay; returns (history, seconds)."""
    replay = lineage.replay()
    data = MixedRecords(split.train, replay if settings.replay_fraction > 0 else [], settings.replay_fraction)
    set_phase("train", project=project_id, step=0, steps=cfg.steps)
    t_train = time.monotonic()
    options = TrainOptions(
        max_turns=settings.train_max_turns,
        separate_turns=True,  # one question per prompt, as the default was trained and as serving asks
        progress=progress_reporter("train", {"project": project_id}),
        show_bar=False,
    )
    history = train(model, data, cfg, options)
    return history, time.monotonic() - t_train


def _counts(split: CorrectionSplit, candidate: dict, settings: Settings, snapshot_seq: int) -> dict[str, Any]:
    return {
        "corrected_images": len(split.records),
        "train_images": len(split.train),
        "gate_images": len(split.gate),
        "train_regions": sum(len(r["boxes"]) for r in split.train),
        "gate_questions": candidate["corrections"]["questions"],
        "unreadable_images": len(split.unreadable),
        "replay_fraction": settings.replay_fraction,
        "snapshot_seq": snapshot_seq,
    }
