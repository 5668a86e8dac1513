"""Device and dtype choice: CUDA + bf16 when present, CPU float32 otherwise."""

from __future__ import annotations

import torch

__all__ = ["pick_device", "pick_dtype"]


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` ('cpu', 'cuda', 'cuda:1', 'auto' or None) -> a usable device."""
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA devices that support it, float32 otherwise (CPU bf16 matmuls are slow here)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
