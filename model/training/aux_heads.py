"""Auxiliary per-box attribute heads on the region tokens (training only, never saved).

A small LM trained from scratch finds the box position in a region token long before it finds the
box's content: with the LM loss alone the tokens carried size but not colour or shape, and the
model answered colour from the image tokens instead (figures: docs/design-notes.md).  A linear
classifier per attribute on the region token, trained jointly with the LM loss, puts the content
into the token early; the LM then learns to read it.  Only records that carry ``box_labels`` (the
synthetic set) feed this loss; the heads are discarded after training, so checkpoints keep the
GPT4RoI layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.tasks import POSITION_COLUMNS, POSITION_ROWS, attribute_vocabulary, position_text

__all__ = ["BoxLabels", "RegionAttributeHeads", "with_positions"]

BoxLabels = Sequence[dict[str, str]] | None  # per box of one image: {"color": "red", ...}


class RegionAttributeHeads(nn.Module):
    """One linear classifier per attribute (colour, shape, size; with ``position`` also the
    column and row of the image's thirds holding the box centre) over ``dim``-wide region tokens."""

    def __init__(self, dim: int, position: bool = False) -> None:
        super().__init__()
        self.vocab = attribute_vocabulary()
        if position:
            self.vocab.update(column=POSITION_COLUMNS, row=POSITION_ROWS)
        self.heads = nn.ModuleDict({name: nn.Linear(dim, len(values)) for name, values in self.vocab.items()})

    def loss(
        self, tokens: torch.Tensor, labels: Sequence[BoxLabels], counts: Sequence[int]
    ) -> torch.Tensor | None:
        """Mean over attributes of the cross-entropy of every labelled box.

        ``tokens``: ``(sum N_i, D)`` region tokens in image-major box order (as
        :meth:`model.region_encoder.RegionEncoder.forward` returns them); ``labels``: per image a
        list of per-box dicts, or ``None`` for an image without labels; ``counts``: boxes per image.
        Returns ``None`` when no box of the batch is labelled.
        """
        rows: dict[str, list[int]] = {name: [] for name in self.vocab}
        targets: dict[str, list[int]] = {name: [] for name in self.vocab}
        if sum(counts) != tokens.shape[0] or len(counts) != len(labels):
            raise ValueError(f"{tokens.shape[0]} region tokens for box counts {list(counts)}")
        offset = 0
        for image_labels, count in zip(labels, counts):
            if image_labels is not None:
                if len(image_labels) != count:
                    raise ValueError(f"{len(image_labels)} box labels for an image with {count} boxes")
                for k, box in enumerate(image_labels):
                    for name, values in self.vocab.items():
                        if box.get(name) in values:
                            rows[name].append(offset + k)
                            targets[name].append(values.index(box[name]))
            offset += count
        losses = [
            F.cross_entropy(
                self.heads[name](tokens[rows[name]].float()),
                torch.tensor(targets[name], device=tokens.device),
            )
            for name in self.vocab
            if rows[name]
        ]
        return torch.stack(losses).mean() if losses else None


def with_positions(labels: Sequence[BoxLabels], boxes: Sequence[torch.Tensor]) -> list[BoxLabels]:
    """``labels`` with every box's ``column`` and ``row`` added (the thirds of the image holding
    its centre; ``boxes``: per image ``(N_i, 4)`` normalised), for images that have labels."""
    out: list[BoxLabels] = []
    for image_labels, b in zip(labels, boxes):
        if image_labels is None:
            out.append(None)
            continue
        places = [position_text(box, 1, 1).split() for box in b.reshape(-1, 4).tolist()]
        out.append([{**lab, "row": row, "column": col} for lab, (row, col) in zip(image_labels, places)])
    return out
