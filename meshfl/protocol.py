"""The researcher <-> node message types, declared once for both sides (see docs/protocol.md).

Training is a durable exchange rather than one long request:

1. researcher -> node ``train`` (plan source, training args, global model tensors);
   node -> ``train.accepted`` once the task is committed to its queue (or an error reply:
   plan not approved, unknown dataset, ...). Resending the same ``task_id`` is harmless.
2. node -> researcher ``train.done`` when the task ended, kept in the node's outbox and re-sent
   after every reconnect or restart until the researcher answers ``result.ack``. A small result
   rides inline; a large one is announced with its ``layout`` and pulled in chunks.
3. researcher -> node ``result.pull`` (chunk range): the node answers with that many
   ``result.chunk`` messages. The researcher asks for a window of chunks at a time, so neither
   ZeroMQ nor the researcher ever buffers more than a window per node (credit flow control).

With secure aggregation, ``secagg.setup`` comes just before ``train`` (whose ``secagg`` field
names the session) and ``secagg.keys`` (the members' round keys, and the shares sealed to
this node) follows once every node has answered the set-up, so the key exchange runs while the
model travels and trains; a node waits for the keys only to mask its result, which is one masked
vector. ``secagg.unmask`` follows the round's last result and acknowledges the node's result.
"""

from __future__ import annotations

from .wire import declare

declare("ping")
declare("pong", required={"name": "str", "peer_id": "str", "role": "str", "version": "str"}, optional={"dev": "bool"})
declare("datasets.search", optional={"tags": "list"})
declare("datasets.list", required={"datasets": "list"})
declare("plan.status", required={"hash": "str"})
declare("plan.submit", required={"source": "str"}, optional={"name": "str", "description": "str"})
declare("plan.info", required={"hash": "str", "status": "str"})
declare(
    "train",
    required={
        "task_id": "str",
        "experiment": "str",
        "round": "int",
        "plan_source": "str",
        "plan_class": "str",
        "dataset_tags": "list",
        "training_args": "dict",
        "model_args": "dict",
    },
    optional={"secagg": "dict", "dp": "dict", "preprocess": "list"},
    tensors=True,
)
declare("train.accepted", required={"task_id": "str", "state": "str"})
declare(
    "train.done",
    required={"task_id": "str", "experiment": "str", "round": "int", "ok": "bool"},
    optional={
        "samples": "int",
        "metrics": "dict",
        "error": "dict",
        "layout": "list",
        "chunk_bytes": "int",
        "inline": "bool",
        "duration": "float",
        "metric_names": "list",
        "privacy": "dict",  # a DP task's cost, debited from its dataset's budget when it was released
        "device": "str",  # where it trained: "cpu" or "cuda"
    },
    tensors=True,
)
declare("result.pull", required={"task_id": "str", "first": "int", "count": "int"})
declare("result.chunk", required={"task_id": "str", "index": "int"}, tensors=True)
declare("result.ack", required={"task_id": "str"})
declare("task.cancel", required={"experiment": "str"})
declare("task.cancelled", required={"count": "int"})

# Secure aggregation (meshfl/secagg, docs/security.md): set-up before ``train``, unmasking after.
declare("secagg.setup", required={"session": "str", "participants": "list", "threshold": "int", "prg": "str"})
# The nodes' sealed shares ride along in bulk (overlay.bundle): headers in ``shares``, sealed
# bytes as tensors ``share.i``; the researcher passes each node those addressed to it.
declare("secagg.key", required={"session": "str", "public": "str"},
        optional={"shares": "list"}, tensors=True)
declare("secagg.keys", required={"session": "str", "keys": "dict"},  # one-way; {} calls the round off
        optional={"shares": "list"}, tensors=True)
declare("secagg.unmask", required={"session": "str", "survivors": "list", "dropped": "list"},
        optional={"ack": "str"})  # the task id of the node's result it acknowledges
declare("secagg.shares", required={"session": "str", "b": "dict", "s": "dict"})

# Federated analytics (meshfl/analytics): a query's sufficient statistics, one durable task per node.
declare("analytics", required={"task_id": "str", "analysis": "str", "purpose": "str", "dataset_tags": "list",
                               "query": "dict"}, optional={"secagg": "dict"})
declare("analytics.accepted", required={"task_id": "str", "state": "str"})
declare(
    "analytics.done",
    required={"task_id": "str", "analysis": "str", "ok": "bool"},
    optional={"error": "dict", "rows": "int", "levels": "list", "exact_extremes": "bool", "suppressed": "int",
              "duration": "float", "inline": "bool"},
    tensors=True,
)

#: Results up to this size travel inside ``train.done``; larger ones are pulled in chunks.
INLINE_RESULT_BYTES = 4 << 20
#: Size of one pulled chunk (one frame: libzmq moves 1 MB frames fastest here).
CHUNK_BYTES = 1 << 20
#: Chunks in flight per stream: the credit a sender gets at a time (results, hosted transfers).
WINDOW = 16


def layout_of(tensors) -> list:
    """``[[name, dtype, shape, nbytes], ...]``: what a receiver needs to cut tensors into chunks."""
    from .wire import DTYPE_NAMES

    return [[name, DTYPE_NAMES[t.dtype], list(t.shape), t.numel() * t.element_size()] for name, t in tensors.items()]


def chunk_plan(layout: list, chunk_bytes: int) -> list[tuple[str, int, int]]:
    """Cut a result ``layout`` ([[name, dtype, shape, nbytes], ...]) into (name, start, count)
    element ranges of at most ``chunk_bytes``; both sides compute the same list."""
    from math import prod

    from .wire import DTYPES

    chunks = []
    for name, dtype, shape, _ in layout:
        itemsize = DTYPES[dtype].itemsize
        n = prod(shape)
        step = max(1, chunk_bytes // itemsize)
        if n == 0:
            chunks.append((name, 0, 0))
        for start in range(0, n, step):
            chunks.append((name, start, min(step, n - start)))
    return chunks
