"""Differential privacy for training tasks: what the researcher asks for, what it costs the node.

Two mechanisms, chosen per experiment (``Experiment(..., dp=...)``):

* :class:`DPSGD` - sample-level DP inside a node's training (Abadi et al. 2016), with Opacus:
  per-sample gradients clipped to ``max_grad_norm``, Gaussian noise of ``noise_multiplier`` times
  that, Poisson batches of rate ``q = batch_size / train samples``. The node runs its own loop
  for it (a plan that replaces ``train()`` is refused: the node could not vouch for it).
* :class:`ClientDP` - client-level DP for the aggregate (DP-FedAvg, McMahan et al. 2018): the
  node process itself clips the trained change to ``clip`` in L2 norm and adds Gaussian noise,
  after the plan has finished, so no plan code can skip it. Without secure aggregation the
  researcher sees each update, so each node adds the whole noise ``noise_multiplier * clip``; with
  it, the researcher sees only the sum of at least ``t`` (the round's threshold) updates, so each
  node adds ``1/sqrt(t)`` of the noise's standard deviation and the sum carries the whole of it -
  provided the other nodes add theirs (docs/security.md states this trust).

Either way the node computes the task's cost itself, from the mechanism it enforces, before any
work starts (:func:`mechanism`), and the privacy ledger debits it when the result is released.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import MeshflError

MODES = ("sample", "client")


class DPError(MeshflError):
    """A differential-privacy request that cannot be served (code ``bad_dp`` or as given)."""

    code = "bad_dp"


@dataclass(frozen=True)
class DPSGD:
    """Sample-level DP-SGD on every node (Opacus): ``Experiment(..., dp=DPSGD(1.1, 1.0))``."""

    noise_multiplier: float
    max_grad_norm: float = 1.0

    def to_wire(self) -> dict:
        return DPSpec("sample", self.noise_multiplier, self.max_grad_norm).to_wire()


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP of each node's update: ``Experiment(..., dp=ClientDP(1.0, clip=0.5))``."""

    noise_multiplier: float
    clip: float = 1.0

    def to_wire(self) -> dict:
        return DPSpec("client", self.noise_multiplier, self.clip).to_wire()


@dataclass(frozen=True)
class DPSpec:
    """The ``dp`` field of a train request, checked: mode, noise multiplier, clipping norm."""

    mode: str
    noise_multiplier: float
    clip: float

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DPError(f"dp mode is one of {', '.join(MODES)}, not {self.mode!r}")
        for name in ("noise_multiplier", "clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 < value <= 1e6:
                raise DPError(f"dp {name} is a number in (0, 1e6], not {value!r}")
            object.__setattr__(self, name, float(value))

    @classmethod
    def from_wire(cls, data: Any) -> "DPSpec":
        if isinstance(data, (DPSGD, ClientDP)):
            data = data.to_wire()
        if not isinstance(data, Mapping) or set(data) != {"mode", "noise_multiplier", "clip"}:
            raise DPError("dp is {mode, noise_multiplier, clip}")
        return cls(data["mode"], data["noise_multiplier"], data["clip"])

    def to_wire(self) -> dict:
        return {"mode": self.mode, "noise_multiplier": self.noise_multiplier, "clip": self.clip}


def mechanism(spec: DPSpec, samples: int, training_args: Mapping[str, Any]) -> tuple[float, float, int]:
    """The Gaussian mechanism ``(sigma, q, steps)`` a task releases through, from what the node
    knows before it runs: its dataset's registered size and the task's training arguments.

    DP-SGD trains on the train split (the default split's size: ``samples`` less the test
    fraction); it samples batches by Poisson sampling at rate ``q``, whose privacy depends on ``q``
    alone, and the node's loop takes exactly ``steps`` steps (``steps``, or ``epochs`` passes of
    ``int(1 / q)`` batches, as Opacus' loader counts them).
    """
    if spec.mode == "client":
        return (spec.noise_multiplier, 1.0, 1)
    fraction = float(training_args.get("test_fraction") or 0.0)
    n_train = samples - (int(round(samples * fraction)) if samples > 1 else 0)
    if n_train < 1:
        raise DPError("the dataset leaves no training samples for DP-SGD")
    batch = int(training_args.get("batch_size") or 1)
    if batch < 1:
        raise DPError("DP-SGD needs batch_size >= 1")
    q = min(1.0, batch / n_train)
    if training_args.get("steps"):
        steps = int(training_args["steps"])
    else:
        steps = int(training_args.get("epochs") or 1) * max(1, int(1 / q))
    if steps < 1:
        raise DPError("DP-SGD needs at least one step")
    return (spec.noise_multiplier, q, steps)


def node_noise_std(spec: DPSpec, summed_over: int) -> float:
    """Standard deviation of the Gaussian noise one node adds to its clipped update (client-level
    DP) when at least ``summed_over`` such updates are summed before anyone sees them."""
    return spec.noise_multiplier * spec.clip / math.sqrt(max(1, summed_over))


def clip_and_noise(delta: dict, spec: DPSpec, summed_over: int, weight: float = 1.0) -> float:
    """Client-level DP of one update, in place: clip the floating tensors of ``delta`` jointly to
    L2 norm ``spec.clip``, add Gaussian noise of :func:`node_noise_std` divided by ``weight`` (a
    secure round scales the change by the node's weight ``w`` before summing, so the noise the sum
    carries is ``w`` times what is added here), and zero every other tensor's change (counters
    are not covered by the noise). Returns the norm before clipping.

    The noise comes from a generator seeded with 64 bits of ``os.urandom`` per update; it is not
    Opacus' "secure mode" (which also guards against floating-point attacks).
    """
    import os

    import torch

    floats = [t for t in delta.values() if t.is_floating_point()]
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in floats))
    factor = min(1.0, spec.clip / norm) if norm > 0 else 1.0
    std = node_noise_std(spec, summed_over) / weight
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    for t in delta.values():
        if t.is_floating_point():
            t.mul_(factor).add_(torch.randn(t.shape, generator=generator, dtype=t.dtype), alpha=std)
        elif t.dtype != torch.bool:
            t.zero_()
    return norm
