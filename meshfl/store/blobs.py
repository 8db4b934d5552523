"""Tensor packs: named tensors in one file, read back as zero-copy views over a memory map.

Models are too big for LMDB values that get rewritten every round (copy-on-write pages make the
file grow), so a node keeps each task's input model and result as a pack file under
``home/blobs`` and only the name in LMDB. Packs are also how the node hands tensors to its
worker process and back: both sides map the same file, so nothing is pickled or piped.

Layout: ``b"MFLPACK1"``, u64 header length, orjson header ``[[name, dtype, shape, offset,
nbytes], ...]``, then the raw bytes of each tensor at its offset (64-byte aligned).
Durability: a pack written and renamed into place survives a crash of the process that wrote
it (the page cache keeps it); it is not fsynced, so an OS crash may lose the newest packs — the
node then reports the task failed rather than lose it silently.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np
import orjson
import torch

from ..errors import StoreError
from ..wire import DTYPE_NAMES, DTYPES

MAGIC = b"MFLPACK1"

_ALIGN = 64


def _byte_views(tensors, name: str):
    """Byte views of one tensor without copying: a received TensorMap's frames, else the tensor."""
    if hasattr(tensors, "pieces"):
        for _, view in tensors.pieces(name):
            yield memoryview(view.view(torch.uint8).numpy()).cast("B")
    else:
        t = tensors[name].detach().cpu().contiguous()
        yield memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _spec(tensors, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    if hasattr(tensors, "spec"):
        return tensors.spec(name)
    t = tensors[name]
    return t.dtype, tuple(t.shape), t.numel() * t.element_size()


def write_pack(path: Path, tensors: Mapping[str, torch.Tensor]) -> int:
    """Write ``tensors`` to ``path`` atomically (temp file + rename); returns the file size.

    A received :class:`~meshfl.wire.TensorMap` is written frame by frame, never gathered first.
    """
    path = Path(path)
    header, offset = [], 0
    for name in tensors:
        dtype, shape, nbytes = _spec(tensors, name)
        if dtype not in DTYPE_NAMES:
            raise StoreError(f"tensor {name!r}: unsupported dtype {dtype}", code="bad_value")
        header.append([name, DTYPE_NAMES[dtype], list(shape), offset, nbytes])  # offset from data start
        offset += -(-nbytes // _ALIGN) * _ALIGN
    head = orjson.dumps(header)
    data_start = -(-(16 + len(head)) // _ALIGN) * _ALIGN
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, data_start + offset)
        os.pwrite(fd, MAGIC + struct.pack("<Q", len(head)) + head, 0)
        for name, _, _, off, _ in header:
            pos = data_start + off
            for view in _byte_views(tensors, name):
                while view.nbytes:
                    n = os.pwrite(fd, view, pos)
                    pos += n
                    view = view[n:]
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return data_start + offset


def read_pack(path: Path) -> dict[str, torch.Tensor]:
    """Map a pack and return its tensors as views (private copy-on-write: writable, file intact)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 16:
                raise StoreError(f"pack {path.name} is truncated", code="corrupt")
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise StoreError(f"pack {path.name} is missing", code="not_found") from None
    if mm[:8] != MAGIC:
        raise StoreError(f"{path.name} is not a tensor pack", code="corrupt")
    (hlen,) = struct.unpack("<Q", mm[8:16])
    try:
        header = orjson.loads(mm[16 : 16 + hlen])
    except orjson.JSONDecodeError:
        raise StoreError(f"pack {path.name} has a corrupt header", code="corrupt") from None
    buf = np.frombuffer(mm, dtype=np.uint8)
    data_start = -(-(16 + hlen) // _ALIGN) * _ALIGN
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, off, nbytes in header:
        off += data_start
        if off + nbytes > size:
            raise StoreError(f"pack {path.name} is truncated", code="corrupt")
        dt = DTYPES[dtype]
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dt)
        else:
            out[name] = torch.from_numpy(buf[off : off + nbytes]).view(dt).reshape(shape)
    return out


class BlobStore:
    """Pack files in one folder, addressed by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"bad blob name {name!r}", code="bad_key")
        return self.folder / f"{name}.pack"

    def write(self, name: str, tensors: Mapping[str, torch.Tensor]) -> int:
        return write_pack(self.path(name), tensors)

    def read(self, name: str) -> dict[str, torch.Tensor]:
        return read_pack(self.path(name))

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
