"""Fixed-point encoding of a weighted model update, in the ring of integers mod 2**64.

Masks only cancel in modular integer arithmetic, so a node turns its update into one vector of
uint64 words before masking:

    [ round(n * clip(delta, ±clip) * 2**frac_bits) for every element of every tensor ]
    [ n ]                                             the sample count, protected like the rest
    [ round(n * metric_k * 2**frac_bits) for k < METRIC_SLOTS ]

where ``delta`` is the trained model minus the global model it started from (bool tensors are
left out: they are not averaged), ``n`` the node's sample count. Negative values wrap (two's
complement), so the researcher's wrapped sum, read back as int64, is the exact integer sum as long
as it stays below 2**63 in magnitude: the node checks ``n * max(clip, |metric|) * 2**frac_bits *
participants < 2**62``. Dividing by the summed ``n`` gives FedAvg of the deltas.

Error bound: each node's value is rounded once (at most 2**-(frac_bits+1) off), so the averaged
delta is within ``K * 2**-(frac_bits+1) / N`` of the exact sample-weighted mean, for K summed
nodes holding N samples: about 3e-8 / N per node at the default 24 bits. Deltas beyond ``±clip``
are clipped (default 100: far beyond any sane step); a node that clips says so in its log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..errors import MeshflError

METRIC_SLOTS = 8
DEFAULT_FRAC_BITS = 24
DEFAULT_CLIP = 100.0

log = logging.getLogger("meshfl.secagg")


class SecAggError(MeshflError):
    """Secure aggregation cannot go on. Codes: ``secagg_range``, ``secagg_protocol``,
    ``secagg_untrusted_peer``, ``secagg_session_lost``, ``secagg_conflict``,
    ``secagg_not_enough``."""

    code = "secagg_protocol"


@dataclass(frozen=True)
class Encoding:
    """Which tensors go into the vector, in which order, and the fixed-point parameters."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    frac_bits: int = DEFAULT_FRAC_BITS
    clip: float = DEFAULT_CLIP

    @classmethod
    def for_state(cls, state: Mapping[str, torch.Tensor], frac_bits: int = DEFAULT_FRAC_BITS,
                  clip: float = DEFAULT_CLIP) -> "Encoding":
        names = tuple(sorted(k for k, v in state.items() if v.dtype != torch.bool))
        return cls(names, tuple(int(state[k].numel()) for k in names), int(frac_bits), float(clip))

    @property
    def params(self) -> int:
        return sum(self.numels)

    @property
    def length(self) -> int:
        return self.params + 1 + METRIC_SLOTS

    def check_range(self, samples: int, participants: int, largest: float = 0.0) -> None:
        bound = samples * max(self.clip, largest) * 2.0**self.frac_bits * max(participants, 1)
        if bound >= 2.0**62:
            raise SecAggError(
                f"{samples} samples x clip {self.clip:g} overflow the fixed-point range at "
                f"{self.frac_bits} fractional bits; lower secagg clip or frac_bits",
                code="secagg_range",
            )


def encode_update(delta: Mapping[str, torch.Tensor], samples: int, metrics: Mapping[str, float],
                  enc: Encoding, participants: int) -> tuple[np.ndarray, list[str]]:
    """The node's uint64 vector (see the module doc) and the metric names it carries, in slot order."""
    names = sorted(metrics)[:METRIC_SLOTS]
    values = [float(metrics[k]) for k in names]
    enc.check_range(samples, participants, max((abs(v) for v in values), default=0.0))
    scale = samples * 2.0**enc.frac_bits
    out = np.empty(enc.length, dtype=np.int64)
    limit = enc.clip * scale
    pos, clipped = 0, 0
    for name, n in zip(enc.names, enc.numels):
        t = delta[name].detach().reshape(-1)
        if t.numel() != n:
            raise SecAggError(f"tensor {name!r} has {t.numel()} elements, expected {n}", code="secagg_protocol")
        d = np.multiply(t.numpy(), scale, dtype=np.float64)  # a new array: the caller's tensor is untouched
        if n and (d.max() > limit or d.min() < -limit):
            clipped += int(np.count_nonzero(np.abs(d) > limit))
            np.clip(d, -limit, limit, out=d)
        np.rint(d, out=d)
        out[pos : pos + n] = d
        pos += n
    out[pos] = samples
    slots = np.zeros(METRIC_SLOTS)
    slots[: len(values)] = values
    out[pos + 1 :] = np.rint(slots * scale)
    if clipped:
        log.warning("secure aggregation clipped %d update values to +-%g", clipped, enc.clip)
    return out.view(np.uint64), names


def decode_sum(total: np.ndarray, enc: Encoding) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """The unmasked sum -> (sample-weighted mean delta per tensor, total samples, mean metric slots)."""
    signed = total.view(np.int64)
    samples = int(signed[enc.params])
    if samples <= 0:
        raise SecAggError(f"the secure sum holds {samples} samples: masks did not cancel", code="secagg_protocol")
    scale = samples * 2.0**enc.frac_bits
    deltas, pos = {}, 0
    for name, n in zip(enc.names, enc.numels):
        deltas[name] = signed[pos : pos + n].astype(np.float64) / scale
        pos += n
    metrics = signed[pos + 1 :].astype(np.float64) / scale
    return deltas, samples, metrics
