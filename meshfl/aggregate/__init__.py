"""Aggregators: small pure objects that turn weighted node updates into the next global model.

The round loop drives any of them the same way - ``begin(global)``, ``add(update, weight, node)``
per reply as it streams in, ``finish()`` - and checkpoints them with ``state_dict()``. Streaming ones
(FedAvg, FedProx, the FedOpt family) hold about one model of memory whatever the number of nodes;
robust ones (TrimmedMean, Median, Krum, MultiKrum) keep every update (``streaming`` is False) and
so cannot run under secure aggregation. SCAFFOLD sends its control variate with the model
(``round_tensors``) and takes it back in every update.

``make_aggregator(agg.config())`` rebuilds an aggregator from its experiment record.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError
from ._base import Aggregator, FedAvg, FedProx
from ._fedopt import FedAdagrad, FedAdam, FedAvgM, FedOpt, FedYogi
from ._robust import Krum, Median, MultiKrum, TrimmedMean
from ._scaffold import Scaffold

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedOpt, FedAvgM, FedAdagrad, FedAdam, FedYogi, Scaffold,
                              TrimmedMean, Median, Krum, MultiKrum)
}


def make_aggregator(config: Mapping[str, Any] | str) -> Aggregator:
    """An aggregator from ``{"name": ..., hyper-parameters}`` (as :meth:`Aggregator.config` gives) or a name.

    Unknown names, unknown or out-of-range hyper-parameters raise :class:`~meshfl.errors.ConfigError`.
    """
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, Mapping):
        raise ConfigError(f"aggregator config must be a mapping or a name, got {type(config).__name__}")
    params = dict(config)
    name = params.pop("name", None)
    cls = AGGREGATORS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown aggregator {name!r}; known: {', '.join(sorted(AGGREGATORS))}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"aggregator {name!r}: {exc}") from None


__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Krum",
    "Median",
    "MultiKrum",
    "Scaffold",
    "TrimmedMean",
    "make_aggregator",
]
