"""Tensor packs: named tensors in one file, read back as zero-copy views over a memory map.

Models are too big for LMDB values that get rewritten every round (copy-on-write pages make the
file grow), so a node keeps each task's input model and result as a pack file under
``home/blobs`` and only the name in LMDB. Packs are also how the node hands tensors to its
worker process and back: the worker maps the task's pack to read the model and writes its result
back over it (:func:`update_pack`), so nothing is pickled or piped.

Writes go through ``pwrite`` from the tensors' own memory, never through a shared writable
mapping: on ext4 every first write to a mapped 4 KiB page faults and dirties the inode, which
cost 2 ms per 4 MB here, ten times the copy itself.

Layout: ``b"MFLPACK1"``, u64 header length, orjson header ``[[name, dtype, shape, offset,
nbytes], ...]``, then the raw bytes of each tensor at its offset (64-byte aligned).
Durability: a pack written and renamed into place survives a crash of the process that wrote
it (the page cache keeps it); it is not fsynced, so an OS crash may lose the newest packs — the
node then reports the task failed rather than lose it silently.
"""

from __future__ import annotations

import contextlib
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


def byte_views(tensors, name: str):
    """Byte views of one tensor without copying: a received TensorMap's frames, else the tensor."""
    if hasattr(tensors, "pieces"):
        for _, view in tensors.pieces(name):
            yield memoryview(view.view(torch.uint8).numpy()).cast("B")
    else:
        t = tensors[name].detach().cpu().contiguous()
        if t.numel():  # an empty tensor has no bytes (and its strides cannot be viewed as bytes)
            yield memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _spec(tensors, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    if hasattr(tensors, "spec"):
        return tensors.spec(name)
    t = tensors[name]
    return t.dtype, tuple(t.shape), t.numel() * t.element_size()


def write_pack(path: str | Path, tensors: Mapping[str, torch.Tensor], reuse: str | Path | None = None) -> int:
    """Write ``tensors`` to ``path`` atomically (temp file + rename); returns the file size.

    A received :class:`~meshfl.wire.TensorMap` is written frame by frame, never gathered first.
    ``reuse`` names a spare pack file to overwrite instead of a new one: its pages are already
    in memory, so writing a model costs a memcpy instead of page allocation.
    """
    tmp = f"{path}.tmp"
    fresh = True
    if reuse is not None:
        try:
            os.replace(reuse, tmp)
            fresh = False
        except FileNotFoundError:
            pass
    size = _write_file(tmp, tensors, fresh)
    os.replace(tmp, path)
    return size


def _write_file(tmp: str, tensors: Mapping[str, torch.Tensor], fresh: bool) -> int:
    """Write a pack into file ``tmp`` (created, or overwritten in place unless ``fresh``); a
    failed write leaves no file."""
    header, offset = [], 0
    for name in tensors:
        dtype, shape, nbytes = _spec(tensors, name)
        if dtype not in DTYPE_NAMES:
            if not fresh:
                os.unlink(tmp)
            raise StoreError(f"tensor {name!r}: unsupported dtype {dtype}", code="bad_value")
        header.append([name, DTYPE_NAMES[dtype], list(shape), offset, nbytes])  # offset from data start
        offset += -(-nbytes // _ALIGN) * _ALIGN
    head = orjson.dumps(header)
    data_start = _data_start(len(head))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if fresh else 0), 0o600)
    try:
        os.ftruncate(fd, data_start + offset)
        os.pwrite(fd, MAGIC + struct.pack("<Q", len(head)) + head, 0)
        for name, _, _, off, nbytes in header:
            if pwrite_all(fd, byte_views(tensors, name), data_start + off) != nbytes:
                raise StoreError(f"tensor {name!r}: its data is not {nbytes} bytes", code="bad_value")
    except BaseException:
        os.close(fd)
        os.unlink(tmp)  # never a half-written pack, nor its temporary
        raise
    os.close(fd)
    return data_start + offset


def _data_start(header_len: int) -> int:
    return -(-(16 + header_len) // _ALIGN) * _ALIGN


def pwrite_all(fd: int, views, pos: int) -> int:
    """Write ``views`` one after the other from ``pos``; returns the bytes written."""
    start = pos
    for view in views:
        while view.nbytes:
            n = os.pwrite(fd, view, pos)
            pos += n
            view = view[n:]
    return pos - start


def update_pack(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Overwrite every tensor of the pack at ``path`` in place with ``tensors`` (the same names,
    dtypes and shapes): how a worker returns its result in the very file it got the model in.
    The header is read with ``pread`` (no mapping: an unmap per task showed in a small round)."""
    label = os.path.basename(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise StoreError(f"pack {label} is missing", code="not_found") from None
    try:
        head = os.pread(fd, 4096, 0)
        if len(head) >= 16 and head[:8] == MAGIC:
            (hlen,) = struct.unpack("<Q", head[8:16])
            if len(head) < 16 + hlen <= os.fstat(fd).st_size:
                head += os.pread(fd, 16 + hlen - len(head), len(head))
        header, data_start = _parse_header(head, label)
        layout = {name: (dtype, list(shape)) for name, dtype, shape, _, _ in header}
        given = {name: (DTYPE_NAMES.get(t.dtype), list(t.shape)) for name, t in tensors.items()}
        if given != layout:
            raise StoreError(f"tensors do not match the layout of pack {label}", code="bad_value")
        for name, _, _, off, _ in header:
            pwrite_all(fd, byte_views(tensors, name), data_start + off)
    finally:
        os.close(fd)


def read_pack(path: str | Path) -> dict[str, torch.Tensor]:
    """Map a pack and return its tensors as views. The mapping is private (copy-on-write): the
    tensors are writable and the file stays intact."""
    label = os.path.basename(path)
    with _open_pack(path, "rb") as (f, mm):
        header, data_start = _parse_header(mm, label)
    buf = np.frombuffer(mm, dtype=np.uint8)
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, off, nbytes in header:
        off += data_start
        if off + nbytes > mm.size():
            raise StoreError(f"pack {label} is truncated", code="corrupt")
        dt = DTYPES[dtype]
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dt)
        else:
            out[name] = torch.from_numpy(buf[off : off + nbytes]).view(dt).reshape(shape)
    return out


@contextlib.contextmanager
def _open_pack(path: str | Path, mode: str):
    """The open pack file and a mapping of it (private copy-on-write when read-only)."""
    label = os.path.basename(path)
    try:
        f = open(path, mode)
    except FileNotFoundError:
        raise StoreError(f"pack {label} is missing", code="not_found") from None
    with f:
        if os.fstat(f.fileno()).st_size < 16:
            raise StoreError(f"pack {label} is truncated", code="corrupt")
        access = mmap.ACCESS_COPY if mode == "rb" else mmap.ACCESS_READ
        yield f, mmap.mmap(f.fileno(), 0, access=access)


def _parse_header(mm, label: str) -> tuple[list, int]:
    """A pack's header rows and the offset its data starts at (``mm``: its mapping, or its first bytes)."""
    if len(mm) < 16:
        raise StoreError(f"pack {label} is truncated", code="corrupt")
    if mm[:8] != MAGIC:
        raise StoreError(f"{label} is not a tensor pack", code="corrupt")
    (hlen,) = struct.unpack("<Q", mm[8:16])
    try:
        return orjson.loads(mm[16 : 16 + hlen]), _data_start(hlen)
    except orjson.JSONDecodeError:
        raise StoreError(f"pack {label} has a corrupt header", code="corrupt") from None


class BlobStore:
    """Pack files in one folder, addressed by name. Deleted and replaced packs are kept as spares
    (a few) and overwritten by the next write, so a node that receives a model every round reuses
    memory and disk blocks. Spares are claimed on disk (an atomic rename), so several stores,
    threads or processes may share a folder. Paths are plain strings: a small round touches its
    packs several times, and pathlib's parsing showed up in its profile."""

    SPARES = 2

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._dir = str(self.folder)

    def path(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"bad blob name {name!r}", code="bad_key")
        return os.path.join(self._dir, name + ".pack")

    def _spare(self, i: int) -> str:
        return os.path.join(self._dir, f".spare{i}")

    def write(self, name: str, tensors: Mapping[str, torch.Tensor]) -> int:
        """Write a pack ``name`` (replacing one of that name, whose file becomes a spare): a spare
        claimed as the temporary file, written, then renamed into place."""
        path = self.path(name)
        tmp = self._new(name) + ".tmp"
        size = _write_file(tmp, tensors, fresh=not self._claim_spare(tmp))
        self._install(tmp, path)
        return size

    def _claim_spare(self, tmp: str) -> bool:
        """Rename a spare file to ``tmp`` (atomic: no other writer can take it too); False if none."""
        for i in range(self.SPARES):
            try:
                os.rename(self._spare(i), tmp)
                return True
            except FileNotFoundError:
                continue
        return False

    def _keep_as_spare(self, path: str) -> bool:
        """Link ``path``'s file under a free spare name; False if every spare name is taken."""
        for i in range(self.SPARES):
            try:
                os.link(path, self._spare(i))
                return True
            except FileExistsError:
                continue
        return False

    def _new(self, name: str) -> str:
        return self.path(name) + ".new"

    def _install(self, tmp: str, path: str) -> None:
        """Move a written file into place at ``path``; the file it replaces becomes a spare (linked
        first, so the name is never missing). Writing fresh files instead would make every
        fsync on the disk (ext4 data=ordered) wait for their new blocks to reach it."""
        try:
            self._keep_as_spare(path)
        except FileNotFoundError:
            pass  # nothing to replace
        os.replace(tmp, path)

    def read(self, name: str) -> dict[str, torch.Tensor]:
        return read_pack(self.path(name))

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def delete(self, name: str) -> None:
        """Delete pack ``name`` (its file becomes a spare), and any new one a crash left
        uncommitted (its ``.new`` file, or the temporary that becomes it)."""
        path = self.path(name)
        try:
            self._keep_as_spare(path)
            os.unlink(path)
        except FileNotFoundError:
            pass
        for leftover in (self._new(name), self._new(name) + ".tmp"):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
