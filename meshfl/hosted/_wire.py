"""The hosted-model messages, declared once for the host and its clients (docs/protocol.md).

A client's exchange with a host, for one model:

1. ``hosted.request`` (capabilities, the version hash it has cached, ``pull``: send the version
   with my ticket if it is stale and fits one chunk) -> ``hosted.accepted`` (a
   ticket for this cycle, the version to train, the training arguments, whether its cached copy
   is current; ``inline``: the version itself, and step 2 is only its ``hosted.pulled``) or
   ``hosted.backoff`` ("come back in ``retry_in`` seconds": not an error).
2. ``hosted.pull`` -> ``hosted.model``: the version (and the plan source when asked), only when
   the cached hash differs. A model of at most one chunk rides inline; a larger one is announced
   by its ``layout`` and pulled chunk by chunk (``hosted.fetch`` -> ``hosted.chunk``, a window in
   flight: :mod:`meshfl.hosted._chunks`). The client then says ``hosted.pulled`` (one-way),
   which frees its transfer slot.
3. ``hosted.push`` (the diff's ``layout``) -> ``hosted.go`` (a transfer slot: see
   :mod:`meshfl.hosted._flow`; ``chunk_bytes`` when the diff is to go in chunks, each
   ``hosted.put`` -> ``hosted.got``), then ``hosted.diff`` (ticket, trained minus received or the
   count of chunks sent, sample count, metrics) -> ``hosted.ack``. Sending the same diff id again
   is harmless: it is acknowledged again (a chunked one already at ``hosted.push``) and counted once.

A secure cycle (``secure`` in ``hosted.accepted``; :mod:`meshfl.hosted._secure`) adds set-up
before step 3 and a reveal after it; the host parks each request until the cycle's next step:

- ``hosted.setup`` (ticket, a bound on the client's samples) -> ``hosted.roster`` (session,
  members' cards, threshold, mask PRG, the fixed-point encoding);
- ``hosted.key`` (round key, shares sealed to each other member) -> ``hosted.keys`` (the
  members' round keys, the shares sealed to this client);
- the masked vector as the ``hosted.diff`` (one int32 tensor ``masked``, ``samples`` 0);
- ``hosted.reveal`` (metric names) -> ``hosted.survivors`` (survivors, dropped), then
  ``hosted.shares`` (the revealed shares) -> ``hosted.revealed``.
"""

from __future__ import annotations

from .. import protocol  # noqa: F401  (ping and pong, which every peer answers)
from ..wire import declare

declare("hosted.request", required={"model": "str"},
        optional={"capabilities": "dict", "cached": "str", "pull": "bool", "plan": "bool"})
declare("hosted.accepted", required={"model": "str", "ticket": "str", "cycle": "int", "version": "int",
                                     "version_hash": "str", "plan_hash": "str", "training_args": "dict",
                                     "current": "bool", "deadline_in": "float"},
        optional={"secure": "bool", "inline": "bool", "plan_source": "str", "plan_class": "str", "model_args": "dict"},
        tensors=True)  # inline: the version rides along (asked with pull), answered by hosted.pulled
declare("hosted.backoff", required={"model": "str", "retry_in": "float", "reason": "str"})
declare("hosted.pull", required={"model": "str", "version": "int"}, optional={"plan": "bool"})
declare("hosted.model", required={"model": "str", "version": "int", "version_hash": "str", "plan_hash": "str"},
        optional={"plan_source": "str", "plan_class": "str", "model_args": "dict", "layout": "list",
                  "chunk_bytes": "int"}, tensors=True)  # layout: no tensors, fetch the chunks
declare("hosted.pulled", required={"model": "str"})  # one-way: the pulled model arrived
declare("hosted.fetch", required={"model": "str", "version": "int", "index": "int"})
declare("hosted.chunk", required={"model": "str", "version": "int", "index": "int"}, tensors=True)
declare("hosted.push", required={"model": "str", "ticket": "str"}, optional={"diff_id": "str", "layout": "list"})
declare("hosted.go", required={"model": "str"}, optional={"chunk_bytes": "int"})  # chunk_bytes: send in chunks
declare("hosted.put", required={"model": "str", "diff_id": "str", "index": "int"}, tensors=True)
declare("hosted.got", required={"model": "str", "diff_id": "str", "index": "int"})
declare("hosted.diff", required={"model": "str", "ticket": "str", "diff_id": "str", "version": "int",
                                 "samples": "int"}, optional={"metrics": "dict", "chunks": "int"}, tensors=True)
declare("hosted.ack", required={"model": "str", "diff_id": "str", "cycle": "int", "duplicate": "bool"})
declare("hosted.status", optional={"model": "str"})
declare("hosted.info", required={"models": "list"})
# secure cycles
declare("hosted.setup", required={"model": "str", "ticket": "str", "bound": "int"})
declare("hosted.roster", required={"model": "str", "session": "str", "cards": "dict", "threshold": "int",
                                   "prg": "str", "encoding": "dict", "deadline_in": "float"})
declare("hosted.key", required={"model": "str", "session": "str", "public": "str", "shares": "list"}, tensors=True)
declare("hosted.keys", required={"model": "str", "session": "str", "keys": "dict", "shares": "list",
                                 "deadline_in": "float"}, tensors=True)
declare("hosted.reveal", required={"model": "str", "session": "str"}, optional={"metric_names": "list"})
declare("hosted.survivors", required={"model": "str", "session": "str", "survivors": "list", "dropped": "list"})
declare("hosted.shares", required={"model": "str", "session": "str", "b": "dict", "s": "dict"})
declare("hosted.revealed", required={"model": "str", "session": "str"})
