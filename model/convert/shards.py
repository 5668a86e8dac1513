"""Reading Hugging Face weight folders one tensor at a time, and writing safetensors as a stream.

Host memory while converting stays near one tensor, whatever the shard sizes:

* ``.safetensors`` shards: each tensor is read through its own short-lived ``safe_open``;
* ``.bin`` shards: ``torch.load(weights_only=True, mmap=True)`` (never unpickles code, maps the
  file instead of reading it); the pages of a consumed tensor are handed back to the kernel
  (``madvise(MADV_DONTNEED)``, safe on a private read-only file mapping: a later read faults them
  in again from the file), since the mapping itself lives until the whole shard is dropped;
* :class:`StreamWriter` writes the safetensors header first (all shapes are known from the plan)
  and then each tensor's bytes in order; safetensors' own writer needs every tensor in memory.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["ConversionError", "ShardSet", "StreamWriter", "TensorInfo", "weight_files"]

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE = ("model.safetensors", "pytorch_model.bin")
_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MADV_DONTNEED = 4


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the key, file or size at fault."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def weight_files(folder: Path) -> list[Path]:
    """Weight shards of a Hugging Face folder, in index order (safetensors preferred)."""
    for name in INDEXES:
        index = folder / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ConversionError(f"{index}: not a weights index ({exc})") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise ConversionError(f"{index} lists shards that are missing: {missing}")
            return [folder / f for f in files]
    for name in SINGLE:
        if (folder / name).is_file():
            return [folder / name]
    raise ConversionError(f"{folder} holds no weights ({', '.join(INDEXES + SINGLE)})")


def _release(tensor: torch.Tensor) -> None:
    """Give the (mapped, read-only) pages of ``tensor``'s storage back to the kernel."""
    if not sys.platform.startswith("linux"):
        return
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    if size == 0:
        return
    aligned = start - start % mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(size + start - aligned), _MADV_DONTNEED)


class ShardSet:
    """The tensors of one weights folder: :attr:`infos` (key -> :class:`TensorInfo`) without reading
    any data, then :meth:`tensors` to stream them shard by shard."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = weight_files(folder)
        self.infos: dict[str, TensorInfo] = {}
        for file in self.files:
            for info in self._scan(file):
                if info.key in self.infos:
                    raise ConversionError(f"{folder}: tensor {info.key} appears in two shards")
                self.infos[info.key] = info
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _load_bin(file: Path) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the pre-1.6 (non-zip) format cannot be mapped; read it whole
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ConversionError(f"{file}: not a state dict")
        return state

    def _scan(self, file: Path) -> Iterator[TensorInfo]:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise ConversionError(f"{file}: tensor {key} has unsupported dtype {sl.get_dtype()}")
                    yield TensorInfo(key, file, tuple(sl.get_shape()), dtype)
            return
        state = self._load_bin(file)
        for key, tensor in state.items():
            yield TensorInfo(key, file, tuple(tensor.shape), tensor.dtype)
        del state

    def get(self, key: str) -> torch.Tensor:
        """A tensor as an independent in-memory copy (the mapped pages are released)."""
        info = self.infos[key]
        if info.file.suffix == ".safetensors":
            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(key)
        state = self._bin.get(info.file)
        if state is None:
            self._bin = {info.file: self._load_bin(info.file)}  # one mapped shard at a time
            state = self._bin[info.file]
        mapped = state[key]
        copy = mapped.clone()
        _release(mapped)
        return copy

    def close(self) -> None:
        self._bin.clear()


class StreamWriter:
    """Writes a safetensors file whose tensor list is known up front, one tensor at a time and in
    that order; the result is checked by reading its header back with ``safe_open``."""

    def __init__(
        self, path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict
    ) -> None:
        header: dict[str, object] = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
        offset = 0
        self._order: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        for key, shape, dtype in specs:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[key] = {
                "dtype": _DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._order.append((key, shape, dtype, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.path = path
        self.total = offset
        self._next = 0
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        name, shape, dtype, nbytes = self._order[self._next]
        if key != name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(
                f"writer expected {name} {list(shape)} {dtype}, got {key} {list(tensor.shape)} {tensor.dtype}"
            )
        flat = tensor.detach().contiguous().view(-1)
        self._file.write(flat.view(torch.uint8).numpy().data if nbytes else b"")
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise ConversionError(f"{self.path}: {len(self._order) - self._next} tensors were never written")
        with safe_open(str(self.path), framework="pt") as f:
            if len(list(f.keys())) != len(self._order):
                raise ConversionError(f"{self.path}: header check failed")
