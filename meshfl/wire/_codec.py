"""Envelope + raw tensor frames: the one way a meshfl message goes on the wire.

A message is the ZeroMQ multipart ``[envelope, frame_1, ..., frame_n]``. The envelope is orjson and
describes every tensor (name, dtype, shape, byte length); the frames are the tensors' raw bytes,
each tensor cut into frames of at most ``frame_bytes`` (a few MB: libzmq moves 1 MB frames ~3x
faster than one huge one, which costs fresh-page faults, and ~4x faster again under CURVE).

Sending copies no tensor byte: frames are memoryviews over the tensors' own storage. Receiving
copies none either: a tensor that fits in one frame is a ``torch.frombuffer`` view over it, and
one cut into several frames is gathered only when a caller asks for it whole (:class:`TensorMap`;
its pieces can be read, aggregated or relayed without that copy). Every length is checked against
the envelope before anything is allocated, and nothing is ever unpickled.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import orjson
import torch

from ..errors import WireError
from ._schema import lookup

PROTOCOL_VERSION = 1
DEFAULT_FRAME_BYTES = 1 << 20

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Limits:
    """Bounds applied to every received message before anything is allocated."""

    max_envelope_bytes: int = 1 << 20
    max_message_bytes: int = 8 << 30
    max_frame_bytes: int = 64 << 20
    max_frames: int = 1 << 16
    max_tensors: int = 1 << 14
    max_ndim: int = 16


DEFAULT_LIMITS = Limits()


def new_id() -> str:
    """A random 64-bit message id (hex): unique enough per peer, cheap to make."""
    return os.urandom(8).hex()


@dataclass
class Message:
    """A control message with optional named tensors.

    ``sender`` is filled in by the transport from the authenticated link on receipt; what the
    envelope claims is checked against it, never trusted on its own.
    """

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    reply_to: str | None = None
    sender: str | None = None

    def reply(self, type: str, fields: dict | None = None, tensors: Mapping | None = None) -> "Message":
        """A message answering this one."""
        return Message(type, fields or {}, tensors or {}, reply_to=self.id)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat memoryview, copying only if it is not already contiguous CPU."""
    t = tensor.detach()
    if t.numel() == 0:  # torch cannot view an empty tensor's (stride 0) storage as bytes
        return memoryview(b"")
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    # uint8 view: numpy has no bfloat16, and 0-d tensors cannot be viewed as bytes directly.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def encode(msg: Message, frame_bytes: int = DEFAULT_FRAME_BYTES) -> list:
    """Message -> list of frames (bytes envelope, then memoryviews), ready for ``copy=False``.

    ``frame_bytes`` must be a multiple of 8, so no element of any dtype straddles two frames.
    """
    if frame_bytes <= 0 or frame_bytes % 8:
        raise ValueError(f"frame_bytes must be a positive multiple of 8, not {frame_bytes}")
    descriptors = []
    frames: list = []
    received = msg.tensors if isinstance(msg.tensors, TensorMap) else None
    for name in msg.tensors:
        forwarded = received.frames_of(name, frame_bytes) if received is not None else None
        if forwarded is not None:  # relay a received tensor frame by frame, without gathering it
            dtype, shape, nbytes = received.spec(name)
            descriptors.append([name, DTYPE_NAMES[dtype], list(shape), nbytes])
            frames.extend(forwarded)
            continue
        tensor = msg.tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise WireError(f"tensor {name!r} is a {type(tensor).__name__}", code="bad_dtype")
        dtype = DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise WireError(f"tensor {name!r} has unsupported dtype {tensor.dtype}", code="bad_dtype")
        raw = _raw_bytes(tensor)
        descriptors.append([name, dtype, list(tensor.shape), raw.nbytes])
        if raw.nbytes <= frame_bytes:
            frames.append(raw)
        else:
            frames.extend(raw[i : i + frame_bytes] for i in range(0, raw.nbytes, frame_bytes))
    envelope = {
        "v": PROTOCOL_VERSION,
        "type": msg.type,
        "id": msg.id,
        "re": msg.reply_to,
        "src": msg.sender,
        "f": msg.fields,
        "b": descriptors,
        "fb": frame_bytes,
    }
    try:
        head = orjson.dumps(envelope)
    except TypeError as exc:
        raise WireError(f"{msg.type}: fields are not serialisable: {exc}", code="bad_field") from exc
    return [head, *frames]


def check_layout(layout: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """A tensor layout from the wire (``[[name, dtype, shape, nbytes], ...]``, as an envelope
    describes its tensors), checked the same way: name -> (dtype, shape, nbytes)."""
    if not isinstance(layout, list) or len(layout) > limits.max_tensors:
        raise WireError("a layout is a list of at most max_tensors descriptors", code="bad_envelope")
    out = {}
    for d in layout:
        name, dtype, shape, nbytes = _check_descriptor(d, limits)
        if name in out:
            raise WireError(f"tensor {name!r} is described twice", code="bad_envelope")
        out[name] = (dtype, shape, nbytes)
    return out


def peek_id(envelope: bytes | memoryview) -> str | None:
    """Best-effort message id of a possibly malformed envelope, to address an error reply."""
    try:
        value = orjson.loads(envelope)
    except orjson.JSONDecodeError:
        return None
    mid = value.get("id") if isinstance(value, dict) else None
    return mid if isinstance(mid, str) and len(mid) <= 64 else None


def _check_descriptor(d: Any, limits: Limits) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    if not (isinstance(d, list) and len(d) == 4):
        raise WireError("tensor descriptor must be [name, dtype, shape, nbytes]", code="bad_envelope")
    name, dtype_name, shape, nbytes = d
    if not isinstance(name, str):
        raise WireError("tensor name must be a string", code="bad_envelope")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise WireError(f"tensor {name!r}: unsupported dtype {dtype_name!r}", code="bad_dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_ndim
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise WireError(f"tensor {name!r}: bad shape {shape!r}", code="bad_shape")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool):
        raise WireError(f"tensor {name!r}: byte length must be an integer", code="bad_length")
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise WireError(
            f"tensor {name!r}: {nbytes} bytes declared, dtype x shape needs {expected}", code="bad_length"
        )
    return name, dtype, tuple(shape), nbytes


class TensorMap(Mapping[str, torch.Tensor]):
    """Received tensors, read-only mapping. No byte is copied until a caller needs one tensor.

    A tensor that came in one frame is a view over it. One cut into several frames is gathered
    into fresh memory on first access (and cached); :meth:`pieces` walks its frames without any
    copy, and :func:`encode` forwards ungathered tensors frame by frame, so relaying or
    aggregating a received model costs no copy at all.
    """

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...], int, list[memoryview]]], frame_bytes: int):
        self._specs = specs
        self._frame_bytes = frame_bytes
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._cache.get(name)
        if tensor is None:
            dtype, shape, nbytes, parts = self._specs[name]
            tensor = self._cache[name] = _gather(parts, dtype, shape, nbytes)
        return tensor

    def __iter__(self):
        return iter(self._specs)

    def __contains__(self, name: object) -> bool:  # Mapping's default would gather the tensor
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        dtype, shape, nbytes, _ = self._specs[name]
        return dtype, shape, nbytes

    def pieces(self, name: str):
        """Yield ``(first_element, 1-D view)`` for each frame of a tensor: zero-copy access."""
        dtype, shape, nbytes, parts = self._specs[name]
        if name in self._cache or len(parts) <= 1:
            yield 0, self[name].reshape(-1)
            return
        start = 0
        for part in parts:
            view = torch.frombuffer(part, dtype=dtype)
            yield start, view
            start += view.numel()

    def frames_of(self, name: str, frame_bytes: int) -> list | None:
        """The received frames of an ungathered tensor, if they fit ``frame_bytes`` framing."""
        if name in self._cache or frame_bytes != self._frame_bytes:
            return None
        return self._specs[name][3]


def _gather(parts: Sequence[memoryview], dtype: torch.dtype, shape: tuple, nbytes: int) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if len(parts) == 1:
        return torch.frombuffer(parts[0], dtype=dtype).reshape(shape)
    # numpy.empty madvises huge pages for big buffers: faster first touch than torch.empty here.
    out = np.empty(nbytes, dtype=np.uint8)
    pos = 0
    for part in parts:
        chunk = np.frombuffer(part, dtype=np.uint8)
        out[pos : pos + chunk.size] = chunk
        pos += chunk.size
    return torch.from_numpy(out).view(dtype).reshape(shape)


def _buffer(frame: Any) -> memoryview:
    """A zmq.Frame or bytes-like as a memoryview (zmq.Frame exposes ``.buffer``)."""
    buf = getattr(frame, "buffer", frame)
    return buf if isinstance(buf, memoryview) else memoryview(buf)


def decode(frames: Sequence, limits: Limits = DEFAULT_LIMITS) -> Message:
    """List of frames -> validated :class:`Message`. Raises :class:`WireError` with a code."""
    if not frames:
        raise WireError("empty message", code="bad_envelope")
    if len(frames) - 1 > limits.max_frames:
        raise WireError(f"{len(frames) - 1} frames exceed the limit of {limits.max_frames}", code="too_many_frames")
    head = _buffer(frames[0])
    if head.nbytes > limits.max_envelope_bytes:
        raise WireError(f"envelope of {head.nbytes} bytes exceeds {limits.max_envelope_bytes}", code="oversize")
    try:
        env = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"envelope is not valid JSON: {exc}", code="bad_envelope") from None
    if not isinstance(env, dict):
        raise WireError("envelope must be a JSON object", code="bad_envelope")
    if env.get("v") != PROTOCOL_VERSION:
        raise WireError(f"protocol version {env.get('v')!r} is not {PROTOCOL_VERSION}", code="bad_version")
    mtype, mid, reply_to, src = env.get("type"), env.get("id"), env.get("re"), env.get("src")
    if not isinstance(mtype, str):
        raise WireError("message type must be a string", code="bad_envelope")
    if not isinstance(mid, str) or not 0 < len(mid) <= 64:
        raise WireError("message id must be a string of 1-64 characters", code="bad_envelope")
    if reply_to is not None and not (isinstance(reply_to, str) and len(reply_to) <= 64):
        raise WireError("reply-to must be a message id", code="bad_envelope")
    if src is not None and not isinstance(src, str):
        raise WireError("sender must be a string", code="bad_envelope")
    descriptors, frame_bytes = env.get("b", []), env.get("fb")
    if not isinstance(descriptors, list) or len(descriptors) > limits.max_tensors:
        raise WireError("tensor list missing or too long", code="too_many_frames")
    if descriptors and not (
        isinstance(frame_bytes, int) and 0 < frame_bytes <= limits.max_frame_bytes and frame_bytes % 8 == 0
    ):
        raise WireError(f"frame size {frame_bytes!r} must be a multiple of 8 within limits", code="bad_envelope")
    lookup(mtype).check(env.get("f", {}), len(descriptors))

    checked = [_check_descriptor(d, limits) for d in descriptors]
    total = sum(c[3] for c in checked)
    if total > limits.max_message_bytes:
        raise WireError(f"{total} tensor bytes exceed the limit of {limits.max_message_bytes}", code="oversize")
    needed = sum(max(1, -(-c[3] // frame_bytes)) for c in checked)
    if needed != len(frames) - 1:
        raise WireError(f"envelope describes {needed} frames, message has {len(frames) - 1}", code="too_many_frames")

    specs: dict[str, tuple] = {}
    pos = 1
    for name, dtype, shape, nbytes in checked:
        count = max(1, -(-nbytes // frame_bytes))
        parts = [_buffer(f) for f in frames[pos : pos + count]]
        for i, part in enumerate(parts):
            want = min(frame_bytes, nbytes - i * frame_bytes)
            if part.nbytes != want:
                raise WireError(f"tensor {name!r}: frame of {part.nbytes} bytes, expected {want}", code="bad_length")
        if name in specs:
            raise WireError(f"tensor {name!r} appears twice", code="bad_envelope")
        specs[name] = (dtype, shape, nbytes, parts)
        pos += count
    tensors = TensorMap(specs, frame_bytes or DEFAULT_FRAME_BYTES)
    return Message(mtype, env.get("f", {}), tensors, id=mid, reply_to=reply_to, sender=src)


def error_message(code: str, message: str, reply_to: str | None, details: Mapping | None = None) -> Message:
    fields: dict[str, Any] = {"code": code, "message": message}
    if details:
        fields["details"] = dict(details)
    return Message("error", fields, reply_to=reply_to)
