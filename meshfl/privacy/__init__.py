"""What the data owner decides, enforced on the node: per-dataset policy, differential privacy,
the privacy ledger.

* :mod:`._policy` - the per-dataset rules the operator sets (``meshfl dataset policy``);
* :mod:`._gate` - the one check every request passes before work starts (design §8);
* :mod:`._dp` - DP-SGD and client-level DP: what a task asks for and what it costs;
* :mod:`._accountant` - Renyi-DP accounting (Opacus, ``pip install meshfl[dp]``);
* :mod:`._ledger` - each dataset's spent budget, debited when a result is released.

The release step that joins them to the outbox and the audit chain is the node's
(:mod:`meshfl.node._release`).
"""

from ._dp import MODES, ClientDP, DPError, DPSGD, DPSpec, clip_and_noise, mechanism, node_noise_std
from ._gate import Gate, Grant, PolicyRefused, Request, public_policy
from ._ledger import Ledger
from ._policy import KINDS, Policy, PolicyError, PolicyTable

__all__ = [
    "KINDS",
    "MODES",
    "ClientDP",
    "DPError",
    "DPSGD",
    "DPSpec",
    "Gate",
    "Grant",
    "Ledger",
    "Policy",
    "PolicyError",
    "PolicyRefused",
    "PolicyTable",
    "Request",
    "clip_and_noise",
    "mechanism",
    "node_noise_std",
    "public_policy",
]
