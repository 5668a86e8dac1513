"""The engine's per-image cache: the work one image costs, kept in an LRU bounded by bytes.

An entry is keyed by (model version, image content hash) so a new model version never reuses
another version's prefix.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from model.inference.question_tree import QuestionNodes

__all__ = ["ImageState", "SizedLRU"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class ImageState:
    """Cached per-image work.  ``region_maps``: the fused pyramid, same-size levels stacked
    (``RegionEncoder.fuse``), ``(1, n * F, s, s)`` per level size; ``prefix_kv``: per LM layer
    ``(keys, values)`` each ``(1, heads, P, head_dim)``; ``descriptor``: ``(1, E)`` what the
    picture is like overall (:func:`model.calibration.image_descriptors`); ``questions``: keys and
    values of the question tokens asked on the image so far (a request computes only the ones it
    adds)."""

    region_maps: list[torch.Tensor]
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]
    descriptor: torch.Tensor
    questions: QuestionNodes = field(default_factory=lambda: QuestionNodes(0))

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.prefix_kv for t in pair] + self.region_maps + [self.descriptor]
        return sum(t.numel() * t.element_size() for t in tensors) + self.questions.nbytes


class SizedLRU(Generic[K, V]):
    """Thread-safe LRU mapping bounded by the total ``size(value)`` of its entries.

    A value larger than the whole capacity is not stored.  ``hits`` / ``misses`` count
    :meth:`get` calls.
    """

    def __init__(self, capacity: int, size: Callable[[V], int]) -> None:
        self.capacity = capacity
        self._size = size
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: K, value: V) -> None:
        """Store ``value``, evicting the least recently used entries beyond the capacity."""
        nbytes = self._size(value)
        if nbytes > self.capacity:
            return
        with self._lock:
            if key in self._items:
                self._used -= self._items.pop(key)[1]
            self._items[key] = (value, nbytes)
            self._used += nbytes
            while self._used > self.capacity:
                _, (_, old) = self._items.popitem(last=False)
                self._used -= old

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._used = 0

    @property
    def used(self) -> int:
        """Total size of the entries held."""
        return self._used

    def __len__(self) -> int:
        return len(self._items)
