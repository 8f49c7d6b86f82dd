"""Safetensors checkpoints read tensor by tensor, without memory-mapping them.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the bytes. :func:`checkpoint_entries` reads only the headers of
a folder's shards (``model.safetensors``, or those ``model.safetensors.index.json`` lists), so a
checkpoint is checked whole before any weight is read; :func:`read_tensor` then reads one tensor
into fresh memory with a plain ``readinto``. No file is mapped, so the pages of a multi-gigabyte
shard never count toward the process's resident memory: only the tensor being read does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from peftlab.plugin.errors import ValidationError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100 * 2**20  # the safetensors library's own bound

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors one safetensors file holds, checked against the file's size."""
    path = Path(path)
    where = f"checkpoint file {path}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValidationError(where, f"{size} bytes", "a safetensors file (8-byte header length, JSON header, data)")
            length = int.from_bytes(head, "little")
            if length > MAX_HEADER or 8 + length > size:
                raise ValidationError(where, f"header length {length}", f"a header inside the file's {size} bytes")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise ValidationError(where, str(path), f"a readable file ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError(where, "its header", f"valid JSON ({exc})") from None
    base, entries = 8 + length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None:
            raise ValidationError(f"tensor {name} in {path}", info, f"a dtype of {', '.join(DTYPES)}")
        shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want or base + end > size:
            raise ValidationError(f"tensor {name} in {path}", f"bytes {begin}..{end}",
                                  f"{want} bytes for shape {shape} ({dtype}) inside the file's {size} bytes")
        entries[name] = TensorEntry(path, name, dtype, shape, base + begin, base + end)
    return entries


def checkpoint_entries(folder: Path) -> dict[str, TensorEntry] | None:
    """Every tensor of the safetensors checkpoint in ``folder`` (``None`` if it has none). A shard
    the index lists but the folder lacks, or a tensor the index places in a shard that does not
    hold it, is an error naming the file and the tensor."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValidationError(f"checkpoint index {index}", "its contents", f"JSON with a weight_map ({exc!r})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise ValidationError(f"checkpoint shard {folder / name}", "missing",
                                      f"every shard {INDEX} lists ({len(files)} files)")
        entries: dict[str, TensorEntry] = {}
        for name in files:
            entries.update(read_header(folder / name))
        for tensor, name in weight_map.items():
            found = entries.get(tensor)
            if found is None or found.file.name != Path(name).name:
                raise ValidationError(f"tensor {tensor}", f"not in {folder / name}", f"the shard {INDEX} names")
        return entries
    if (folder / SINGLE).is_file():
        return read_header(folder / SINGLE)
    return None


def read_tensor(f: BinaryIO, entry: TensorEntry, into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor, read from the open file ``f`` into fresh memory, or into the first bytes of
    ``into`` (a reused uint8 buffer, for tensors that only pass through)."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8) if into is None else into[: entry.nbytes]
    f.seek(entry.start)
    got = f.readinto(memoryview(buf.numpy())) if entry.nbytes else 0
    if got != entry.nbytes:
        raise ValidationError(f"tensor {entry.name} in {entry.file}", f"{got} bytes read", f"{entry.nbytes} bytes")
    return buf.view(entry.dtype).reshape(entry.shape)
