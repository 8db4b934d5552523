"""Exact sums of float64 statistics under secure aggregation: fixed point in 32-bit limbs.

Masks cancel only in modular integer sums, and statistics need more than the model updates' 32
bits: a count of a million and a sum of squares of 10^14 must add up to 1e-9 of themselves. A
value ``v`` becomes the integer ``V = round(v * 2**64)`` (one rounding per node, of its own sum:
at most 2**-65 off), written as four 64-bit words: three 32-bit limbs and a signed top word,
``V = w0 + w1 * 2**32 + w2 * 2**64 + w3 * 2**96``. The masked sums of K nodes' words cannot carry
out of a lower word (K * 2**32 < 2**63), and the top word's sum stays in range while
``|v| <= 2**85`` per node (the node refuses larger values: ``stats_range``), so the researcher rebuilds each
total exactly and divides by ``2**64`` once. Counts are exact, sums exact to K * 2**-65.
"""

from __future__ import annotations

import math

import numpy as np

from ._query import AnalyticsError

LIMBS = 4
FRAC_BITS = 64
MAX_VALUE = 2.0**85
_MASK32 = (1 << 32) - 1


def nbytes(values: int) -> int:
    return 8 * LIMBS * values


def encode(values: np.ndarray) -> np.ndarray:
    """float64 values -> their uint64 words (:data:`LIMBS` per value)."""
    out = np.empty(LIMBS * values.size, dtype=np.uint64)
    for i, v in enumerate(values.tolist()):
        if not math.isfinite(v) or abs(v) > MAX_VALUE:
            raise AnalyticsError(f"a statistic of {v!r} is beyond what is summed exactly (|v| <= 2**85)",
                                 code="stats_range")
        whole = round(v * 2.0**FRAC_BITS)  # scaling by a power of 2 is exact; so is round()
        for limb in range(LIMBS - 1):
            out[LIMBS * i + limb] = (whole >> (32 * limb)) & _MASK32
        out[LIMBS * i + LIMBS - 1] = (whole >> (32 * (LIMBS - 1))) & ((1 << 64) - 1)  # signed top word
    return out


def decode(words: np.ndarray) -> np.ndarray:
    """Summed uint64 words -> the float64 totals (:data:`LIMBS` words each)."""
    w = words.tolist()
    out = np.empty(len(w) // LIMBS)
    for i in range(out.size):
        top = w[LIMBS * i + LIMBS - 1]
        total = (top - (1 << 64) if top >= 1 << 63 else top) << (32 * (LIMBS - 1))
        for limb in range(LIMBS - 1):
            total += w[LIMBS * i + limb] << (32 * limb)
        out[i] = total / 2**FRAC_BITS
    return out


def exact_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """The entry-wise sum of float64 vectors, exact to one rounding per vector (2**-65)."""
    words = np.zeros(LIMBS * (vectors[0].size if vectors else 0), dtype=np.uint64)
    for v in vectors:
        np.add(words, encode(v), out=words)  # wraps mod 2**64, as the masked sum does
    return decode(words)
