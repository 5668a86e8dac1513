"""Copies of a module's parameters re-arranged for inference, kept until a parameter changes.

Inference paths run on stacked or re-laid-out copies of weights (the LM's q/k/v as one matrix,
the region extractor's per-level convs as one conv).  Building such a copy costs a memory pass
over the weights - per call, more than the tiny matmuls they feed - so it is built once per module
and rebuilt when any parameter changed: training bumps every tensor's version counter, and
loading a state dict or swapping a parameter changes its storage or its version.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T")

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[list[tuple[int, int]], Any]]] = (
    weakref.WeakKeyDictionary()
)


def parameter_versions(module: nn.Module) -> list[tuple[int, int]]:
    """(storage address, version counter) of every parameter of ``module``."""
    # Tensors made under ``torch.inference_mode`` (a model loaded there) keep no version counter;
    # such a model cannot be trained, so its storage address is enough.
    return [(p.data_ptr(), -1 if p.is_inference() else p._version) for p in module.parameters()]


def derived(module: nn.Module, name: str, build: Callable[[], T]) -> T:
    """``build()`` - a value computed from ``module``'s parameters - cached under ``name`` and
    rebuilt when one of those parameters changed since it was built."""
    entries = _CACHE.setdefault(module, {})
    versions = parameter_versions(module)
    hit = entries.get(name)
    if hit is not None and hit[0] == versions:
        return hit[1]
    value = build()
    entries[name] = (versions, value)
    return value
