"""Tensor files read and written one tensor at a time, so converting a file needs about one tensor's
worth of memory, not the whole model (SDXL is ~7 GB in fp16, ~14 GB in fp32).

Reading: safetensors are memory-mapped and read per tensor; `.ckpt` zip pickles are memory-mapped by
`torch.load(mmap=True)`. Writing: the safetensors layout is simple (8-byte header length, JSON header,
raw little-endian bytes), so the header is written from shapes and dtypes known in advance and each
tensor is appended as it is produced.
"""

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch

from .ckpt import load_pickle, state_dict_of
from .errors import ConversionError
from .io import PICKLE_SUFFIXES, check_readable, safetensors_header

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """A checkpoint opened for reading tensor by tensor: `specs` (known without loading), `get(key)`."""

    def __init__(self, path: Path):
        self.path = check_readable(Path(path))
        self.dropped: list[str] = []
        self.metadata: dict[str, str] = {}
        if self.path.suffix.lower() in PICKLE_SUFFIXES:
            self._tensors, self.dropped = state_dict_of(load_pickle(self.path), self.path.name)
            self.specs = {key: TensorSpec(value.dtype, tuple(value.shape)) for key, value in self._tensors.items()}
            self._handle = None
        else:
            header = safetensors_header(self.path)
            self.metadata = dict(header.pop("__metadata__", None) or {})
            self.specs = {key: _spec(key, entry, self.path) for key, entry in header.items()}
            self._handle = safetensors.safe_open(str(self.path), "pt")

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key] if self._handle is None else self._handle.get_tensor(key)

    def close(self) -> None:
        self._handle = self._tensors = None

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spec(key: str, entry: dict, path: Path) -> TensorSpec:
    if entry.get("dtype") not in CODE_DTYPES:
        raise ConversionError(f"'{path.name}' stores '{key}' as {entry.get('dtype')}, a type TuneKit cannot convert.")
    return TensorSpec(CODE_DTYPES[entry["dtype"]], tuple(entry["shape"]))


def write_streaming(path: Path, specs: dict[str, TensorSpec], produce: Callable[[str], torch.Tensor],
                    metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors come one at a time from `produce(key)`.

    Tensors go largest element size first, then by name (safetensors' own order), so every tensor
    stays aligned for readers that map it without copying.
    """
    order = sorted(specs, key=lambda key: (-torch.empty((), dtype=specs[key].dtype).element_size(), key))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        header[key] = {"dtype": DTYPE_CODES[specs[key].dtype], "shape": list(specs[key].shape),
                       "data_offsets": [offset, offset + specs[key].nbytes]}
        offset += specs[key].nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for key in order:
            tensor = produce(key)
            if tensor.dtype != specs[key].dtype or tuple(tensor.shape) != specs[key].shape:
                raise ConversionError(f"Internal error: '{key}' came out {tensor.dtype} {tuple(tensor.shape)}, "
                                      f"planned {specs[key].dtype} {specs[key].shape}.")
            handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
