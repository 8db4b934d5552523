"""Transport: authenticated ZeroMQ peers (ROUTER inbox, DEALER per dialed peer), request/reply."""

from ._peer import Handler, LinkInfo, Peer
from ._trust import TrustEntry, TrustTable
from ._zap import zap_decide

__all__ = ["Handler", "LinkInfo", "Peer", "TrustEntry", "TrustTable", "zap_decide"]
