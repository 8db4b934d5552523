"""Secure aggregation by pairwise masking (SecAgg / SecAgg+ style): the researcher learns the sum.

Per round (see docs/security.md for the whole flow and threat model):

1. every node makes a round key pair and a self-mask seed, splits its round secret key and its
   self-mask seed into Shamir shares (threshold t) and seals one of each, with its round public
   key, to every other participant as an overlay message (signed by the node: end to end);
2. the researcher passes on the keys and, unread, the sealed shares (``secagg.keys``); each node
   checks every member's key against the one that member's share carried;
3. each node trains, encodes its sample-weighted change ``w * (trained - global)``, its sample
   count and ``w * metrics`` in fixed point (:mod:`._fixed`: parameters in a 32-bit ring, the
   same bytes as a plain round, buffers and counts in a 64-bit one), adds its masks
   (:mod:`._masks`) and sends only the masked vector;
4. the researcher sums the vectors it got and asks the survivors for the self-seed shares of the
   survivors and the round-key shares of members that dropped out, never both for one node; from t
   shares each it removes every leftover mask (:func:`unmask`) and divides by the summed ``n``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..wire import TensorMap
from ._fixed import (
    CLIP_64,
    DEFAULT_CLIP,
    FRAC_BITS_64,
    METRIC_SLOTS,
    Encoding,
    SecAggError,
    UpdateEncoder,
    decode_sum,
    encode_update,
    frac_bits_for,
    log,
)
from ._masks import Masker, pair_seed, pair_sign, ring_apply
from ._session import NodeSession, NodeSessions, check_threshold, unmask

VECTOR = "masked"  # the one tensor of a masked result


class MaskedSum:
    """Sums masked vectors (wrapping in their two rings) as they arrive: one vector per round.

    A masked vector travels as one int32 tensor :data:`VECTOR` over its bytes.
    """

    def __init__(self, enc: Encoding) -> None:
        self.total = np.zeros(enc.nbytes, dtype=np.uint8)
        self.boundary = enc.boundary
        self.count = 0

    @property
    def layout(self) -> dict[str, tuple[list[int], torch.dtype]]:
        return {VECTOR: ([self.total.size // 4], torch.int32)}

    def add(self, tensors, weight: float = 0.0, node: str = "") -> None:
        """Fold in one node's masked vector (its weight is inside the vector, hidden)."""
        if set(tensors) != {VECTOR}:
            raise SecAggError(f"a masked result holds one tensor {VECTOR!r}", code="secagg_protocol")
        if isinstance(tensors, TensorMap):
            dtype, shape, _ = tensors.spec(VECTOR)
            parts = tensors.pieces(VECTOR)
        else:
            dtype, shape = tensors[VECTOR].dtype, tuple(tensors[VECTOR].shape)
            parts = [(0, tensors[VECTOR].reshape(-1))]
        if dtype != torch.int32 or tuple(shape) != (self.total.size // 4,):
            raise SecAggError(f"a masked vector is {self.total.size // 4} int32 words", code="secagg_protocol")
        for start, piece in parts:
            raw = piece.numpy().view(np.uint8)
            offset = 4 * start
            ring_apply(np.add, self.total[offset : offset + raw.size], raw, offset, self.boundary)
        self.count += 1


def add_mean(base: Mapping[str, torch.Tensor], deltas: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The members' mean model: ``base`` plus each decoded mean change (:func:`decode_sum`), in
    the tensor's own dtype (integers rounded); bool tensors, never summed, keep ``base``'s values."""
    mean = {}
    for key, g in base.items():
        if key not in deltas:
            mean[key] = g
            continue
        d = torch.from_numpy(deltas[key]).view(g.shape)
        if d.dtype == g.dtype:
            mean[key] = d.add_(g)  # the decoded delta's own memory: no new copy per tensor
        else:
            mean[key] = g + d.to(g.dtype) if g.is_floating_point() else g + d.round().to(g.dtype)
    return mean


def enough_shares(reveals: list[Mapping], survivors: list[str], dropped: list[str], threshold: int) -> bool:
    """Whether ``reveals`` hold ``threshold`` shares of each secret the unmasking needs."""
    def count(kind: str, owner: str) -> int:
        return sum(1 for r in reveals if isinstance(r.get(kind), Mapping) and owner in r[kind])

    return all(count("b", o) >= threshold for o in survivors) and all(count("s", o) >= threshold for o in dropped)


def secure_metrics(names_by_member: Mapping[str, list], slots: np.ndarray) -> dict[str, float]:
    """Sample-weighted mean metrics, when every survivor reported the same metric names."""
    names = {tuple(v) for v in names_by_member.values()}
    if len(names) != 1:
        log.warning("members reported different metric names: no mean metrics this round")
        return {}
    (order,) = names
    return {name: float(slots[i]) for i, name in enumerate(order[:METRIC_SLOTS])}


__all__ = [
    "CLIP_64",
    "DEFAULT_CLIP",
    "FRAC_BITS_64",
    "METRIC_SLOTS",
    "VECTOR",
    "Encoding",
    "add_mean",
    "enough_shares",
    "secure_metrics",
    "MaskedSum",
    "Masker",
    "NodeSession",
    "NodeSessions",
    "SecAggError",
    "UpdateEncoder",
    "check_threshold",
    "decode_sum",
    "encode_update",
    "frac_bits_for",
    "pair_seed",
    "pair_sign",
    "ring_apply",
    "unmask",
]
