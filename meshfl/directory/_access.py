"""A node's access requests: what researchers it does not trust asked through a directory, and
the operator's decisions (``meshfl access list/approve/deny``).

Table ``access``: request id -> the signed request, who asked (peer id, card name, the endpoint
to dial), for which dataset, through which directory, and its state (pending, approved, denied;
``reported``: the directory was told). Approving trusts the researcher's pinned key and endpoint
in the same commit as the decision, so the running node then dials it and serves it.
"""

from __future__ import annotations

import logging
import time

from ..errors import ConfigError, MeshflError
from ..home import Home, check_endpoint
from ..store import AuditLog, Store
from ._signed import REQUEST, verify

log = logging.getLogger("meshfl.directory")

TABLE = "access"
STATUSES = ("pending", "approved", "denied")


class AccessRequests:
    def __init__(self, store: Store, audit: AuditLog):
        self._store = store
        self._table = store.table(TABLE)
        self._audit = audit

    def receive(self, doc: dict, directory: str, node_id: str) -> dict | None:
        """Keep a genuine request for this node that came through ``directory``; returns its
        record when it is new, None when it was known. CryptoError/MeshflError when it is not
        genuine or not for this node."""
        body = verify(doc, REQUEST)
        if body.get("node") != node_id:
            raise MeshflError("an access request for another node", code="bad_request")
        rid = body.get("id")
        if not isinstance(rid, str) or not rid or len(rid) > 64:
            raise MeshflError("an access request without a proper id", code="bad_request")
        try:
            endpoint = check_endpoint(body.get("endpoint"))
        except ConfigError as exc:
            raise MeshflError(f"access request {rid}: {exc.message}", code="bad_request") from None
        card = body["card"]
        record = {"id": rid, "doc": doc, "researcher": card.peer_id, "name": card.name, "endpoint": endpoint,
                  "dataset": str(body.get("dataset")), "message": str(body.get("message") or "")[:1000],
                  "directory": directory, "status": "pending", "received": time.time(), "reported": False}

        def keep(tx) -> bool:
            if tx.has(TABLE, rid):
                return False
            tx.put(TABLE, rid, record)
            self._audit.append("access.received", id=rid, researcher=card.peer_id, name=card.name,
                               dataset=record["dataset"], endpoint=endpoint, directory=directory)
            return True

        return record if self._store.atomic(keep) else None

    def list(self, status: str | None = None) -> list[dict]:
        """Requests, oldest first, without their signed documents."""
        rows = [{k: v for k, v in row.items() if k != "doc"} for _, row in self._table.items()]
        rows.sort(key=lambda r: r["received"])
        return [r for r in rows if status is None or r["status"] == status]

    def get(self, rid: str) -> dict:
        row = self._table.get(rid)
        if row is None:
            raise MeshflError(f"no access request {rid!r} (see `meshfl access list`)", code="unknown_request")
        return row

    def unreported(self, directory: str) -> list[dict]:
        """Decisions the directory has not been told yet."""
        return [row for _, row in self._table.items()
                if row["directory"] == directory and row["status"] != "pending" and not row["reported"]]

    def reported(self, rid: str) -> None:
        self._store.atomic(lambda tx: tx.put(TABLE, rid, {**tx.get(TABLE, rid), "reported": True}))


def decide(home: Home, rid: str, approve: bool, *, by: str = "operator", name: str | None = None) -> dict:
    """Approve (trust the researcher's key and endpoint, so the node dials it) or deny a pending
    request, audited with ``by``; then nudge the running node, if any. ``name``: what to call the
    researcher here (default its card's name)."""
    from ..node._release import nudge_node

    requests = AccessRequests(home.store, home.audit)
    row = requests.get(rid)
    if row["status"] != "pending":
        raise MeshflError(f"access request {rid} was already {row['status']}", code="already_decided")
    status = "approved" if approve else "denied"
    card = verify(row["doc"], REQUEST)["card"]  # the pinned key, checked again

    def commit(tx) -> None:
        tx.put(TABLE, rid, {**row, "status": status, "decided": time.time(), "by": by, "reported": False})
        home.audit.append(f"access.{status}", id=rid, researcher=card.peer_id, dataset=row["dataset"], by=by)
        if approve:  # a name already used here (name_taken) undoes the whole decision
            home.trust(card, endpoint=row["endpoint"], name=name)

    home.store.atomic(commit)
    log.info("access request %s from %s %s by %s", rid, card.name, status, by)
    return {"id": rid, "status": status, "researcher": card.peer_id, "name": name or card.name,
            "endpoint": row["endpoint"], "dataset": row["dataset"], "node_running": nudge_node(home.path)}


