"""Persistence for a meshfl peer: one LMDB environment holding tables, a durable task queue, an
outbox of unacknowledged messages and a hash-chained audit log.

Every write is committed (and, by default, flushed to disk) before the call returns. The store
knows nothing of nodes, training or networking.
"""

from .audit import AuditLog, AuditRecord, VerifyResult
from .outbox import Outbox, OutboxItem
from .store import Store, Tx
from .table import Table
from .taskqueue import Task, TaskQueue

__all__ = [
    "AuditLog",
    "AuditRecord",
    "Outbox",
    "OutboxItem",
    "Store",
    "Table",
    "Task",
    "TaskQueue",
    "Tx",
    "VerifyResult",
]
