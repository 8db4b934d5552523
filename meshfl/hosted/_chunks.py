"""Hosted transfers larger than one chunk, cut as node results are (:func:`meshfl.protocol.chunk_plan`).

A model or diff of at most one chunk travels inline, in one message (one round trip). A larger one
goes chunk by chunk, each chunk one request answered by one reply, with :data:`~meshfl.protocol.WINDOW`
requests in flight (the credit idea of result pulls), so no message is ever larger than a chunk
and neither end buffers more than a window per transfer:

* pull: ``hosted.model`` announces the version's ``layout`` and ``chunk_bytes``; the client asks
  ``hosted.fetch`` for each chunk index and copies each ``hosted.chunk`` into place;
* push: ``hosted.push`` declares the diff's ``layout`` (checked against the model before a byte
  moves); ``hosted.go`` with ``chunk_bytes`` asks for chunks: ``hosted.put`` each (answered
  ``hosted.got``), then ``hosted.diff`` with ``chunks`` and no tensors. The host writes each chunk
  straight into an :class:`Upload` buffer (one per transfer slot, reused) and checks the whole
  diff only when it is complete.

Every chunk is written at its own place, so a duplicated or replayed one changes nothing, a
chunk of another diff is refused, and a lost one shows as a timeout (the client pushes again).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..errors import HostedError, WireError
from ..protocol import WINDOW, chunk_plan, layout_of
from ..wire import DTYPES, Message, check_layout

#: Send a request now; the returned callable waits for its reply (raising its error).
Request = Callable[[Message], Callable[[], Message]]
Send = Callable[[Message], object]


def windowed(msgs: Iterable[Message], request: Request, window: int = WINDOW) -> Iterator[Message]:
    """The replies to ``msgs``, in order, with up to ``window`` requests in flight. If one fails,
    those still in flight are given up (a waiter's ``cancel``, where it has one)."""
    waiting: deque = deque()
    try:
        for msg in msgs:
            waiting.append(request(msg))
            if len(waiting) >= window:
                yield waiting.popleft()()
        while waiting:
            yield waiting.popleft()()
    finally:
        for wait in waiting:
            getattr(wait, "cancel", lambda: None)()


def buffers(layout: list) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, dtype=DTYPES[dtype]) for name, dtype, shape, _ in layout}


def place(out: Mapping[str, torch.Tensor], chunk: tuple[str, int, int], data: torch.Tensor | None) -> None:
    """Copy one chunk's data to its place in ``out``; a chunk of the wrong size or dtype is refused."""
    name, start, count = chunk
    target = out[name].view(-1)
    if data is None or data.dtype != target.dtype or data.numel() != count:
        raise HostedError(f"a chunk of {name!r} does not fit its place ({count} {target.dtype})", code="bad_chunk")
    target[start : start + count].copy_(data.reshape(-1))


# ---------------------------------------------------------------------------------------- clients
def pull(request: Request, send: Send, model: str, version: int, plan: bool,
         max_bytes: int) -> tuple[dict, Mapping]:
    """``hosted.pull`` and, for a model larger than a chunk, its chunks: (fields, tensors). A model
    announced larger than ``max_bytes`` is refused. The transfer slot is given back
    (``hosted.pulled``) whether or not it all arrived."""
    reply = request(Message("hosted.pull", {"model": model, "version": version, "plan": plan}))()
    try:
        f = reply.fields
        if f.get("layout") is None:
            return f, reply.tensors
        layout = f["layout"]
        try:
            total = sum(nbytes for _, _, nbytes in check_layout(layout).values())
        except WireError as exc:
            raise HostedError(f"the host announced a bad layout: {exc.message}", code="bad_chunk") from None
        if total > max_bytes or (f.get("chunk_bytes") or 0) <= 0:
            raise HostedError(f"the host announced a model of {total} bytes (at most {max_bytes} here)",
                              code="oversize")
        chunks = chunk_plan(layout, int(f["chunk_bytes"]))
        out = buffers(layout)
        asks = (Message("hosted.fetch", {"model": model, "version": f["version"], "index": i})
                for i in range(len(chunks)))
        for i, got in enumerate(windowed(asks, request)):
            if (got.fields.get("index"), got.fields.get("version")) != (i, f["version"]):
                raise HostedError(f"chunk {got.fields.get('index')} came for chunk {i}", code="bad_chunk")
            place(out, chunks[i], got.tensors.get("data"))
        return f, out
    finally:
        send(Message("hosted.pulled", {"model": model}))


def push(request: Request, fields: dict, diff: Mapping[str, torch.Tensor]) -> Message:
    """``hosted.push`` -> ``hosted.go``, the diff inline or in chunks, then its ``hosted.ack`` (at
    once when the host already counted this diff id)."""
    layout = layout_of(diff)
    go = request(Message("hosted.push", {"model": fields["model"], "ticket": fields["ticket"],
                                         "diff_id": fields["diff_id"], "layout": layout}))()
    if go.type == "hosted.ack":
        return go
    chunk_bytes = go.fields.get("chunk_bytes")
    if not chunk_bytes:
        return request(Message("hosted.diff", fields, diff))()
    chunks = chunk_plan(layout, int(chunk_bytes))
    flat = {k: t.detach().cpu().contiguous().reshape(-1) for k, t in diff.items()}
    puts = (Message("hosted.put", {"model": fields["model"], "diff_id": fields["diff_id"], "index": i},
                    {"data": flat[name][start : start + count]}) for i, (name, start, count) in enumerate(chunks))
    for _ in windowed(puts, request):
        pass
    return request(Message("hosted.diff", {**fields, "chunks": len(chunks)}))()


#: Codes of a chunked push that did not get through whole (its slot timed out, the host restarted):
#: pushing again may succeed.
RETRY_CODES = frozenset({"no_upload", "incomplete_diff"})


# ---------------------------------------------------------------------------------------- host
class Upload:
    """One client's chunked diff, written into ``buffer`` as its chunks arrive."""

    def __init__(self, model: str, diff_id: str, buffer: dict[str, torch.Tensor], chunks: list) -> None:
        self.model = model
        self.diff_id = diff_id
        self.buffer = buffer
        self.chunks = chunks
        self.received: set[int] = set()

    def put(self, index: int, data: torch.Tensor | None) -> None:
        if not 0 <= index < len(self.chunks):
            raise HostedError(f"this diff has no chunk {index}", code="bad_chunk")
        place(self.buffer, self.chunks[index], data)
        self.received.add(index)

    def complete(self, count: int) -> bool:
        return count == len(self.chunks) and len(self.received) == len(self.chunks)


__all__ = ["RETRY_CODES", "Upload", "pull", "push", "windowed"]
