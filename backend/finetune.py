"""The fine-tuning job: current version + a project's corrections -> a gated, immutable new version.

Steps (``job.meta["phase"]`` names them):

1. ``load``: snapshot the project's corrections (store), fetch their images, split them into a
   training part and a held-out part (by annotation id, stable across runs; with fewer than
   ``HELDOUT_MIN_RECORDS`` corrected images nothing is held out and the gate uses the *new*
   corrections instead, which were also trained on), load the current version.
2. ``evaluate-parent``: score the current version on the held-out corrections and on the base
   evaluation set (``toyworld.evaluate.eval_scenes``, default ``SceneSpec``; reused from the parent's
   ``metrics.json`` when it was computed with the same settings).
3. ``train``: stage 2 (region encoder + projector + LM or its LoRA adapters; vision frozen) with
   ``model.training.train`` on corrections mixed with a replay sample of the base synthetic data
   (``REPLAY_FRACTION`` of every batch) so earlier skills are kept.
4. ``evaluate-candidate`` and the gate: promote only if no base metric drops by more than
   ``PROMOTE_TOLERANCE`` and the held-out corrections score is not lower than the parent's.
5. ``commit``: the candidate is written into a registry staging folder (weights, config,
   ``metrics.json``, ``training_curve.png``, ``version.json`` with parent, data counts, figures and
   the gate decision), committed by one rename, and promoted if the gate passed.  A rejected
   candidate is kept as a version (for inspection and manual promotion) but not made current.

A worker killed at any point leaves at most a staging folder (removed by the worker at start and by
later jobs once older than ``JOB_TIMEOUT``); the job can simply run again.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backend.images import ImageError, ImageFetcher
from backend.jobs import progress_reporter, set_phase
from backend.label_studio import set_project_model_version
from backend.registry import ModelRegistry, RegistryError
from backend.settings import Settings, get_settings
from backend.store import CorrectionStore, open_store
from model.checkpoint import VISION_WEIGHTS, load_model, save_checkpoint
from model.config import TrainConfig
from model.data.dataset import load_jsonl_records, record_turns
from model.geometry import boxes_tensor
from model.inference.engine import InferenceEngine
from model.tasks import ATTRIBUTE_QUESTIONS, CAPTION_QUESTIONS, RELATION_QUESTIONS
from model.training import train
from toyworld.build_default import load_recipe, training_records
from toyworld.evaluate import eval_scenes, score_scenes
from toyworld.scenes import SceneSpec

log = logging.getLogger(__name__)

MAX_ROUNDS = 3  # follow-up rounds one job runs for requests that arrive while it trains
GATE_SEED = 0
BASE_METRICS = ("caption_exact_match", "attribute_accuracy", "relation_accuracy")
CURVE = "training_curve.png"
METRICS = "metrics.json"


class MixedRecords(Sequence):
    """Corrections mixed with replay data at a fixed share.

    ``model.training.train`` samples indices uniformly, so the first ``(1 - replay_fraction)`` of a
    virtual index space maps onto the corrections (cycled: each virtual index also draws its own
    subset of a record's turns) and the rest onto the replay set.
    """

    def __init__(
        self, corrections: Sequence[dict], replay: Sequence[dict], replay_fraction: float, size: int = 20_000
    ) -> None:
        if not corrections:
            raise ValueError("no corrections to train on")
        self.corrections, self.replay, self.size = corrections, replay, size
        self.n_corrections = size if not replay else max(1, round(size * (1.0 - replay_fraction)))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        if index < self.n_corrections:
            return self.corrections[index % len(self.corrections)]
        # A large odd stride spreads consecutive virtual indices over the whole replay set.
        return self.replay[((index - self.n_corrections) * 7_919) % len(self.replay)]


# ---------------------------------------------------------------------- scoring
def _template_regex(templates: Sequence[str]) -> re.Pattern[str]:
    parts = [
        re.escape(t).replace(r"\{a\}", r"<region\d+>").replace(r"\{b\}", r"<region\d+>") for t in templates
    ]
    return re.compile("^(?:" + "|".join(parts) + ")$")


KINDS = {
    "caption": _template_regex(CAPTION_QUESTIONS),
    "attribute": _template_regex([q for qs in ATTRIBUTE_QUESTIONS.values() for q in qs]),
    "relation": _template_regex(RELATION_QUESTIONS),
}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def score_records(engine: InferenceEngine, records: Sequence[dict], batch: int = 8) -> dict[str, Any]:
    """Exact-match rate of the engine's answers to every question of ``records`` (in-memory images)."""
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        boxes = [boxes_tensor(r["boxes"], r["width"], r["height"]) for r in chunk]
        turns = [(i, q, a) for i, r in enumerate(chunk) for q, a in record_turns(r)]
        answers = engine.answer([r["image"] for r in chunk], boxes, [(i, q) for i, q, _ in turns])
        for (_, q, a), ans in zip(turns, answers):
            kind = next((k for k, rx in KINDS.items() if rx.match(q)), "other")
            total[kind] = total.get(kind, 0) + 1
            right[kind] = right.get(kind, 0) + int(_norm(ans.text) == _norm(a))
    n = sum(total.values())
    return {
        "accuracy": sum(right.values()) / n if n else math.nan,
        **{f"{k}_accuracy": right[k] / total[k] for k in total},
        "questions": n,
    }


def base_scores(engine: InferenceEngine, images: int) -> dict[str, Any]:
    result = score_scenes(engine, eval_scenes(GATE_SEED, images, SceneSpec()))
    result.pop("captions")
    return result


def gate(parent: dict, candidate: dict, tolerance: float) -> tuple[bool, list[str]]:
    """Promotion rule; returns ``(accepted, reasons for rejection)``.  NaN figures are not compared."""
    reasons = []
    for key in BASE_METRICS:
        p, c = parent["base"].get(key, math.nan), candidate["base"].get(key, math.nan)
        if not (math.isnan(p) or math.isnan(c)) and c < p - tolerance:
            reasons.append(f"base {key} {c:.4f} < parent {p:.4f} - {tolerance}")
    p, c = parent["corrections"]["accuracy"], candidate["corrections"]["accuracy"]
    if not (math.isnan(p) or math.isnan(c)) and c < p:
        reasons.append(f"held-out corrections {c:.4f} < parent {p:.4f}")
    return not reasons, reasons


def plot_curve(history: Sequence[dict], path: Path, title: str) -> None:
    """Loss per step (and a moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless worker
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    k = max(1, len(loss) // 20)
    smooth = [
        sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- data
def replay_records(settings: Settings) -> Sequence[dict]:
    """Earlier data mixed into fine-tuning: the embedded default's own synthetic training set, or
    the region-text JSONL file ``REPLAY_DATA`` names (for real weights and real data)."""
    if settings.replay_data == "synthetic":
        return training_records(load_recipe())
    path = Path(settings.replay_data)
    if not path.is_file():
        raise FileNotFoundError(f"REPLAY_DATA {path} is not a file (use 'synthetic' or a JSONL file)")
    return load_jsonl_records(path)


def _held_out(annotation_id: int, fraction: float) -> bool:
    return zlib.crc32(f"heldout-{annotation_id}".encode()) % 10_000 < fraction * 10_000


def load_images(records: list[dict], settings: Settings) -> tuple[list[dict], list[str]]:
    """Replace each record's image reference by the decoded image; unreadable ones are dropped."""
    fetcher = ImageFetcher(settings)
    loaded, failed = [], []
    for rec in records:
        try:
            image = fetcher.fetch(rec["image"], rec.get("task_id"))
        except ImageError as exc:
            failed.append(f"{rec['id']}: {exc.message}")
            continue
        loaded.append({**rec, "image": image, "image_ref": rec["image"]})
    return loaded, failed


def _remove_stale_staging(registry: ModelRegistry, max_age: float) -> None:
    """Staging folders of killed jobs; recent ones may belong to a job running right now."""
    if not registry.staging_dir.is_dir():
        return
    for p in registry.staging_dir.iterdir():
        if time.time() - p.stat().st_mtime > max_age:
            shutil.rmtree(p, ignore_errors=True)


def _parent_base(parent_dir: Path, images: int) -> dict | None:
    """The parent's base scores from its own gate, if computed with the same evaluation set."""
    try:
        cached = json.loads((parent_dir / METRICS).read_text())["candidate"]
    except (OSError, ValueError, KeyError):
        return None
    if cached.get("base_eval") == {"seed": GATE_SEED, "images": images}:
        return cached["base"]
    return None


# ---------------------------------------------------------------------- the job
def finetune_project(
    project_id: int, settings: Settings, store: CorrectionStore, registry: ModelRegistry, reason: str = ""
) -> dict[str, Any]:
    """One fine-tuning round for a project; returns the summary recorded in ``metrics.json``."""
    _remove_stale_staging(registry, settings.job_timeout)
    previous_seq, snapshot_seq = store.begin_training(project_id)
    try:
        summary = _finetune(project_id, settings, store, registry, previous_seq, snapshot_seq, reason)
    except BaseException:
        store.abort_training(project_id, previous_seq, snapshot_seq)
        raise
    store.finish_training(project_id, summary.get("version"), summary["decision"])
    return summary


def _finetune(
    project_id: int,
    settings: Settings,
    store: CorrectionStore,
    registry: ModelRegistry,
    previous_seq: int,
    snapshot_seq: int,
    reason: str,
) -> dict[str, Any]:
    t0 = time.monotonic()
    parent = registry.current()
    parent_dir = registry.path(parent)
    set_phase("load", project=project_id, parent=parent)
    records, failed = load_images(store.export_records(project_id), settings)
    if not records:
        log.warning("project %s: no usable corrections (%d unreadable images)", project_id, len(failed))
        return {"project": project_id, "parent": parent, "decision": "no-data", "unreadable": failed}
    if len(records) >= settings.heldout_min_records:
        held = [r for r in records if _held_out(r["annotation_id"], settings.heldout_fraction)]
        train_records = [r for r in records if not _held_out(r["annotation_id"], settings.heldout_fraction)]
        gate_set = "held-out corrections (never trained on)"
    else:
        held, train_records = [], records
    if not held or not train_records:
        new_ids = {r["annotation_id"] for r in store.export_records(project_id, since_seq=previous_seq)}
        held = [r for r in records if r["annotation_id"] in new_ids] or records
        train_records = records
        gate_set = "new corrections (also trained on: too few corrections to hold any out)"
    model = load_model(parent_dir)

    set_phase("evaluate-parent", project=project_id, parent=parent)
    engine = InferenceEngine(model, version=f"parent-{parent}", max_new_tokens=settings.max_new_tokens)
    parent_scores = {
        "corrections": score_records(engine, held),
        "base": _parent_base(parent_dir, settings.gate_eval_images)
        or base_scores(engine, settings.gate_eval_images),
    }
    del engine

    cfg = TrainConfig(
        stage=2,
        steps=settings.train_steps,
        batch_size=settings.train_batch_size,
        lr=settings.train_lr,
        warmup_steps=min(20, max(1, settings.train_steps // 10)),
        seed=snapshot_seq,
        log_every=max(1, settings.train_steps // 20),
        replay_fraction=settings.replay_fraction,
        update_norm_stats=False,  # a few skewed correction batches must not renormalise every box
    )
    replay = replay_records(settings)
    data = MixedRecords(
        train_records, replay if settings.replay_fraction > 0 else [], settings.replay_fraction
    )
    set_phase("train", project=project_id, step=0, steps=cfg.steps)
    t_train = time.monotonic()
    history = train(
        model,
        data,
        cfg,
        progress=progress_reporter("train", {"project": project_id}),
        max_turns=settings.train_max_turns,
        separate_turns=True,  # one question per prompt, as the default was trained and as serving asks
        show_bar=False,
    )
    train_seconds = time.monotonic() - t_train

    set_phase("evaluate-candidate", project=project_id)
    engine = InferenceEngine(model, version=f"candidate-{parent}", max_new_tokens=settings.max_new_tokens)
    candidate_scores = {
        "corrections": score_records(engine, held),
        "base": base_scores(engine, settings.gate_eval_images),
        "base_eval": {"seed": GATE_SEED, "images": settings.gate_eval_images},
    }
    accepted, reasons = gate(parent_scores, candidate_scores, settings.promote_tolerance)

    set_phase("commit", project=project_id, accepted=accepted)
    counts = {
        "corrected_images": len(records),
        "train_images": len(train_records),
        "gate_images": len(held),
        "train_regions": sum(len(r["boxes"]) for r in train_records),
        "gate_questions": candidate_scores["corrections"]["questions"],
        "unreadable_images": len(failed),
        "replay_fraction": settings.replay_fraction,
        "snapshot_seq": snapshot_seq,
    }
    summary = {
        "project": project_id,
        "reason": reason,
        "parent": parent,
        "parent_scores": parent_scores,
        "candidate": candidate_scores,
        "gate": {"accepted": accepted, "reasons": reasons, "set": gate_set,
                 "tolerance": settings.promote_tolerance},
        "data": counts,
        "train": {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                  "max_turns": settings.train_max_turns, "seconds": round(train_seconds, 1),
                  "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"]},
    }  # fmt: skip
    staging = registry.staging()
    save_checkpoint(model, staging, cfg, vision_source=parent_dir / VISION_WEIGHTS)
    version = _commit(registry, staging, parent, summary, history, t0)
    summary["version"] = version
    promoted = False
    if accepted and registry.current() == parent:
        registry.promote(version, reason=f"fine-tuned on project {project_id} corrections")
        promoted = True
        summary["label_studio"] = set_project_model_version(settings, project_id, version)
    elif accepted:
        reasons.append(f"not promoted: current moved to {registry.current()} during the job")
    summary["promoted"] = promoted
    summary["decision"] = "promoted" if promoted else "rejected"
    log.info("project %s: %s %s (%s)", project_id, summary["decision"], version, "; ".join(reasons) or "ok")
    set_phase("done", project=project_id, version=version, decision=summary["decision"])
    return summary


def _commit(
    registry: ModelRegistry, staging: Path, parent: str, summary: dict, history: list[dict], t0: float
) -> str:
    """Write figures and metadata into the staging folder, then commit it under a new version."""
    figures = {
        **{f"base_{k}": summary["candidate"]["base"].get(k) for k in BASE_METRICS},
        "corrections_accuracy": summary["candidate"]["corrections"]["accuracy"],
        "parent_corrections_accuracy": summary["parent_scores"]["corrections"]["accuracy"],
    }
    while True:
        version = registry.next_version(parent)
        summary["seconds"] = round(time.monotonic() - t0, 1)
        plot_curve(history, staging / CURVE, f"fine-tune {version} (project {summary['project']})")
        (staging / METRICS).write_text(json.dumps({**summary, "history": history}, indent=2, default=float))
        meta = {
            "version": version,
            "parent": parent,
            "stage": 2,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": "backend.finetune",
            "project": summary["project"],
            "data": summary["data"],
            "metrics": figures,
            "gate": summary["gate"],
            "curve": CURVE,
        }
        (staging / "version.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
        try:
            registry.commit_folder(staging, version)
            return version
        except RegistryError:
            if (registry.versions_dir / version).exists():
                continue  # another job took this number meanwhile: take the next one
            raise


def run_finetune_job(project_id: int, reason: str = "") -> dict[str, Any]:
    """RQ entry point: fine-tune, then run follow-up rounds for requests made meanwhile."""
    settings = get_settings()
    store = open_store(settings.data_dir)
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    rounds = []
    for n in range(MAX_ROUNDS):
        summary = finetune_project(project_id, settings, store, registry, reason if n == 0 else "follow-up")
        rounds.append({k: summary.get(k) for k in ("version", "decision", "parent", "gate", "data")})
        if not store.take_followup(project_id):
            break
    return {"project": project_id, "rounds": rounds}
