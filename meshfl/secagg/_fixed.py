"""Fixed-point encoding of a weighted model update, in two integer rings.

Masks only cancel in modular integer arithmetic, so a node turns its update into one byte vector
before masking. With ``w = n / W`` (its sample count ``n`` over the round's public *weight scale*
``W``, the largest dataset among the members as their registries report it, so ``0 < w <= 1``)
and ``delta`` = trained model minus the global model it started from:

    section 32 (uint32 words, ring mod 2**32), one word per element of each trainable parameter:
        round(w * clip(delta, ±clip) * 2**frac_bits)
    section 64 (uint64 words, ring mod 2**64), after padding section 32 to a multiple of 8 bytes:
        round(w * clip(delta, ±CLIP_64) * 2**FRAC_BITS_64)    for every buffer (BatchNorm statistics,
                                                              counters: these can move far in a round)
        n                                                     the sample count, protected like the rest
        round(w * metric_k * 2**FRAC_BITS_64)                 for k < METRIC_SLOTS

Parameters, nearly all of a model's bytes, cost 4 bytes an element as in a plain round; buffers get
the wide range they need. Bool tensors are left out (not averaged). Negative values wrap (two's
complement); a section's wrapped sum read back as signed is exact while its true magnitude stays
below half the ring. Section 32 sums K values of magnitude at most ``clip * 2**frac_bits``, so the
researcher picks ``frac_bits = 30 - ceil(log2(K * clip))`` for K members (24 bits for K = 8 and the
default clip 8). Section 64 has ``2**62 / (K * CLIP_64 * 2**FRAC_BITS_64)`` to spare.

Error bound: each value is rounded once (at most half a unit), so the averaged delta of a tensor is
within ``K * 2**-(bits + 1) * W / N`` of the exact sample-weighted mean, for K summed nodes holding N
samples, ``bits`` its section's fractional bits. Section 32 is scaled and read back in float32
(half the memory traffic of float64), which adds at most ``2**-21 * max|delta|`` per element (the
largest of the nodes' deltas there): a few float32 ulps of the update. Parameter deltas beyond
``±clip`` (default 8: far beyond a sane step) are clipped, and the node says so in its log; a NaN
or an infinity (a diverged plan) fails the node's task with ``secagg_range`` rather than wrap into
the sum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Collection, Mapping

import numpy as np
import torch

from ..errors import MeshflError

METRIC_SLOTS = 8
DEFAULT_CLIP = 8.0
CLIP_64 = 1e6
FRAC_BITS_64 = 20

log = logging.getLogger("meshfl.secagg")


class SecAggError(MeshflError):
    """Secure aggregation cannot go on. Codes: ``secagg_range``, ``secagg_protocol``,
    ``secagg_untrusted_peer``, ``secagg_session_lost``, ``secagg_conflict``,
    ``secagg_not_enough``."""

    code = "secagg_protocol"


def frac_bits_for(members: int, clip: float) -> int:
    """Fractional bits of section 32 that keep the sum of ``members`` clipped values in range."""
    bits = 30 - math.ceil(math.log2(max(members, 1) * clip))
    if bits < 8:
        raise SecAggError(f"{members} members x clip {clip:g} leave {bits} fractional bits; lower clip",
                          code="secagg_range")
    return bits


@dataclass(frozen=True)
class Encoding:
    """Which tensors go into which section, in which order, and the fixed-point parameters."""

    names32: tuple[str, ...]
    numels32: tuple[int, ...]
    names64: tuple[str, ...]
    numels64: tuple[int, ...]
    frac_bits: int
    clip: float = DEFAULT_CLIP

    @classmethod
    def for_state(cls, state: Mapping[str, torch.Tensor], parameters: Collection[str], frac_bits: int,
                  clip: float = DEFAULT_CLIP) -> "Encoding":
        """Floating ``parameters`` go to section 32; every other tensor but bools to section 64."""
        wide = sorted(k for k, v in state.items() if v.dtype != torch.bool and not (k in parameters and v.is_floating_point()))
        narrow = sorted(k for k in state if k in parameters and state[k].is_floating_point())
        return cls(tuple(narrow), tuple(int(state[k].numel()) for k in narrow),
                   tuple(wide), tuple(int(state[k].numel()) for k in wide), int(frac_bits), float(clip))

    @property
    def boundary(self) -> int:
        """Byte offset where section 64 starts (section 32 padded to 8 bytes)."""
        words = sum(self.numels32)
        return 4 * (words + words % 2)

    @property
    def words64(self) -> int:
        return sum(self.numels64) + 1 + METRIC_SLOTS

    @property
    def nbytes(self) -> int:
        return self.boundary + 8 * self.words64


def encode_update(delta: Mapping[str, torch.Tensor], samples: int, weight_scale: int,
                  metrics: Mapping[str, float], enc: Encoding, out: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """The node's byte vector (see the module doc), whole, and the metric names it carries, in slot
    order. ``out``: ``enc.nbytes`` bytes to encode into, whatever they hold."""
    encoder = UpdateEncoder(delta, samples, weight_scale, metrics, enc)
    if out is None:
        out = np.empty(enc.nbytes, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.shape != (enc.nbytes,):
        raise SecAggError(f"an encoded update is {enc.nbytes} bytes", code="secagg_protocol")
    encoder.fill(out, 0)
    encoder.log_clipped()
    return out, encoder.names


_BLOCK = 1 << 16  # elements converted at a time: the float64 scratch stays in cache


class UpdateEncoder:
    """One update's byte vector, made a block at a time (:meth:`fill`), so that a node can mask and
    write each block while it is in cache: the whole vector never goes through memory.

    Everything is checked here first (sample count, metrics, each tensor's size and range: a NaN or
    an infinity is refused), so a refused update fails before a byte is made.
    """

    def __init__(self, delta: Mapping[str, torch.Tensor], samples: int, weight_scale: int,
                 metrics: Mapping[str, float], enc: Encoding) -> None:
        if not 0 < samples <= weight_scale:
            raise SecAggError(f"{samples} training samples exceed the round's weight scale {weight_scale} "
                              "(did preprocess() add samples?)", code="secagg_range")
        self.names = sorted(metrics)[:METRIC_SLOTS]
        values = np.zeros(METRIC_SLOTS)
        values[: len(self.names)] = [float(metrics[k]) for k in self.names]
        if np.any(~np.isfinite(values)) or np.any(np.abs(values) > CLIP_64):
            raise SecAggError(f"metrics must be finite and within ±{CLIP_64:g} for secure aggregation",
                              code="secagg_range")
        w = samples / weight_scale
        self.nbytes, self.boundary = enc.nbytes, enc.boundary
        self._padding = 4 * sum(enc.numels32)  # first byte of the padding between the sections
        self._s32 = _segments(delta, enc.names32, enc.numels32, w * 2.0**enc.frac_bits, enc.clip)
        self._s64 = _segments(delta, enc.names64, enc.numels64, w * 2.0**FRAC_BITS_64, CLIP_64)
        tail = np.empty(1 + METRIC_SLOTS, dtype=np.int64)
        tail[0] = samples
        tail[1:] = np.rint(values * (w * 2.0**FRAC_BITS_64))
        self._s64.append((sum(enc.numels64), tail.size, tail, None, None))
        # Section 32 is scaled in float32: its words hold at most 2**30, and a float32 product is off
        # by at most 2**-24 of the value, below the float32 precision of the update itself; half
        # the memory traffic of float64. Section 64 (wide values, 2**62) needs float64.
        self._scratch32 = np.empty(_BLOCK, dtype=np.float32)
        self._scratch64 = np.empty(_BLOCK, dtype=np.float64)
        self.clipped = 0

    def fill(self, out: np.ndarray, offset: int) -> None:
        """Bytes ``offset .. offset + out.size`` of the vector into ``out`` (uint8; ``offset`` a
        multiple of 8)."""
        if offset % 8 or offset < 0 or offset + out.size > self.nbytes:
            raise SecAggError(f"bytes {offset}+{out.size} are not a block of the vector", code="secagg_protocol")
        end = offset + out.size
        cut = min(end, self._padding)
        if offset < cut:
            self._words(out[: cut - offset].view(np.int32), offset // 4, self._s32, self._scratch32)
        lo, hi = max(offset, self._padding), min(end, self.boundary)
        if lo < hi:
            out[lo - offset : hi - offset] = 0
        lo = max(offset, self.boundary)
        if lo < end:
            self._words(out[lo - offset :].view(np.int64), (lo - self.boundary) // 8, self._s64, self._scratch64)

    def log_clipped(self) -> None:
        if self.clipped:
            log.warning("secure aggregation clipped %d update values", self.clipped)

    def _words(self, dst: np.ndarray, first: int, segments: list, scratch: np.ndarray) -> None:
        """Words ``first .. first + dst.size`` of a section into ``dst``, scaled in ``scratch``'s dtype."""
        last = first + dst.size
        for start, n, values, scale, limit in segments:
            lo, hi = max(first, start), min(last, start + n)
            if lo >= hi:
                continue
            if scale is None:  # already words
                dst[lo - first : hi - first] = values[lo - start : hi - start]
                continue
            for a in range(lo, hi, _BLOCK):
                b = min(hi, a + _BLOCK)
                d = scratch[: b - a]
                np.multiply(values[a - start : b - start], scale, out=d, dtype=d.dtype)
                if limit is not None:
                    self.clipped += int(np.count_nonzero(np.abs(d) > limit))
                    np.clip(d, -limit, limit, out=d)
                np.rint(d, out=d)
                dst[a - first : b - first] = d


def _segments(delta: Mapping[str, torch.Tensor], names, numels, scale: float, clip: float) -> list:
    """``(first word, words, values, scale, limit)`` per tensor of a section; ``limit`` (the scaled
    clip) only for a tensor with values beyond the clip, else None.
    The range is checked once per tensor, on its own values (one pass), so only tensors that need it
    are clipped block by block."""
    out, start = [], 0
    for name, n in zip(names, numels):
        t = delta[name].detach().reshape(-1)
        if t.numel() != n:
            raise SecAggError(f"tensor {name!r} has {t.numel()} elements, expected {n}", code="secagg_protocol")
        if n:
            lo, hi = (float(v) for v in torch.aminmax(t))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise SecAggError(f"tensor {name!r} holds NaN or infinite values", code="secagg_range")
            out.append((start, n, t.numpy(), scale, clip * scale if (hi > clip or lo < -clip) else None))
        start += n
    return out


def decode_sum(total: np.ndarray, enc: Encoding, weight_scale: int) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """The unmasked byte sum -> (sample-weighted mean delta per tensor, total samples, mean metric slots).
    Parameters come back as float32 (one pass; the error bound covers it), the rest as float64."""
    s32 = total[: enc.boundary].view(np.int32)
    s64 = total[enc.boundary :].view(np.int64)
    tail = sum(enc.numels64)
    samples = int(s64[tail])
    if samples <= 0:
        raise SecAggError(f"the secure sum holds {samples} samples: masks did not cancel", code="secagg_protocol")
    weight = samples / weight_scale  # the sum of the members' w
    deltas: dict[str, np.ndarray] = {}
    for section, names, numels, bits, dtype in ((s32, enc.names32, enc.numels32, enc.frac_bits, np.float32),
                                                (s64, enc.names64, enc.numels64, FRAC_BITS_64, np.float64)):
        pos, scale = 0, dtype(1.0 / (weight * 2.0**bits))
        for name, n in zip(names, numels):
            deltas[name] = np.multiply(section[pos : pos + n], scale, dtype=dtype)
            pos += n
    metrics = s64[tail + 1 :] / (weight * 2.0**FRAC_BITS_64)
    return deltas, samples, metrics
