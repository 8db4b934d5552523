"""Coordinate-wise robust aggregators (Yin et al. 2018, "Byzantine-Robust Distributed Learning").

They are NOT streaming: an order statistic needs every value of a coordinate, so a round keeps all K
updates - K model copies in the accumulation dtype (``streaming = False``). The final reduction
walks the coordinates in blocks, so its scratch memory stays a few MB above those copies.

Weights are ignored: weighting by a self-reported sample count would let one malicious node claim a
huge count and move the result alone, which is exactly what these aggregators exist to prevent.
For the same reason integer/bool buffers are not taken from the heaviest update, as in FedAvg, but
are the coordinate-wise lower median of the K values (a value some node actually sent; for bools,
the majority with ties to False).
"""

from __future__ import annotations

import torch

from ._base import Aggregator, _Parts, acc_dtype, check_number

_BLOCK = 1 << 22  # elements of K x block scratch per reduction step


class _Robust(Aggregator):
    streaming = False

    def _reset_round(self) -> None:
        super()._reset_round()
        self._kept: dict[str, list[torch.Tensor]] = {}
        self._kept_other: dict[str, list[torch.Tensor]] = {}

    def _accumulate(self, name: str, parts: _Parts, weight: float, first: bool) -> None:
        g = self._global[name]  # type: ignore[index]
        dtype = acc_dtype(g.dtype)
        if len(parts) == 1:
            copy = parts[0][1].to(dtype=dtype, copy=True)
        else:
            copy = torch.empty(g.numel(), dtype=dtype, device=g.device)
            for start, view in parts:
                copy[start : start + view.numel()].copy_(view)
        self._kept.setdefault(name, []).append(copy)

    def _take_nonfloat(self, others, weight: float, node: str) -> None:
        for name, t in others.items():
            self._kept_other.setdefault(name, []).append(t.detach().reshape(-1).clone())

    def _nonfloat_result(self, name: str) -> torch.Tensor:
        g = self._global[name]  # type: ignore[index]
        kept = self._kept_other.pop(name)
        is_bool = g.dtype == torch.bool
        out = torch.empty(g.numel(), dtype=torch.uint8 if is_bool else g.dtype)
        k = len(kept)
        for lo, hi in _blocks(g.numel(), k):
            block = torch.stack([u[lo:hi].to(out.dtype) for u in kept])
            out[lo:hi] = block.sort(dim=0).values[(k - 1) // 2]
        return (out.bool() if is_bool else out).view(g.shape).to(g.device)

    def _reduce(self, name: str) -> torch.Tensor:
        kept = self._kept.pop(name)
        out = torch.empty_like(kept[0])
        for lo, hi in _blocks(out.numel(), len(kept)):
            block = torch.stack([u[lo:hi] for u in kept]).sort(dim=0).values
            self._combine(block, out[lo:hi])
        return out

    def _combine(self, sorted_block: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError


def _blocks(numel: int, k: int):
    step = max(1, _BLOCK // max(1, k))
    for lo in range(0, numel, step):
        yield lo, min(numel, lo + step)


class TrimmedMean(_Robust):
    """Coordinate-wise trimmed mean: per coordinate, drop the ``floor(trim * K)`` largest and as many
    smallest values of the K updates and average the rest (unweighted).

    Keeps all K updates in memory (K model copies) - not streaming. With fewer than ``1 / trim``
    nodes nothing is trimmed and the result is the plain unweighted mean.
    """

    name = "trimmed_mean"

    def __init__(self, trim: float = 0.1) -> None:
        self.trim = check_number("TrimmedMean", "trim", trim, lo=0.0, hi=0.5, hi_open=True)
        super().__init__()

    def config(self) -> dict:
        return {"name": self.name, "trim": self.trim}

    def _combine(self, sorted_block: torch.Tensor, out: torch.Tensor) -> None:
        k = sorted_block.shape[0]
        cut = int(self.trim * k)
        torch.mean(sorted_block[cut : k - cut], dim=0, out=out)


class Median(_Robust):
    """Coordinate-wise median of the K updates (mean of the two middle values when K is even; unweighted).

    Keeps all K updates in memory (K model copies) - not streaming.
    """

    name = "median"

    def _combine(self, sorted_block: torch.Tensor, out: torch.Tensor) -> None:
        k = sorted_block.shape[0]
        if k % 2:
            out.copy_(sorted_block[k // 2])
        else:
            torch.add(sorted_block[k // 2 - 1], sorted_block[k // 2], out=out).mul_(0.5)
