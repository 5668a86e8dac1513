"""Modules built without memory for their parameters, in one thread only.

accelerate's ``init_empty_weights`` swaps ``nn.Module.register_parameter`` for the whole process
while it runs: a module built meanwhile in another thread (a serving watcher, a request) gets meta
parameters too, and two overlapping uses can restore each other's patch and leave it for good.
Here the swap is installed once, at import, and only acts in a thread inside :func:`empty_weights`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["empty_weights"]

_state = threading.local()
_register_parameter = nn.Module.register_parameter


def _register_maybe_empty(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _register_parameter(module, name, param)
    if param is None or not getattr(_state, "depth", 0):
        return
    # As accelerate does: the same Parameter class and attributes, on the meta device.
    created = module._parameters[name]
    kwargs = dict(created.__dict__)
    kwargs["requires_grad"] = param.requires_grad
    hf_initialized = kwargs.pop("_is_hf_initialized", None)
    module._parameters[name] = type(created)(created.to(torch.device("meta")), **kwargs)
    if hf_initialized is not None:
        module._parameters[name]._is_hf_initialized = hf_initialized


nn.Module.register_parameter = _register_maybe_empty


@contextmanager
def empty_weights() -> Iterator[None]:
    """Parameters registered by this thread inside the block live on the meta device (no memory);
    buffers stay real (e.g. rotary frequencies, which checkpoints do not store).  Other threads are
    not affected."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
