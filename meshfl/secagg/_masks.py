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

from ..crypto import derive_seed, prg_uint32
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
    """Adds or subtracts keystreams into uint64 vectors of one length, reusing one scratch buffer."""

    def __init__(self, length: int, algorithm: str) -> None:
        self.length = length
        self.algorithm = algorithm
        self._scratch = np.empty(length, dtype=np.uint64)

    def apply(self, vector: np.ndarray, seed: bytes, sign: int) -> None:
        """``vector += sign * PRG(seed)`` in the ring mod 2**64 (numpy wraps uint64)."""
        if vector.dtype != np.uint64 or vector.size != self.length:
            raise SecAggError(f"a masked vector is {self.length} uint64 words", code="secagg_protocol")
        prg_uint32(seed, 2 * self.length, out=self._scratch.view(np.uint32), algorithm=self.algorithm)
        if sign > 0:
            np.add(vector, self._scratch, out=vector)
        else:
            np.subtract(vector, self._scratch, out=vector)
