"""The hosted-model messages, declared once for the host and its clients (docs/protocol.md).

A client's exchange with a host, for one model:

1. ``hosted.request`` (capabilities, the version hash it has cached) -> ``hosted.accepted`` (a
   ticket for this cycle, the version to train, the training arguments, whether its cached copy
   is current) or ``hosted.backoff`` ("come back in ``retry_in`` seconds": not an error).
2. ``hosted.pull`` -> ``hosted.model``: the version's tensors, and the plan source when asked;
   only when the cached hash differs. Tensors travel in frames of 1 MB like every message.
   The client then says ``hosted.pulled`` (one-way), which frees its transfer slot.
3. ``hosted.push`` -> ``hosted.go`` (a transfer slot: see :mod:`meshfl.hosted._flow`), then
   ``hosted.diff`` (ticket, trained minus received, sample count, metrics) -> ``hosted.ack``.
   Sending the same diff id again is harmless: it is acknowledged again and counted once.
"""

from __future__ import annotations

from .. import protocol  # noqa: F401  (ping and pong, which every peer answers)
from ..wire import declare

declare("hosted.request", required={"model": "str"}, optional={"capabilities": "dict", "cached": "str"})
declare("hosted.accepted", required={"model": "str", "ticket": "str", "cycle": "int", "version": "int",
                                     "version_hash": "str", "plan_hash": "str", "training_args": "dict",
                                     "current": "bool", "deadline_in": "float"})
declare("hosted.backoff", required={"model": "str", "retry_in": "float", "reason": "str"})
declare("hosted.pull", required={"model": "str", "version": "int"}, optional={"plan": "bool"})
declare("hosted.model", required={"model": "str", "version": "int", "version_hash": "str", "plan_hash": "str"},
        optional={"plan_source": "str", "plan_class": "str", "model_args": "dict"}, tensors=True)
declare("hosted.pulled", required={"model": "str"})  # one-way: the pulled model arrived
declare("hosted.push", required={"model": "str", "ticket": "str"})
declare("hosted.go", required={"model": "str"})
declare("hosted.diff", required={"model": "str", "ticket": "str", "diff_id": "str", "version": "int",
                                 "samples": "int"}, optional={"metrics": "dict"}, tensors=True)
declare("hosted.ack", required={"model": "str", "diff_id": "str", "cycle": "int", "duplicate": "bool"})
declare("hosted.status", optional={"model": "str"})
declare("hosted.info", required={"models": "list"})
