"""Copies of a module's parameters re-arranged for inference, kept until a parameter changes.

Inference paths run on stacked or re-laid-out copies of weights (the LM's q/k/v as one matrix,
the region extractor's per-level convs as one conv).  Building such a copy costs a memory pass
over the weights - per call, more than the tiny matmuls they feed - so it is built once per module
and rebuilt when any parameter changed: training and loading a state dict bump the tensors'
version counters, moving the module to another device changes their storage.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["derived", "parameter_versions"]

T = TypeVar("T")

# per module, per name: (the parameters it was built from, their versions then, the value)
_Entry = tuple[list[nn.Parameter], list[tuple[int, int]], Any]
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, _Entry]] = weakref.WeakKeyDictionary()


def parameter_versions(params: list[nn.Parameter]) -> list[tuple[int, int]]:
    """(storage address, version counter) of every tensor of ``params``."""
    # Tensors made under ``torch.inference_mode`` (a model loaded there) keep no version counter;
    # such a model cannot be trained, so its storage address is enough.
    return [(p.data_ptr(), -1 if p.is_inference() else p._version) for p in params]


def derived(module: nn.Module, name: str, build: Callable[[], T]) -> T:
    """``build()`` - a value computed from ``module``'s parameters - cached under ``name`` and
    rebuilt when one of those parameters changed since it was built.

    The parameters are listed when the value is built (walking the module tree on every call
    would cost more than a small model's decode step saves): in-place updates, loads and device
    moves are seen, a parameter object replaced by another one is not.
    """
    entries = _CACHE.setdefault(module, {})
    hit = entries.get(name)
    if hit is not None and parameter_versions(hit[0]) == hit[1]:
        return hit[2]
    params = list(module.parameters())
    value = build()
    entries[name] = (params, parameter_versions(params), value)
    return value
