"""Writing a fine-tuned candidate as an immutable registry version, and promoting it.

The candidate is written into a registry staging folder (weights, config, ``metrics.json``,
``training_curve.png``, ``version.json`` with parent, data counts, figures and the gate decision),
committed by one rename, and promoted if the gate passed (Label Studio's project ``model_version``
follows).  A rejected candidate is kept as a version (for inspection and manual promotion) but not
made current.  The job's ``guard`` (its training lease) is confirmed right before the commit: a run
that lost its lease leaves no version and no staging folder.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from backend.label_studio import set_project_model_version
from backend.registry import ModelRegistry, RegistryError
from backend.settings import Settings
from model.checkpoint import VISION_WEIGHTS, save_checkpoint
from model.config import TrainConfig
from model.mllm import RegionMLLM

__all__ = [
    "CURVE",
    "METRICS",
    "commit_version",
    "plot_curve",
    "promote_if_accepted",
    "remove_stale_staging",
    "stored_base_scores",
]

CURVE = "training_curve.png"
METRICS = "metrics.json"
SOURCE = "backend.finetune"  # version.json's "source" of every fine-tuned version


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


def remove_stale_staging(registry: ModelRegistry, max_age: float) -> None:
    """Staging folders of killed jobs; recent ones may belong to a job running right now."""
    if not registry.staging_dir.is_dir():
        return
    for p in registry.staging_dir.iterdir():
        if time.time() - p.stat().st_mtime > max_age:
            shutil.rmtree(p, ignore_errors=True)


def stored_base_scores(version_dir: Path, identity: dict[str, Any]) -> dict | None:
    """A version's base scores from its own gate, if computed on the evaluation ``identity`` names."""
    try:
        cached = json.loads((version_dir / METRICS).read_text())["candidate"]
    except (OSError, ValueError, KeyError):
        return None
    if cached.get("base_eval") == identity:
        return cached["base"]
    return None


def commit_version(
    registry: ModelRegistry,
    model: RegionMLLM,
    cfg: TrainConfig,
    summary: dict,
    history: list[dict],
    base_metrics: Sequence[str],
    t0: float,
    guard: Callable[[], None] | None = None,
) -> str:
    """Write the candidate, its figures and metadata into a staging folder, then commit it under a
    new version of ``summary["parent"]``; returns the version.  ``base_metrics``: the base figures
    ``version.json`` lists (the gate's).  ``guard`` runs right before the commit and raises to stop
    it (the staging folder is removed)."""
    staging = registry.staging()
    try:
        return _write_and_commit(registry, staging, model, cfg, summary, history, base_metrics, t0, guard)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_and_commit(
    registry: ModelRegistry,
    staging: Path,
    model: RegionMLLM,
    cfg: TrainConfig,
    summary: dict,
    history: list[dict],
    base_metrics: Sequence[str],
    t0: float,
    guard: Callable[[], None] | None,
) -> str:
    parent = summary["parent"]
    parent_dir = registry.path(parent)
    save_checkpoint(model, staging, cfg, vision_source=parent_dir / VISION_WEIGHTS)
    figures = {
        **{f"base_{k}": summary["candidate"]["base"].get(k) for k in base_metrics},
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
            "source": SOURCE,
            "project": summary["project"],
            "data": summary["data"],
            "metrics": figures,
            "gate": summary["gate"],
            "curve": CURVE,
            "lifted_tokens": summary.get("lifted_tokens", []),  # input rows lifted in this lineage
        }
        (staging / "version.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
        if guard is not None:
            guard()
        try:
            registry.commit_folder(staging, version)
            return version
        except RegistryError:
            if (registry.versions_dir / version).exists():
                continue  # another job took this number meanwhile: take the next one
            raise


def promote_if_accepted(registry: ModelRegistry, settings: Settings, summary: dict, version: str) -> bool:
    """Make ``version`` current if the gate accepted it and nobody moved the pointer meanwhile (then
    Label Studio's project ``model_version`` follows); records the outcome in ``summary``."""
    project_id, parent, gate = summary["project"], summary["parent"], summary["gate"]
    promoted = False
    if gate["accepted"] and registry.current() == parent:
        registry.promote(version, reason=f"fine-tuned on project {project_id} corrections")
        promoted = True
        summary["label_studio"] = set_project_model_version(settings, project_id, version)
    elif gate["accepted"]:
        gate["reasons"].append(f"not promoted: current moved to {registry.current()} during the job")
    summary["promoted"] = promoted
    summary["decision"] = "promoted" if promoted else "rejected"
    return promoted
