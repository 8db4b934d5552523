"""Robust aggregators: coordinate-wise (Yin et al. 2018, "Byzantine-Robust Distributed Learning":
TrimmedMean, Median) and by distance (Blanchard et al. 2017, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent": Krum, Multi-Krum).

They are NOT streaming: an order statistic or a distance between updates needs every update, so a
round keeps all K updates - K model copies in the accumulation dtype (``streaming = False``). The
final reduction walks the coordinates in blocks, so its scratch memory stays a few MB above those
copies. For the same reason none of them can run under secure aggregation, where the researcher
sees only the sum of the updates: the experiment refuses that combination (``secagg_incompatible``).

Weights are ignored: weighting by a self-reported sample count would let one malicious node claim a
huge count and move the result alone, which is exactly what these aggregators exist to prevent.
For the same reason integer/bool buffers are not taken from the heaviest update, as in FedAvg, but
are the coordinate-wise lower median of the K values (a value some node actually sent; for bools,
the majority with ties to False).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, MeshflError
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


class Krum(_Robust):
    """Krum (Blanchard et al. 2017): with at most ``f`` Byzantine updates among K, score each update
    by the sum of squared distances to its ``K - f - 2`` nearest others; the result is the update
    with the best (lowest) score. Needs ``K >= 2f + 3`` updates (the paper's ``2f + 2 < K``), else
    the round's :meth:`finish` raises ``too_few_updates``.

    Distances run over every floating tensor of the model, in float64. Ties go to the smallest
    node name, so the choice does not depend on the order results arrived in; :meth:`summary` names
    the kept nodes. Keeps all K updates in memory (K model copies) - not streaming.
    """

    name = "krum"

    def __init__(self, f: int = 1) -> None:
        self.f = _count_arg("f", f, 0)
        self._selected: list[str] | None = None
        super().__init__()

    def config(self) -> dict:
        return {"name": self.name, "f": self.f}

    def add(self, update, weight: float, node: str = "", *, count: int = 1) -> None:
        super().add(update, weight, node, count=count)
        self._names.append(node)

    def summary(self) -> dict:
        return {} if self._selected is None else {"selected": list(self._selected)}

    def _reset_round(self) -> None:
        super()._reset_round()
        self._names: list[str] = []
        self._chosen: list[int] | None = None

    def _keep(self, k: int) -> int:
        """How many of the best-scored updates the result averages."""
        return 1

    def _reduce(self, name: str) -> torch.Tensor:
        if self._chosen is None:
            self._chosen = self._select()
            self._selected = [self._names[i] for i in self._chosen]
        kept = self._kept.pop(name)
        out = kept[self._chosen[0]].clone()
        for i in self._chosen[1:]:
            out.add_(kept[i])
        return out.div_(len(self._chosen))

    def _select(self) -> list[int]:
        """Indices of the updates to average, in node-name order."""
        k = len(self._names)
        if k < 2 * self.f + 3:
            raise MeshflError(f"{self.name} with f={self.f} needs at least {2 * self.f + 3} updates, got {k}",
                              code="too_few_updates", details={"updates": k, "f": self.f})
        dist = torch.zeros(k, k, dtype=torch.float64)
        for kept in self._kept.values():
            for lo, hi in _blocks(kept[0].numel(), k):
                block = torch.stack([u[lo:hi] for u in kept]).to(torch.float64)
                dist += torch.cdist(block, block, compute_mode="donot_use_mm_for_euclid_dist").square_()
        nearest = k - self.f - 2
        scores = [float(torch.cat([row[:i], row[i + 1:]]).sort().values[:nearest].sum()) for i, row in enumerate(dist)]
        best = sorted(range(k), key=lambda i: (scores[i], self._names[i], i))[: self._keep(k)]
        return sorted(best, key=lambda i: (self._names[i], i))


class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al. 2017): the plain mean of the ``m`` best Krum-scored updates;
    ``m = None`` keeps ``K - f`` of the K (all but as many as may be Byzantine). Needs
    ``K >= 2f + 3`` as Krum does."""

    name = "multi_krum"

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        self.m = None if m is None else _count_arg("m", m, 1)
        super().__init__(f)

    def config(self) -> dict:
        return {**super().config(), "m": self.m}

    def _keep(self, k: int) -> int:
        return k - self.f if self.m is None else min(self.m, k)


def _count_arg(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"Krum: {name} must be an integer >= {lo}, got {value!r}")
    return value
