"""Wire format: orjson envelope + zero-copy tensor frames, and declared message types."""

from ._codec import (
    DEFAULT_FRAME_BYTES,
    DEFAULT_LIMITS,
    DTYPE_NAMES,
    DTYPES,
    PROTOCOL_VERSION,
    Limits,
    Message,
    TensorMap,
    check_layout,
    decode,
    encode,
    error_message,
    new_id,
    peek_id,
)
from ._schema import MessageType, declare, lookup

__all__ = [
    "DEFAULT_FRAME_BYTES",
    "DEFAULT_LIMITS",
    "DTYPE_NAMES",
    "DTYPES",
    "PROTOCOL_VERSION",
    "Limits",
    "Message",
    "TensorMap",
    "MessageType",
    "check_layout",
    "decode",
    "declare",
    "encode",
    "error_message",
    "lookup",
    "new_id",
    "peek_id",
]
