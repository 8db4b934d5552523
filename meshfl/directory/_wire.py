"""The directory's message types (docs/protocol.md, "Directory"), declared once for every side."""

from __future__ import annotations

from ..wire import declare

# node -> directory: the node's whole publication there (it replaces what the node published before)
declare("directory.publish", required={"entries": "list"})
declare("directory.published", required={"count": "int"})
# researcher -> directory
declare("directory.search", optional={"tags": "list"})
declare("directory.entries", required={"entries": "list"}, optional={"truncated": "bool"})
declare("access.request", required={"request": "dict"})
declare("access.queued", required={"id": "str", "status": "str"})
declare("access.status")
declare("access.requests", required={"requests": "list"})
# node <-> directory: pending requests (pushed when they come, or fetched), receipt, decision
declare("access.fetch")
declare("access.pending", required={"requests": "list"})
declare("access.received", required={"ids": "list"})
declare("access.decided", required={"id": "str", "status": "str"})
declare("access.noted", required={"id": "str"})
