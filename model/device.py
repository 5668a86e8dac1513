"""Device and dtype choice: CUDA + bf16 when present, CPU float32 otherwise."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "parse_dtype", "pick_device", "pick_dtype"]

# Names accepted on command lines and in settings.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` ('cpu', 'cuda', 'cuda:1', 'auto' or None) -> a usable device."""
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA devices that support it, float32 otherwise: on a CPU bf16 is faster only with
    bf16 instructions (AVX-512 BF16, AMX) and changes a small model's answers, so it is opt-in."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """``name`` ('auto', 'bf16', 'fp16', 'fp32') -> a dtype; 'auto' is :func:`pick_dtype`.
    Raises ValueError naming the accepted values."""
    if name == "auto":
        return pick_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]
