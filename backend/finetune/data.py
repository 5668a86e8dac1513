"""The fine-tuning job's data: a project's corrections (split for the gate), earlier data to replay.

Corrections come from the store with their images fetched; they are split by annotation id (stable
across runs) into a training part and a held-out part for the gate.  Replay data is whatever the
model's lineage was trained on (:mod:`backend.finetune.sources` chooses it); :class:`MixedRecords`
mixes it into every batch at ``REPLAY_FRACTION``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from backend.images import ImageError, ImageFetcher
from backend.settings import Settings
from backend.store import CorrectionStore
from model.data.dataset import load_jsonl_records

__all__ = [
    "CorrectionSplit",
    "JsonlData",
    "MixedRecords",
    "ReplaySource",
    "load_corrections",
    "load_images",
]

ReplaySource = Callable[[], Sequence[dict]]
"""Earlier data of the model's lineage (region-text records), mixed into fine-tuning batches."""


class MixedRecords(Sequence):
    """Corrections mixed with replay data at a fixed share.

    ``model.training.train`` samples indices uniformly, so the first ``(1 - replay_fraction)`` of a
    virtual index space maps onto the corrections (cycled: each virtual index also draws its own
    subset of a record's turns) and the rest onto the replay set.  ``pick(record, index)``, if
    given, chooses the turns of a correction drawn at virtual ``index``
    (:func:`backend.finetune.focus.focused_turns`).
    """

    def __init__(
        self,
        corrections: Sequence[dict],
        replay: Sequence[dict],
        replay_fraction: float,
        size: int = 20_000,
        pick: Callable[[dict, int], dict] | None = None,
    ) -> None:
        if not corrections:
            raise ValueError("no corrections to train on")
        self.corrections, self.replay, self.size, self.pick = corrections, replay, size, pick
        self.n_corrections = size if not replay else max(1, round(size * (1.0 - replay_fraction)))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        if index < self.n_corrections:
            record = self.corrections[index % len(self.corrections)]
            return self.pick(record, index) if self.pick is not None else record
        # A large odd stride spreads consecutive virtual indices over the whole replay set.
        return self.replay[((index - self.n_corrections) * 7_919) % len(self.replay)]


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


@dataclass
class CorrectionSplit:
    """A project's usable corrected images and the part of them the gate scores.

    ``gate`` is held out of ``train`` when there are enough corrections; otherwise it is the new
    corrections (trained on as well), and ``gate_set`` says which.
    """

    records: list[dict]
    train: list[dict] = field(default_factory=list)
    gate: list[dict] = field(default_factory=list)
    gate_set: str = ""
    unreadable: list[str] = field(default_factory=list)


def load_corrections(
    project_id: int, settings: Settings, store: CorrectionStore, previous_seq: int
) -> CorrectionSplit:
    """The project's corrections with images, split for training and the gate (see the class)."""
    records, failed = load_images(store.export_records(project_id), settings)
    if not records:
        return CorrectionSplit(records, unreadable=failed)
    held: list[dict] = []
    train_records = records
    if len(records) >= settings.heldout_min_records:
        held = [r for r in records if _held_out(r["annotation_id"], settings.heldout_fraction)]
        train_records = [r for r in records if not _held_out(r["annotation_id"], settings.heldout_fraction)]
        gate_set = "held-out corrections (never trained on)"
    if not held or not train_records:
        new_ids = {r["annotation_id"] for r in store.export_records(project_id, since_seq=previous_seq)}
        held = [r for r in records if r["annotation_id"] in new_ids] or records
        train_records = records
        gate_set = "new corrections (also trained on: too few corrections to hold any out)"
    return CorrectionSplit(records, train_records, held, gate_set, failed)


class JsonlData:
    """A region-text JSONL file of a model's earlier data (``REPLAY_DATA``), read once.

    Up to ``held_out`` records, at most ``held_out_fraction`` of the file and chosen by a stable
    hash of their id, are kept for the gate's base evaluation; the rest is replayed.
    """

    def __init__(self, path: Path, held_out: int, held_out_fraction: float) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"REPLAY_DATA {path} is not a file (use 'synthetic' or a JSONL file)")
        self.path, self._held_out, self._fraction = path, held_out, held_out_fraction

    @cached_property
    def _split(self) -> tuple[list[dict], list[dict]]:
        records = load_jsonl_records(self.path)
        ranked = sorted(
            range(len(records)), key=lambda i: (zlib.crc32(f"base-{records[i]['id']}".encode()), i)
        )
        chosen = set(ranked[: min(self._held_out, int(len(records) * self._fraction))])
        replay = [r for i, r in enumerate(records) if i not in chosen]
        return replay, [records[i] for i in sorted(chosen)]

    def replay(self) -> list[dict]:
        """The records mixed into fine-tuning (never the held-out ones)."""
        return self._split[0]

    def held_out(self) -> list[dict]:
        """The records the gate's base evaluation scores (never trained on by the job)."""
        return self._split[1]
