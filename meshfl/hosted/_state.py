"""A host's durable state: LMDB records and tensor packs (design §3).

Tables (keys ``name/...`` group one model's records)::

    hosted.models    name -> plan, model args, training args, server config, current version
    hosted.versions  name/<version> -> hash, when, and what made it (diffs, clients, staleness, metrics)
    hosted.cycles    name -> the open cycle (or async buffer): number, version, deadline
    hosted.tickets   name/<client> -> the last ticket the client used: its diff id, cycle, version
    hosted.diffs     name/<cycle>/<client>/<ticket> -> an accepted diff of the open cycle (its tensors: a slot)
    hosted.clients   client -> card, how enrolled, diffs sent, last seen
    hosted.tokens    token id -> secret's hash, uses left, expiry, revoked (enrollment tokens)
    hosted.meta      generation: bumped by changes made beside a running host, which it then reloads

Tickets are MACs (the host's secret over model, client, version and cycle), so accepting a
client writes nothing and its ticket is still good after a restart; a restarted host has only
forgotten how many clients it had accepted into the open cycle, so that cycle may accept up to
``max_clients`` more.

Durability (SIGKILL at any instant): an accepted diff's tensors are written to its slot
(:class:`DiffSlots`) and folded into the in-memory running sum, then its record and its
ticket's use commit in one transaction (diffs that came together share it: :mod:`._commits`),
and only then is it acknowledged; a version is made only from diffs whose records committed.
Publishing a version writes its pack first, then commits the version record, the model's new
version and the next cycle while deleting the cycle's diff records, in one transaction; packs
left behind are removed at the next start. A restarted host rebuilds the running sum from the
open cycle's committed diffs, so no acknowledged diff is lost and none is applied twice (a
closed cycle's diffs no longer exist; a re-sent one matches its ticket's use and is
acknowledged without being counted; one folded in but not committed died with the process, and
its client, never acknowledged, sends it again). Slots and packs are not fsynced: after an OS
crash a diff whose slot lost its bytes is dropped (its CRC-32 no longer matches).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path
from typing import Mapping

import torch

from ..store import Store
from ..store._codec import SEQ_DIGITS, seq_key
from ..errors import StoreError
from ..store.blobs import BlobStore, byte_views, pwrite_all
from ..wire import DTYPE_NAMES, DTYPES

MODELS, VERSIONS, CYCLES, TICKETS, DIFFS, CLIENTS, TOKENS, META = (
    "hosted.models", "hosted.versions", "hosted.cycles", "hosted.tickets", "hosted.diffs", "hosted.clients",
    "hosted.tokens", "hosted.meta")


def bump(tx) -> None:
    """Count a change made beside the running host (a model added, clients enrolled or revoked)."""
    tx.put(META, "generation", tx.get(META, "generation", 0) + 1)


def generation(tx) -> int:
    return tx.get(META, "generation", 0)


def version_key(name: str, version: int) -> str:
    return f"{name}/{seq_key(version)}"


def diff_key(name: str, cycle: int, client: str, ticket: str) -> str:
    return f"{name}/{seq_key(cycle)}/{client}/{ticket}"


def model_blob(name: str, version: int) -> str:
    return f"{name}.v{version}"


def state_blob(name: str, version: int) -> str:
    return f"{name}.s{version}"


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: what a client compares with its cached copy."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{DTYPE_NAMES[t.dtype]}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


class HostStore:
    """The host's tables and packs over the home's LMDB store (one per host process)."""

    def __init__(self, store: Store, folder: Path) -> None:
        self.store = store
        self.blobs = BlobStore(folder)
        for table in (MODELS, VERSIONS, CYCLES, TICKETS, DIFFS, CLIENTS, TOKENS, META):
            store.table(table)

    def models(self) -> list[dict]:
        return [v for _, v in self.store.read(lambda tx: tx.items(MODELS))]

    def versions(self, name: str) -> list[dict]:
        return [v for _, v in self.store.read(lambda tx: tx.items(VERSIONS, name + "/"))]

    def tickets(self, name: str) -> dict[str, dict]:
        prefix = name + "/"
        return {k[len(prefix):]: v for k, v in self.store.read(lambda tx: tx.items(TICKETS, prefix))}

    def diffs(self, name: str, cycle: int) -> list[dict]:
        return [v for _, v in self.store.read(lambda tx: tx.items(DIFFS, f"{name}/{seq_key(cycle)}/"))]

    def clean_packs(self, keep: set[str]) -> int:
        """Delete packs (and leftovers of interrupted writes) not named in ``keep``."""
        removed = 0
        for entry in os.scandir(self.blobs.folder):
            base = entry.name.split(".pack")[0]
            if entry.name.startswith(".") or not entry.name.count(".pack") or base in keep:
                continue
            self.blobs.delete(base)
            removed += 1
        return removed


class DiffSlots:
    """One model's accepted diffs of its open cycle (async: buffer), each in a fixed slot of one
    file that every cycle overwrites. Storing a diff so creates no file and allocates no disk
    block: with a pack per diff, each commit's flush also waited for the new packs' blocks (ext4
    data=ordered), which cost more than all the rest of a cycle of small diffs. Slot ``i`` holds
    the cycle's ``i``-th diff; the slot is written before the diff's record commits, and the
    record keeps the slot's CRC-32. Like packs, slots are not fsynced: they survive the host
    process's death (the page cache keeps them), and if an OS crash loses one, its CRC no longer
    matches and the restarted host drops that diff rather than fold in stale bytes."""

    def __init__(self, path: str | os.PathLike, layout: Mapping[str, tuple[str, tuple]]) -> None:
        self.specs = [(n, DTYPES[d], shape, DTYPES[d].itemsize * _count(shape)) for n, (d, shape) in layout.items()]
        self.size = sum(nbytes for *_, nbytes in self.specs)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def write(self, slot: int, tensors: Mapping[str, torch.Tensor]) -> int:
        """Write a checked diff (the model's names, dtypes and shapes) to slot ``slot``; its CRC-32."""
        pos, crc = slot * self.size, 0
        for name, *_ in self.specs:
            views = list(byte_views(tensors, name))
            pos += pwrite_all(self._fd, views, pos)
            for view in views:
                crc = zlib.crc32(view, crc)
        return crc

    def read(self, slot: int, crc: int) -> dict[str, torch.Tensor]:
        data = os.pread(self._fd, self.size, slot * self.size)
        if len(data) != self.size or zlib.crc32(data) != crc:
            raise StoreError(f"diff slot {slot} does not hold the diff its record names", code="corrupt")
        buf, out, pos = bytearray(data), {}, 0
        for name, dtype, shape, nbytes in self.specs:
            out[name] = (torch.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=pos).reshape(shape)
                         if nbytes else torch.empty(shape, dtype=dtype))
            pos += nbytes
        return out

    def close(self) -> None:
        os.close(self._fd)


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


__all__ = ["SEQ_DIGITS", "DiffSlots", "HostStore"]
