"""Hosted models: a host serves named, versioned models that many clients train (cycles or FedBuff).

``Host`` binds a ROUTER (a researcher home, CURVE, enrolled clients only) and keeps its state in
LMDB; ``Client`` is the light participant (one DEALER, no store). See docs/researcher-guide.md,
"Hosted models", and docs/protocol.md.
"""

from ._client import Backoff, Client
from ._config import ServerConfig, staleness_weight
from ._enroll import create_token, enroll, revoke_token
from ._host import Host

__all__ = ["Backoff", "Client", "Host", "ServerConfig", "create_token", "enroll", "revoke_token", "staleness_weight"]
