"""The fine-tuning job: current version + a project's corrections -> a gated, immutable new version.

1. ``load``: snapshot the project's corrections (store), fetch their images, split them into a
   training part and a held-out part (by annotation id, stable across runs; with fewer than
   ``HELDOUT_MIN_RECORDS`` corrected images nothing is held out and the gate uses the *new*
   corrections instead, which were also trained on), load the current version.
2. ``evaluate-parent``: score the current version on the gate's corrections and on the lineage's
   base evaluation (reused from the parent's ``metrics.json`` when computed on the same set).
3. ``train``: stage 2 with ``model.training.train`` on corrections mixed with the lineage's replay
   data (``REPLAY_FRACTION`` of every batch) so earlier skills are kept; each sample of a corrected
   image takes up to ``TRAIN_FOCUS_TURNS`` of the questions the parent answered wrong.
4. ``evaluate-candidate`` and the gate: promote only if no gated base figure drops by more than
   ``PROMOTE_TOLERANCE`` and the gate's corrections score is not lower than the parent's.
5. ``commit``: a new registry version (staging folder, one rename), promoted if the gate passed.

A worker killed at any point leaves at most a staging folder (removed by the worker at start and by
later jobs once older than ``JOB_TIMEOUT``); the job can simply run again.

Modules: :mod:`~backend.finetune.job` (the steps in order; ``run_finetune_job`` is the RQ entry
point, enqueued as ``backend.finetune.run_finetune_job``), :mod:`~backend.finetune.data`
(corrections, split, replay mixing), :mod:`~backend.finetune.focus` (the turns the parent misses),
:mod:`~backend.finetune.gate` (scores and the promotion rule), :mod:`~backend.finetune.commit`
(writing, committing, promoting), :mod:`~backend.finetune.sources` (replay data and base evaluation
of a lineage; the embedded default's come from the toy world).
"""

from backend.finetune.commit import plot_curve
from backend.finetune.data import MixedRecords, ReplaySource, load_images
from backend.finetune.gate import BaseEvaluator, gate, score_records
from backend.finetune.job import finetune_project, run_finetune_job
from backend.finetune.sources import LineageData, lineage_data

__all__ = [
    "BaseEvaluator",
    "LineageData",
    "MixedRecords",
    "ReplaySource",
    "finetune_project",
    "gate",
    "lineage_data",
    "load_images",
    "plot_curve",
    "run_finetune_job",
    "score_records",
]
