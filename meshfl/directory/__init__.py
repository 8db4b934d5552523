"""A dataset directory (PyGrid's Network, without seeing data), and access requests through it.

Nodes opt datasets in and publish signed metadata entries to directories they trust (never paths,
never data); researchers search directories they trust and get only entries that verify against
the node's identity key; a researcher asks a found node for access through the directory, the
node's operator approves (trusting the researcher's pinned key and endpoint) or denies.

- ``_signed``: the signed documents (entries, requests) and their verification
- ``_service``: the directory peer (``meshfl directory start``)
- ``_publications``: the datasets a node publishes
- ``_links``: a running node's links to its directories (publication, requests, decisions)
- ``_access``: a node's access requests and the operator's decision
- ``_client``: a researcher's search, access request and request status
"""

import importlib

_WHERE = {"AccessRequests": "_access", "decide": "_access", "search": "_client", "NodeDirectories": "_links",
          "Publications": "_publications", "Directory": "_service", "ENTRY": "_signed", "REQUEST": "_signed",
          "verify": "_signed"}


def __getattr__(name: str):
    """Load on first use, so the CLI's commands start without the transport."""
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'meshfl.directory' has no attribute {name!r}")


__all__ = sorted(_WHERE)
