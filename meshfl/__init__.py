"""meshfl: federated learning over an authenticated ZeroMQ mesh.

The public API lives here; everything else is private to its sub-package. Heavy names (they
import torch) load on first use, so ``import meshfl`` and the CLI start fast.
"""

from importlib import import_module

__version__ = "0.1.0"

from .errors import (
    ConfigError,
    MeshflError,
    NotTrusted,
    PeerUnavailable,
    RemoteError,
    RequestTimeout,
    TransportError,
    WireError,
)

_LAZY = {
    "Researcher": "meshfl.researcher",
    "Experiment": "meshfl.researcher",
    "RoundFailed": "meshfl.researcher",
    "PrivacyBudgetExhausted": "meshfl.researcher",
    "DPSGD": "meshfl.privacy",
    "ClientDP": "meshfl.privacy",
    "Analytics": "meshfl.analytics",
    "Standardize": "meshfl.analytics",
    "MinMaxScale": "meshfl.analytics",
    "ImputeMean": "meshfl.analytics",
    "OneHot": "meshfl.analytics",
    "Node": "meshfl.node",
    "Host": "meshfl.hosted",
    "Client": "meshfl.hosted",
    "TorchTrainingPlan": "meshfl.plans",
    "SKLearnTrainingPlan": "meshfl.plans",
    "FedAvg": "meshfl.aggregate",
    "FedProx": "meshfl.aggregate",
    "FedAvgM": "meshfl.aggregate",
    "FedAdagrad": "meshfl.aggregate",
    "FedAdam": "meshfl.aggregate",
    "FedYogi": "meshfl.aggregate",
    "TrimmedMean": "meshfl.aggregate",
    "Median": "meshfl.aggregate",
    "Krum": "meshfl.aggregate",
    "MultiKrum": "meshfl.aggregate",
    "Scaffold": "meshfl.aggregate",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshfl' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ConfigError",
    "MeshflError",
    "NotTrusted",
    "PeerUnavailable",
    "RemoteError",
    "RequestTimeout",
    "TransportError",
    "WireError",
    "__version__",
    *_LAZY,
]
