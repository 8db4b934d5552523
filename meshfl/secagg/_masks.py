"""Pairwise and self masks over the encoded byte vectors (keystream: :func:`meshfl.crypto.prg_uint32`).

Node ``i`` adds to its vector ``PRG(b_i)`` (its self mask) and, for every other member ``j``,
``+PRG(s_ij)`` if ``i < j`` else ``-PRG(s_ij)`` (peer ids compared as strings). ``s_ij`` is the same
seed on both sides (X25519 agreement of their round keys), so pairwise masks cancel in the sum and
only the self masks and the masks of members that dropped out are left for the researcher to
remove, from the secrets it reconstructs out of Shamir shares.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from nacl.bindings import crypto_scalarmult

from ..crypto import CHUNK_BYTES, SEED_BYTES, AegisChunks, derive_seed, prg_uint32
from ._fixed import SecAggError


def pair_seed(secret: bytes, public: bytes, session: str, a: str, b: str) -> bytes:
    """The 256-bit mask seed peers ``a`` and ``b`` share in ``session`` (order of a, b irrelevant)."""
    shared = crypto_scalarmult(bytes(secret), bytes(public))
    if not any(shared):
        raise SecAggError(f"the round key of {b if a < b else a} is a low-order point", code="secagg_protocol")
    lo, hi = sorted((a, b))
    return derive_seed(shared, "\x00".join(("meshfl.secagg.pair.v1", session, lo, hi)).encode())


def pair_sign(me: str, other: str) -> int:
    """+1 if ``me`` adds the pair's mask, -1 if it subtracts it."""
    return 1 if me < other else -1


def ring_apply(op, dst: np.ndarray, src: np.ndarray, offset: int, boundary: int) -> None:
    """``dst op= src`` over bytes ``offset..`` of a vector whose words are uint32 below byte
    ``boundary`` and uint64 from it (``op`` is np.add or np.subtract, wrapping in each ring)."""
    cut = min(max(boundary - offset, 0), dst.size)
    if cut:
        a = dst[:cut].view(np.uint32)
        op(a, src[:cut].view(np.uint32), out=a)
    if cut < dst.size:
        b = dst[cut:].view(np.uint64)
        op(b, src[cut:].view(np.uint64), out=b)


class Masker:
    """Adds or subtracts keystreams into the byte vectors of one :class:`~._fixed.Encoding`.

    :meth:`apply` walks a vector one keystream chunk (256 KiB) at a time and adds every seed's
    chunk while the block is in cache. Given ``fill``, it first makes each block (a node encodes,
    masks and stores its update in one pass, so the plain vector never goes through memory whole).
    ChaCha20 cannot start mid-stream, so with it each mask is made whole, in one scratch vector.
    """

    def __init__(self, nbytes: int, boundary: int, algorithm: str) -> None:
        self.nbytes, self.boundary, self.algorithm = nbytes, boundary, algorithm

    def apply(self, vector: np.ndarray, masks: list[tuple[bytes, int]],
              fill: Callable[[np.ndarray, int], None] | None = None) -> None:
        """``vector += sum(sign * PRG(seed))`` over ``masks`` [(seed, +1 | -1), ...]; with ``fill``,
        ``vector`` is first made block by block by ``fill(block, offset)``, whatever it held."""
        if vector.dtype != np.uint8 or vector.size != self.nbytes or not vector.flags.c_contiguous:
            raise SecAggError(f"a masked vector is {self.nbytes} contiguous bytes", code="secagg_protocol")
        masks = [(bytes(seed), np.add if sign > 0 else np.subtract) for seed, sign in masks]
        if any(len(seed) != SEED_BYTES for seed, _ in masks):
            raise SecAggError(f"mask seeds are {SEED_BYTES} bytes", code="secagg_protocol")
        if self.algorithm != "aegis128l":
            if fill is not None:
                fill(vector, 0)
            scratch = np.empty(self.nbytes, dtype=np.uint8)
            for seed, op in masks:
                prg_uint32(seed, self.nbytes // 4, out=scratch.view(np.uint32), algorithm=self.algorithm)
                ring_apply(op, vector, scratch, 0, self.boundary)
            return
        stream = AegisChunks()
        for chunk, start in enumerate(range(0, self.nbytes, CHUNK_BYTES)):
            block = vector[start : start + CHUNK_BYTES]
            if fill is not None:
                fill(block, start)
            for seed, op in masks:
                ring_apply(op, block, stream.chunk(seed, chunk, block.size), start, self.boundary)
