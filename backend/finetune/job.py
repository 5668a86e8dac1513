"""The fine-tuning job's steps in order; :func:`run_finetune_job` is the RQ entry point.

Phases (``job.meta["phase"]``): ``load`` (corrections, images, split; the current version),
``evaluate-parent``, ``train`` (stage 2 on corrections mixed with the lineage's replay data),
``evaluate-candidate`` and the gate, ``commit`` (new version; promoted if the gate passed), ``done``.
The replay source and the base evaluator are inputs (:func:`finetune_project`); the RQ entry point
takes them from :func:`backend.finetune.sources.lineage_data`.

The job first takes the project's training lease (:mod:`backend.lease`; until then it writes
nothing to the job: a run of the same job id may hold it), then every phase change and progress
report checks that the lease was not lost, and the commit confirms it with Redis.  The project's
training watermark moves only when a version is committed (promoted or rejected by the gate);
meanwhile the run claims its snapshot in the store for as long as it renews its lease
(:mod:`backend.store`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from backend.finetune.commit import (
    commit_version,
    promote_if_accepted,
    remove_stale_staging,
    stored_base_scores,
)
from backend.finetune.data import CorrectionSplit, MixedRecords, load_corrections
from backend.finetune.focus import focused_turns, missed_turns
from backend.finetune.gate import evaluate, gate_decision
from backend.finetune.sources import LineageData, lineage_data
from backend.jobs import progress_reporter, redis_connection, set_phase
from backend.lease import LeaseError, TrainingLease
from backend.registry import ModelRegistry
from backend.settings import Settings, get_settings
from backend.store import CorrectionStore, open_store
from model.checkpoint import load_model, read_metadata, read_train_config
from model.config import TrainConfig
from model.data.dataset import record_turns
from model.inference.engine import InferenceEngine
from model.mllm import RegionMLLM
from model.training import TrainOptions, lift_untrained_rows, text_token_ids, train

__all__ = ["MAX_ROUNDS", "finetune_project", "run_finetune_job"]

log = logging.getLogger(__name__)
REPLAY_TOKEN_SAMPLE = 64  # replay records whose tokens count as trained (their median row norm)

MAX_ROUNDS = 3  # follow-up rounds one job runs for requests that arrive while it trains


def run_finetune_job(project_id: int, reason: str = "") -> dict[str, Any]:
    """RQ entry point: under the project's training lease, fine-tune, then run follow-up rounds for
    requests made meanwhile."""
    settings = get_settings()
    # Short socket timeouts: a hung Redis must not hang the renewal thread (it also watches the worker).
    with TrainingLease(redis_connection(settings, fast=True), settings, project_id) as lease:
        store = open_store(settings.data_dir)
        registry = ModelRegistry(settings.model_dir, settings.default_model)
        lineage = lineage_data(settings)
        rounds = []
        for n in range(MAX_ROUNDS):
            summary = finetune_project(
                project_id, settings, store, registry, lineage, reason if n == 0 else "follow-up", lease=lease
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
    *,
    lease: TrainingLease | None = None,
) -> dict[str, Any]:
    """One fine-tuning round for a project; returns the summary recorded in ``metrics.json``.

    ``lease``: the run's training lease (checked at every phase and progress report, confirmed
    before the commit); without one (direct calls) nothing is checked and the run's claim on its
    snapshot lasts ``JOB_TIMEOUT``."""
    remove_stale_staging(registry, settings.job_timeout)
    claim = lease.ttl if lease is not None else settings.job_timeout
    previous_seq, snapshot_seq = store.begin_training(project_id, claim)
    stop_renewing = (
        lease.on_renew(lambda: store.renew_claim(project_id, snapshot_seq, claim))
        if lease is not None
        else None
    )
    try:
        summary = _finetune(
            project_id, settings, store, registry, lineage, previous_seq, snapshot_seq, reason, lease
        )
    except LeaseError:
        raise  # another run may hold the lease and a claim now: leave ours to lapse
    except BaseException:
        store.abort_training(project_id, snapshot_seq)
        raise
    finally:
        if stop_renewing is not None:
            stop_renewing()
    trained = summary["decision"] in ("promoted", "rejected")  # a committed version
    store.finish_training(project_id, snapshot_seq, summary.get("version"), summary["decision"], trained)
    return summary


def _phase(lease: TrainingLease | None, phase: str, **fields: Any) -> None:
    """``set_phase`` for a run under ``lease``: a run that lost it stops here, before it writes over
    the job meta of the run that holds it now."""
    if lease is not None:
        lease.ensure()
    set_phase(phase, **fields)


def parent_image_token_dropout(folder: Path) -> float | None:
    """The image-token dropout the version in ``folder`` was trained with (its train_config.json);
    None when it records none or one this code cannot read (logged: the job goes on without)."""
    try:
        cfg = read_train_config(folder)
    except (ValueError, TypeError) as exc:
        log.warning(
            "unreadable train_config.json of the parent", extra={"folder": str(folder), "error": str(exc)}
        )
        return None
    value = cfg.image_token_dropout if cfg is not None else None
    if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        log.warning("parent's image_token_dropout is not in [0, 1); using none", extra={"value": value})
        return None
    return value


def train_config(settings: Settings, seed: int, parent_dropout: float | None = None) -> TrainConfig:
    """Stage 2 (region encoder + projector + LM or its LoRA adapters; vision frozen) from settings;
    ``parent_dropout``: the image-token dropout the parent version was trained with (kept unless
    ``TRAIN_IMAGE_TOKEN_DROPOUT`` says otherwise; None: 0)."""
    return TrainConfig(
        stage=2,
        steps=settings.train_steps,
        batch_size=settings.train_batch_size,
        lr=settings.train_lr,
        warmup_steps=min(20, max(1, settings.train_steps // 10)),
        seed=seed,
        log_every=max(1, settings.train_steps // 20),
        replay_fraction=settings.replay_fraction,
        # Continuing in the parent's regime: a model trained to answer with its image tokens often
        # hidden shifts when a job suddenly always shows them (docs/training.md).
        image_token_dropout=settings.image_token_dropout(parent_dropout),
        update_norm_stats=False,  # a few skewed correction batches must not renormalise every box
        freeze=settings.train_frozen_modules,
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
    lease: TrainingLease | None,
) -> dict[str, Any]:
    t0 = time.monotonic()
    parent = registry.current()
    parent_dir = registry.path(parent)
    _phase(lease, "load", project=project_id, parent=parent)
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
    parent_dropout = parent_image_token_dropout(parent_dir)
    model = load_model(parent_dir)

    _phase(lease, "evaluate-parent", project=project_id, parent=parent)
    engine = InferenceEngine(model, version=f"parent-{parent}", max_new_tokens=settings.max_new_tokens)
    stored = stored_base_scores(parent_dir, lineage.evaluator.identity)
    parent_scores = evaluate(engine, split.gate, lineage.evaluator, stored)
    # The training turns the parent answers wrong: what the corrections teach (backend.finetune.focus).
    missed = missed_turns(engine, split.train) if settings.train_focus_turns else {}
    del engine

    earlier = set(read_metadata(parent_dir).get("lifted_tokens", []))  # lifted once per lineage
    lifted = _lift_new_tokens(model, split, lineage, earlier) if settings.train_lift_new_tokens else []
    cfg = train_config(settings, seed=snapshot_seq, parent_dropout=parent_dropout)
    history, train_seconds = _train(model, split, lineage, cfg, settings, project_id, lease, missed)

    _phase(lease, "evaluate-candidate", project=project_id)
    engine = InferenceEngine(model, version=f"candidate-{parent}", max_new_tokens=settings.max_new_tokens)
    candidate_scores = {
        **evaluate(engine, split.gate, lineage.evaluator),
        "base_eval": lineage.evaluator.identity,
    }
    decision = gate_decision(
        parent_scores, candidate_scores, settings.promote_tolerance, lineage.evaluator.metrics
    )
    accepted, reasons = decision["accepted"], decision["reasons"]

    _phase(lease, "commit", project=project_id, accepted=accepted)
    summary = {
        "project": project_id,
        "reason": reason,
        "parent": parent,
        "parent_scores": parent_scores,
        "candidate": candidate_scores,
        "gate": {"accepted": accepted, "reasons": reasons, "set": split.gate_set,
                 "tolerance": settings.promote_tolerance, "kinds": decision["kinds"],
                 "scripts": decision["scripts"], "malformed": decision["malformed"]},
        "data": _counts(split, candidate_scores, settings, snapshot_seq),
        "lifted_tokens": sorted(earlier | set(lifted)),
        "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                  "image_token_dropout": cfg.image_token_dropout, "freeze": cfg.freeze,
                  "max_turns": settings.train_max_turns, "focus_turns": settings.train_focus_turns,
                  "missed_turns": sum(map(len, missed.values())), "lifted_tokens": len(lifted),
                  "seconds": round(train_seconds, 1),
                  "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"]},
    }  # fmt: skip
    guard = lease.check if lease is not None else None
    version = commit_version(registry, model, cfg, summary, history, lineage.evaluator.metrics, t0, guard)
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


def _lift_new_tokens(
    model: RegionMLLM, split: CorrectionSplit, lineage: LineageData, earlier: set[int]
) -> list[int]:
    """Lift the input rows of the tokens the training corrections use and the parent never trained
    (:mod:`model.training.new_tokens`; trained = the tokens of a sample of the lineage's replay),
    but not those the lineage lifted ``earlier``."""
    replay = lineage.replay()
    sample = [replay[k] for k in range(min(len(replay), REPLAY_TOKEN_SAMPLE))]
    trained = text_token_ids(model, _texts(sample))
    needed = text_token_ids(model, _texts(split.train))
    lifted = lift_untrained_rows(model, needed - earlier, trained)
    log.info(
        "lifted new token rows", extra={"lifted": len(lifted), "needed": len(needed), "trained": len(trained)}
    )
    return lifted


def _texts(records: list[dict]) -> list[str]:
    """Every question and answer of ``records``."""
    return [text for r in records for turn in record_turns(r) for text in turn]


def _train(
    model: RegionMLLM,
    split: CorrectionSplit,
    lineage: LineageData,
    cfg: TrainConfig,
    settings: Settings,
    project_id: int,
    lease: TrainingLease | None,
    missed: dict[str, list[int]],
) -> tuple[list[dict], float]:
    """Train ``model`` in place on the corrections mixed with replay, each sample of a corrected
    image taking up to ``TRAIN_FOCUS_TURNS`` of its ``missed`` turns; returns (history, seconds)."""
    replay = lineage.replay()
    max_turns, focus = settings.train_max_turns, settings.train_focus_turns

    def pick(record: dict, index: int) -> dict:
        return focused_turns(record, missed, max_turns, focus, seed=index)

    data = MixedRecords(
        split.train, replay if settings.replay_fraction > 0 else [], settings.replay_fraction, pick=pick
    )
    _phase(lease, "train", project=project_id, step=0, steps=cfg.steps)
    t_train = time.monotonic()
    options = TrainOptions(
        max_turns=settings.train_max_turns,
        separate_turns=True,  # one question per prompt, as the default was trained and as serving asks
        progress=progress_reporter("train", {"project": project_id}, lease.ensure if lease else None),
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
