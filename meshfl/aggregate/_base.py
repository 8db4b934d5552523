"""The aggregator contract, shared validation and the streaming weighted mean (FedAvg, FedProx).

An aggregator is driven the same way whatever it computes::

    agg.begin(global_state)            # start a round
    agg.add(update, weight, node)      # once per node, as replies stream in
    new_global = agg.finish()          # the next global model

``update`` is a node's trained model state (not a delta) and ``weight`` its sample count. Streaming
aggregators fold each update into one accumulator the moment it arrives, so a round holds about one
extra model in memory whatever the number of nodes; robust ones must keep every update and say so
(``streaming = False``).

Arithmetic. Floating tensors accumulate in float32 (float64 for float64 models) with one fused
``acc.add_(x, alpha=w)`` per update - the form that runs at memory bandwidth (a separate multiply
then add reads each update twice, stacking copies everything first). A received
:class:`~meshfl.wire.TensorMap` is read frame by frame through ``pieces()``, so a tensor cut into
several frames is never gathered. The result is cast back to the global model's dtype.

Integer and bool buffers (BatchNorm's ``num_batches_tracked``, step counters, masks) are not
averaged: a mean of counters or flags is not a counter or a flag, and rounding it would invent a
value no node has. The new model takes them from the update with the largest weight - the node that
saw the most data - with ties going to the smallest non-empty node name, else to the first added.

Not thread-safe: one round loop drives one aggregator.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Collection, Mapping

import torch

from ..errors import ConfigError, MeshflError

_Parts = list  # list[tuple[int, torch.Tensor]]: (first element, 1-D view) covering one tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a floating tensor of ``dtype`` accumulates in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_number(owner: str, name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real hyper-parameter within bounds, as float; else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}")
    value = float(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{owner}: {name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ConfigError(f"{owner}: {name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def _bad(message: str, node: str, tensor: str | None = None) -> MeshflError:
    details: dict[str, Any] = {"node": node}
    if tensor is not None:
        details["tensor"] = tensor
    who = f"update from {node!r}" if node else "update"
    return MeshflError(f"{who}: {message}", code="bad_update", details=details)


class Aggregator(ABC):
    """Base of every aggregator: ``begin`` / ``add`` / ``finish``, checkpointable, rebuildable.

    Subclasses implement :meth:`_accumulate` (fold one update's floating tensor in) and
    :meth:`_reduce` (the round's plain aggregate of one tensor); server optimizers also override
    :meth:`_server_step`. Validation, integer buffers, casting and bookkeeping live here.
    """

    name: ClassVar[str] = ""
    #: True when memory stays at about one accumulator; False when every update is kept.
    streaming: ClassVar[bool] = True

    def __init__(self) -> None:
        self._rounds = 0
        self._global: dict[str, torch.Tensor] | None = None
        self._parameters: frozenset[str] | None = None
        self._population: int | None = None
        self._reset_round()

    # ------------------------------------------------------------------ contract

    def begin(self, global_state: Mapping[str, torch.Tensor], parameters: Collection[str] | None = None,
              *, population: int | None = None) -> None:
        """Start a round on ``global_state``; any unfinished round is discarded.

        A reference to the global model is kept (not a copy): it must not change before
        :meth:`finish`. Accumulators are allocated lazily, on the first :meth:`add`.
        ``parameters`` names the trainable tensors: a server optimizer steps only those and
        averages the rest (BatchNorm's running statistics are not gradients); None means all.
        ``population``: how many nodes could have taken part (SCAFFOLD scales its control
        update by the share that did); None means every one that could did.
        """
        self._parameters = None if parameters is None else frozenset(parameters)
        self._population = population
        glob: dict[str, torch.Tensor] = {}
        for name in global_state:
            tensor = global_state[name]
            if not isinstance(tensor, torch.Tensor):
                raise MeshflError(f"global model entry {name!r} is a {type(tensor).__name__}, not a tensor",
                                  code="bad_state", details={"tensor": name})
            glob[name] = tensor.detach()
        self._check_global(glob)
        self._reset_round()
        self._global = glob

    def add(self, update: Mapping[str, torch.Tensor], weight: float, node: str = "", *, count: int = 1) -> None:
        """Fold in one node's trained model state, weighted by ``weight`` (its sample count).

        The update is checked whole before anything is accumulated, so a rejected update
        (:class:`MeshflError` code ``bad_update``, naming the tensor) leaves the round untouched.
        It carries the tensors of :meth:`round_tensors` too. ``count``: how many nodes' updates it
        stands for (a secure-aggregation mean stands for every survivor's).
        """
        glob = self._require_round()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise _bad(f"weight must be a finite number > 0, got {weight!r}", node)
        weight = float(weight)
        if node and node in self._nodes:
            raise _bad("this node already sent an update this round", node)
        floats, others = self._plan(glob, update, node)
        with torch.no_grad():
            for name, parts in floats.items():
                self._accumulate(name, parts, weight, first=self._count == 0)
            if others:
                self._take_nonfloat(others, weight, node)
        self._count += count
        self._total_weight += weight
        if node:
            self._nodes.add(node)

    def finish(self) -> dict[str, torch.Tensor]:
        """The new global model state (same names, shapes and dtypes); ends the round.

        Raises :class:`MeshflError` ``no_updates`` if nothing was added.
        """
        glob = self._require_round()
        if self._count == 0:
            raise MeshflError("no updates were added this round", code="no_updates")
        with torch.no_grad():
            reduced = {name: self._reduce(name) for name, g in glob.items() if g.is_floating_point()}
            stepped = self._server_step(glob, reduced)
            out: dict[str, torch.Tensor] = {}
            for name, g in glob.items():
                if g.is_floating_point():
                    t = stepped[name].view(g.shape)
                    out[name] = t if t.dtype == g.dtype else t.to(g.dtype)
                else:
                    out[name] = self._nonfloat_result(name)
        self._rounds += 1
        self._reset_round()
        self._global = None
        return out

    def training_args(self) -> dict:
        """Extra arguments the nodes' training step needs (e.g. FedProx's ``mu``)."""
        return {}

    def round_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that travel to the nodes beside the global model this round and come back,
        changed, in every update (SCAFFOLD's control variate); valid after :meth:`begin`."""
        return {}

    def summary(self) -> dict:
        """What the last finished round decided, for the history (Krum: the updates it kept)."""
        return {}

    def config(self) -> dict:
        """``{"name": ..., hyper-parameters}``; :func:`make_aggregator` rebuilds the aggregator."""
        return {"name": self.name}

    def state_dict(self) -> dict:
        """State carried from round to round: ``{"meta": JSON-able dict, "tensors": {name: tensor}}``.

        Taken between rounds (an unfinished round is not part of it). Tensors are copies.
        """
        return {"meta": {"name": self.name, "rounds": self._rounds}, "tensors": {}}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict`; hyper-parameters stay those this object was built with."""
        meta = state.get("meta") if isinstance(state, Mapping) else None
        if not isinstance(meta, Mapping) or meta.get("name") != self.name:
            got = meta.get("name") if isinstance(meta, Mapping) else None
            raise MeshflError(f"state of aggregator {got!r} cannot be loaded into {self.name!r}", code="bad_state")
        rounds = meta.get("rounds", 0)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise MeshflError(f"bad round count {rounds!r} in aggregator state", code="bad_state")
        tensors = state.get("tensors", {})
        if not isinstance(tensors, Mapping) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise MeshflError("aggregator state tensors must be a mapping of tensors", code="bad_state")
        self._load_tensors(meta, tensors)
        self._rounds = rounds
        self._reset_round()
        self._global = None

    # ------------------------------------------------------------------ introspection

    @property
    def rounds(self) -> int:
        """Rounds finished so far (restored by :meth:`load_state_dict`)."""
        return self._rounds

    @property
    def count(self) -> int:
        """Updates added in the current round."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights added in the current round."""
        return self._total_weight

    @property
    def nodes(self) -> frozenset[str]:
        """Named nodes that contributed to the current round."""
        return frozenset(self._nodes)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({params})"

    # ------------------------------------------------------------------ hooks

    @abstractmethod
    def _accumulate(self, name: str, parts: _Parts, weight: float, first: bool) -> None:
        """Fold one update's floating tensor ``name`` in; ``parts`` cover it as 1-D views."""

    @abstractmethod
    def _reduce(self, name: str) -> torch.Tensor:
        """The round's aggregate of ``name``: flat, accumulation dtype, owned by the caller."""

    def _server_step(self, glob: Mapping[str, torch.Tensor], reduced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn the aggregates into the new global (flat, accumulation dtype). Default: as is."""
        return reduced

    def _check_global(self, glob: Mapping[str, torch.Tensor]) -> None:
        """Refuse a global model that does not fit carried state (server moments)."""

    def _load_tensors(self, meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
        if tensors:
            raise MeshflError(f"{self.name} carries no tensors, state has {len(tensors)}", code="bad_state")

    def _reset_round(self) -> None:
        self._count = 0
        self._total_weight = 0.0
        self._nodes: set[str] = set()
        self._acc: dict[str, torch.Tensor] = {}
        self._pick: tuple[float, str, dict[str, torch.Tensor]] | None = None

    def _take_nonfloat(self, others: dict[str, torch.Tensor], weight: float, node: str) -> None:
        """Integer/bool buffers: keep those of the update with the largest weight (see module doc)."""
        best = self._pick
        if best is not None:
            bw, bnode, _ = best
            if not (weight > bw or (weight == bw and node and bnode and node < bnode)):
                return
        self._pick = (weight, node, {name: t.detach().clone() for name, t in others.items()})

    def _nonfloat_result(self, name: str) -> torch.Tensor:
        assert self._pick is not None and self._global is not None
        return self._pick[2][name].to(self._global[name].device)

    # ------------------------------------------------------------------ internals

    def _require_round(self) -> dict[str, torch.Tensor]:
        if self._global is None:
            raise MeshflError(f"{self.name}: no round in progress (call begin first)", code="bad_state")
        return self._global

    def _plan(self, glob: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], node: str
              ) -> tuple[dict[str, _Parts], dict[str, torch.Tensor]]:
        """Check ``update`` against the global model; its floating tensors as 1-D parts, others whole."""
        if not isinstance(update, Mapping):
            raise _bad(f"must be a mapping of tensors, got {type(update).__name__}", node)
        names = set(iter(update))  # not ``name in update``: Mapping.__contains__ would gather a TensorMap's tensor
        missing = [n for n in glob if n not in names]
        if missing:
            raise _bad(f"tensor {missing[0]!r} is missing ({len(missing)} missing)", node, missing[0])
        if len(names) != len(glob):
            extra = [n for n in names if n not in glob]
            raise _bad(f"tensor {extra[0]!r} is not in the global model", node, extra[0])
        spec = getattr(update, "spec", None)
        pieces = getattr(update, "pieces", None)
        floats: dict[str, _Parts] = {}
        others: dict[str, torch.Tensor] = {}
        for name, g in glob.items():
            if spec is not None:
                dtype, shape = spec(name)[:2]
                tensor = None
            else:
                tensor = update[name]
                if not isinstance(tensor, torch.Tensor):
                    raise _bad(f"tensor {name!r} is a {type(tensor).__name__}", node, name)
                dtype, shape = tensor.dtype, tensor.shape
            if tuple(shape) != tuple(g.shape):
                raise _bad(f"tensor {name!r} has shape {tuple(shape)}, global model has {tuple(g.shape)}", node, name)
            if g.is_floating_point():
                if not dtype.is_floating_point:
                    raise _bad(f"tensor {name!r} is {dtype}, global model has {g.dtype}", node, name)
                floats[name] = self._parts(update, name, g, tensor, pieces)
            else:
                if dtype != g.dtype:
                    raise _bad(f"tensor {name!r} is {dtype}, global model has {g.dtype}", node, name)
                others[name] = update[name] if tensor is None else tensor
        return floats, others

    @staticmethod
    def _parts(update: Mapping, name: str, g: torch.Tensor, tensor: torch.Tensor | None, pieces: Any) -> _Parts:
        numel = g.numel()
        if tensor is None and pieces is not None:
            parts = [(int(start), view) for start, view in pieces(name)]
            if sum(view.numel() for _, view in parts) == numel:
                return [(s, v if v.device == g.device else v.to(g.device)) for s, v in parts]
            tensor = update[name]
        t = tensor.detach().reshape(-1)
        return [(0, t if t.device == g.device else t.to(g.device))]


class FedAvg(Aggregator):
    """Federated averaging (McMahan et al. 2017): ``sum(w_i x_i) / sum(w_i)``, ``w_i`` = sample counts.

    Streaming: one accumulator per tensor, whatever the number of nodes.
    """

    name = "fedavg"

    def _accumulate(self, name: str, parts: _Parts, weight: float, first: bool) -> None:
        acc = self._acc.get(name)
        if acc is None:
            g = self._global[name]  # type: ignore[index]
            acc = self._acc[name] = torch.empty(g.numel(), dtype=acc_dtype(g.dtype), device=g.device)
            first = True
        for start, view in parts:
            dst = acc[start : start + view.numel()]
            if not first:
                dst.add_(view, alpha=weight)  # fused: reads the update once
            elif view.dtype == acc.dtype:
                torch.mul(view, weight, out=dst)  # first update: no zero-fill pass
            else:
                dst.copy_(view)
                dst.mul_(weight)

    def _reduce(self, name: str) -> torch.Tensor:
        acc = self._acc.pop(name)
        return acc.div_(self._total_weight)


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server; nodes add ``mu/2 ||w - w_global||^2`` to their loss.

    ``mu`` reaches the nodes through :meth:`training_args` as ``{"fedprox_mu": mu}``.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = check_number("FedProx", "mu", mu, lo=0.0)
        super().__init__()

    def training_args(self) -> dict:
        return {"fedprox_mu": self.mu}

    def config(self) -> dict:
        return {"name": self.name, "mu": self.mu}
