"""Privacy accounting with Opacus' Renyi-DP accountant (``pip install meshfl[dp]``).

Every differentially private release is a (subsampled) Gaussian mechanism ``(sigma, q, steps)``:
DP-SGD is ``steps`` noisy gradient steps on Poisson batches of rate ``q``; a client-level release
(DP-FedAvg) is one step of rate 1 on the whole, clipped update. Renyi DP composes by adding the
RDP curves of the mechanisms order by order, so a dataset's ledger keeps one summed curve and the
epsilon it has spent is read off that curve at the budget's delta: the same figure Opacus'
``RDPAccountant`` gives for the same history, in constant time however long the history grows.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

from .._extras import require


def _rdp_module():
    return require("opacus.accountants.analysis.rdp", "dp")


def orders() -> list[float]:
    """The Renyi orders the curves are kept at (Opacus' defaults)."""
    return list(require("opacus.accountants", "dp").RDPAccountant.DEFAULT_ALPHAS)


def rdp_curve(mechanisms: Sequence[Sequence[float]]) -> list[float]:
    """The summed RDP curve of ``[(sigma, q, steps), ...]``."""
    rdp = _rdp_module()
    alphas = orders()
    total = [0.0] * len(alphas)
    for sigma, q, steps in mechanisms:
        curve = rdp.compute_rdp(q=float(q), noise_multiplier=float(sigma), steps=int(steps), orders=alphas)
        total = [a + float(b) for a, b in zip(total, curve)]
    return total


def add_curves(*curves: Sequence[float]) -> list[float]:
    present = [c for c in curves if c]
    if not present:
        return []
    return [sum(values) for values in zip(*present)]


def epsilon(curve: Sequence[float], delta: float) -> float:
    """The epsilon a summed curve amounts to at ``delta`` (0 for an empty curve)."""
    if not curve or not any(curve):
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": a bound, still valid
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = _rdp_module().get_privacy_spent(orders=orders(), rdp=list(curve), delta=float(delta))
    eps = float(eps)
    return eps if math.isfinite(eps) else math.inf
