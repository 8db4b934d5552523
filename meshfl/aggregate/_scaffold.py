"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning").

On non-IID data each node's local steps drift towards its own optimum, and FedAvg averages the
drift in. SCAFFOLD corrects every local gradient by ``c - c_i``: ``c`` the server's control
variate (an estimate of the global gradient), ``c_i`` the node's own (of its local gradient).

This class is the server side. It sends ``c`` beside the model, one tensor ``scaffold.c/<name>``
per trainable parameter (:meth:`round_tensors`), and every update brings those slots back holding
``(x - y_i) / (K_i * lr)`` - which is ``c + delta_c_i`` with the paper's option II
``c_i+ = c_i - c + (x - y_i) / (K_i * lr)``. Then::

    x <- x + server_lr * (mean(y_i) - x)
    c <- c + (|S| / N) * (mean(slot_i) - c)          i.e.  c + (|S| / N) * mean(delta_c_i)

Means are sample-weighted, as FedAvg's (the paper's are plain: the same when nodes hold equally
much data). ``|S|`` is the number of updates of the round, ``N`` the ``population`` given to
:meth:`begin` (the experiment passes the nodes that hold matching data); without one, ``|S| / N``
is 1. The node side is in ``meshfl/node/_worker.py``: it adds ``c - c_i`` to every gradient with a
hook (a plan's own ``train`` loop gets it too), counts its optimizer steps ``K_i`` and keeps
``c_i+`` durably in its store, per researcher and experiment. The correction assumes plain SGD
steps of size ``lr`` (the plan's ``init_optimizer`` should return ``torch.optim.SGD``).

Secure aggregation works unchanged: the slots are sums like the model's tensors, so the masked
mean of the slots is ``c + mean(delta_c_i)`` (the experiment masks them in the wide 64-bit ring,
not clipped like parameter changes). ``c`` is carried in :meth:`state_dict` as
``c/<name>``, so a checkpointed experiment resumes bit for bit.
"""

from __future__ import annotations

from typing import Collection, Mapping

import torch

from ..errors import MeshflError
from ._base import acc_dtype
from ._fedopt import FedOpt

SLOT = "scaffold.c/"  # the name prefix of the control-variate tensors that travel with the model


class Scaffold(FedOpt):
    """SCAFFOLD: FedAvg (or server SGD with ``server_lr``) plus control variates (module doc)."""

    name = "scaffold"
    _kinds = ("c",)

    def begin(self, global_state: Mapping[str, torch.Tensor], parameters: Collection[str] | None = None,
              *, population: int | None = None) -> None:
        if any(n.startswith(SLOT) for n in global_state):
            raise MeshflError(f"model tensor names must not start with {SLOT!r}", code="bad_state")
        names = [n for n in (global_state if parameters is None else parameters) if n in global_state
                 and isinstance(global_state[n], torch.Tensor) and global_state[n].is_floating_point()]
        slots = {}
        for n in names:
            g = global_state[n]
            c = self._moments["c"].get(n)
            if c is None or c.numel() != g.numel():  # (a c that does not fit is refused just below)
                c = torch.zeros(g.numel(), dtype=acc_dtype(g.dtype), device=g.device)
            # a copy: c changes in place at finish, and the round's requests may still be in flight
            slots[SLOT + n] = c.view(g.shape).to(g.dtype, copy=True)
        # The slots are no parameters of the model: averaged, never stepped by the server optimizer.
        super().begin({**global_state, **slots}, names, population=population)
        self._slots = slots

    def round_tensors(self) -> dict[str, torch.Tensor]:
        self._require_round()
        return dict(self._slots)

    def training_args(self) -> dict:
        return {"scaffold": True}

    def finish(self) -> dict[str, torch.Tensor]:
        out = super().finish()
        for slot in self._slots:
            del out[slot]
        return out

    def _server_step(self, glob: Mapping[str, torch.Tensor], reduced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super()._server_step(glob, reduced)  # the slots are not parameters: averaged, not stepped
        share = 1.0 if not self._population else min(1.0, self._count / self._population)
        for slot in self._slots:
            name = slot[len(SLOT):]
            mean = out[slot]
            c = self._moment("c", name, mean, 0.0)
            c.add_(mean.sub_(c), alpha=share)  # c + share * mean(delta c_i)
            out[slot] = c
        return out
