"""meshfl: federated learning over an authenticated ZeroMQ mesh.

The public API lives here; everything else is private to its sub-package.
"""

__version__ = "0.1.0"

from .errors import (
    MeshflError,
    PeerUnavailable,
    RemoteError,
    RequestTimeout,
    TransportError,
    WireError,
)

__all__ = [
    "MeshflError",
    "PeerUnavailable",
    "RemoteError",
    "RequestTimeout",
    "TransportError",
    "WireError",
    "__version__",
]
