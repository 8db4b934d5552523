"""Pairwise and self masks over uint64 vectors (the keystream is :func:`meshfl.crypto.prg_uint32`).

Node ``i`` adds to its vector ``PRG(b_i)`` (its self mask) and, for every other member ``j``,
``+PRG(s_ij)`` if ``i < j`` else ``-PRG(s_ij)`` (peer ids compared as strings). ``s_ij`` is the same
seed on both sides (X25519 agreement of their round keys), so pairwise masks cancel in the sum and
only the self masks and the masks of members that dropped out are left for the researcher to
remove, from the secrets it reconstructs out of Shamir shares.
"""

from __future__ import annotations

import numpy as np
from nacl.bindings import crypto_scalarmult

from ..crypto import CHUNK_BYTES, derive_seed, prg_uint32
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


class Masker:
    """Adds or subtracts keystreams into uint64 vectors of one length.

    :meth:`apply_all` walks the vector one keystream chunk (256 KiB) at a time and adds every
    seed's chunk while the block is in cache: one pass over the vector's memory for all its masks,
    instead of one per mask (the difference is about 2x at a few MB).
    """

    _BLOCK_WORDS = CHUNK_BYTES // 8  # uint64 words per keystream chunk

    def __init__(self, length: int, algorithm: str) -> None:
        self.length = length
        self.algorithm = algorithm
        blockwise = algorithm == "aegis256"
        self._scratch = np.empty(min(length, self._BLOCK_WORDS) if blockwise else length, dtype=np.uint64)

    def apply(self, vector: np.ndarray, seed: bytes, sign: int) -> None:
        """``vector += sign * PRG(seed)`` in the ring mod 2**64 (numpy wraps uint64)."""
        self.apply_all(vector, [(seed, sign)])

    def apply_all(self, vector: np.ndarray, masks: list[tuple[bytes, int]]) -> None:
        """``vector += sum(sign * PRG(seed))`` over ``masks`` [(seed, +1 | -1), ...]."""
        if vector.dtype != np.uint64 or vector.size != self.length or not vector.flags.c_contiguous:
            raise SecAggError(f"a masked vector is {self.length} contiguous uint64 words", code="secagg_protocol")
        step = self._scratch.size or 1
        for chunk, start in enumerate(range(0, self.length, step)):
            block = vector[start : start + step]
            scratch = self._scratch[: block.size]
            for seed, sign in masks:
                first = chunk if self.algorithm == "aegis256" else 0
                prg_uint32(seed, 2 * block.size, out=scratch.view(np.uint32), algorithm=self.algorithm,
                           first_chunk=first)
                (np.add if sign > 0 else np.subtract)(block, scratch, out=block)
