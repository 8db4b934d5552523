"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

Each round the weighted average of the nodes' models is computed exactly as FedAvg does (streaming,
one accumulator); the server then treats ``delta = average - global`` as a negative
pseudo-gradient and takes one optimizer step on the global model::

    FedOpt      x <- x + lr * delta                       (server SGD; lr = 1 is FedAvg)
    FedAvgM     b <- momentum * b + delta;  x <- x + lr * b            (Hsu et al. 2019)
    FedAdagrad  m <- b1 m + (1-b1) delta;  v <- v + delta^2
    FedAdam     m <- b1 m + (1-b1) delta;  v <- b2 v + (1-b2) delta^2
    FedYogi     m <- b1 m + (1-b1) delta;  v <- v - (1-b2) delta^2 sign(v - delta^2)
                x <- x + lr * m / (sqrt(v) + tau)        (the three adaptive ones)

As in the paper there is no bias correction, ``m`` starts at 0 and ``v`` at ``tau^2`` (the paper asks
``v_{-1} >= tau^2``). Defaults: ``beta1 = 0.9`` and ``beta2 = 0.99``, the values the paper fixes for
all its experiments; the paper tunes ``lr`` (server) and ``tau`` per task over grids and
``lr = 1e-2``, ``tau = 1e-3`` are the values it most often selects - tune them for real work. FedAvgM
defaults to ``lr = 1.0, momentum = 0.9`` (Hsu et al.).

Moments live in the accumulation dtype (float32, float64 for float64 tensors), one flat tensor per
floating parameter, and come back through :meth:`state_dict` as ``m/<name>`` and ``v/<name>`` so a
checkpointed experiment resumes bit for bit. Integer/bool buffers are taken as in FedAvg.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import MeshflError
from ._base import FedAvg, acc_dtype, check_number


class FedOpt(FedAvg):
    """Server SGD on the pseudo-gradient: ``x <- x + server_lr * (average - x)``.

    ``server_lr = 1`` gives FedAvg; the base of the FedOpt family (FedAvgM, FedAdagrad, FedAdam,
    FedYogi), which keep their moments in ``self._moments[kind][name]``.
    """

    name = "fedopt"
    _kinds: tuple[str, ...] = ()  # moment tensors carried between rounds

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = check_number(type(self).__name__, "server_lr", server_lr, lo=0.0, lo_open=True)
        self._moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in self._kinds}
        super().__init__()

    def config(self) -> dict:
        return {"name": self.name, "server_lr": self.server_lr}

    # one step for one tensor: ``delta`` is the flat pseudo-gradient buffer (may be overwritten and
    # returned), ``x`` the flat global in the accumulation dtype.
    def _step(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return delta.mul_(self.server_lr).add_(x)

    def _server_step(self, glob: Mapping[str, torch.Tensor], reduced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, avg in reduced.items():
            if self._parameters is not None and name not in self._parameters:
                out[name] = avg  # a buffer (e.g. running statistics): averaged, never stepped
                continue
            x = glob[name].reshape(-1)
            if x.dtype != avg.dtype:
                x = x.to(avg.dtype)
            out[name] = self._step(name, avg.sub_(x), x)
        return out

    def _moment(self, kind: str, name: str, like: torch.Tensor, fill: float) -> torch.Tensor:
        store = self._moments[kind]
        t = store.get(name)
        if t is None:
            t = store[name] = torch.full_like(like, fill)
        return t

    def _check_global(self, glob: Mapping[str, torch.Tensor]) -> None:
        for kind, store in self._moments.items():
            for name, t in store.items():
                g = glob.get(name)
                if g is None or not g.is_floating_point() or g.numel() != t.numel() or acc_dtype(g.dtype) != t.dtype:
                    raise MeshflError(
                        f"{self.name}: server state {kind}/{name} does not fit the global model",
                        code="bad_state", details={"tensor": name},
                    )
                if t.device != g.device:
                    store[name] = t.to(g.device)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["tensors"] = {f"{kind}/{name}": t.clone() for kind, store in self._moments.items() for name, t in store.items()}
        return state

    def _load_tensors(self, meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
        moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in self._kinds}
        for key, t in tensors.items():
            kind, _, name = key.partition("/")
            if kind not in moments or not name or not t.is_floating_point():
                raise MeshflError(f"{self.name}: unexpected state tensor {key!r}", code="bad_state")
            moments[kind][name] = t.detach().reshape(-1).clone()
        self._moments = moments


class FedAvgM(FedOpt):
    """FedAvg with server momentum (Hsu et al. 2019): ``b <- momentum b + delta; x <- x + lr b``."""

    name = "fedavgm"
    _kinds = ("m",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.momentum = check_number("FedAvgM", "momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
        super().__init__(server_lr)

    def config(self) -> dict:
        return {**super().config(), "momentum": self.momentum}

    def _step(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b = self._moments["m"].get(name)
        if b is None:
            b = self._moments["m"][name] = delta.clone()
        else:
            b.mul_(self.momentum).add_(delta)
        return torch.add(x, b, alpha=self.server_lr, out=delta)


class _Adaptive(FedOpt):
    _kinds = ("m", "v")

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3) -> None:
        owner = type(self).__name__
        self.beta1 = check_number(owner, "beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
        self.tau = check_number(owner, "tau", tau, lo=0.0, lo_open=True)
        super().__init__(server_lr)

    def config(self) -> dict:
        return {**super().config(), "beta1": self.beta1, "tau": self.tau}

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        raise NotImplementedError

    def _step(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m = self._moment("m", name, delta, 0.0)
        v = self._moment("v", name, delta, self.tau * self.tau)
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self._second_moment(v, delta)  # may overwrite delta
        out = torch.sqrt(v, out=delta).add_(self.tau)
        torch.div(m, out, out=out)
        return out.mul_(self.server_lr).add_(x)


class FedAdagrad(_Adaptive):
    """FedAdagrad: ``v <- v + delta^2`` (``beta1 = 0`` drops the first moment, as plain Adagrad)."""

    name = "fedadagrad"

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.addcmul_(delta, delta)


class FedAdam(_Adaptive):
    """FedAdam: ``v <- beta2 v + (1 - beta2) delta^2``."""

    name = "fedadam"

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.beta2 = check_number(type(self).__name__, "beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
        super().__init__(server_lr, beta1, tau)

    def config(self) -> dict:
        return {**super().config(), "beta2": self.beta2}

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.mul_(self.beta2).addcmul_(delta, delta, value=1.0 - self.beta2)


class FedYogi(FedAdam):
    """FedYogi: ``v <- v - (1 - beta2) delta^2 sign(v - delta^2)`` (v grows more cautiously than Adam's)."""

    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        sq = delta.mul_(delta)  # delta is no longer needed: reuse its buffer
        sign = torch.sub(v, sq).sign_()
        v.addcmul_(sq, sign, value=-(1.0 - self.beta2))
