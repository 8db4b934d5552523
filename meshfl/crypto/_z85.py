"""Z85 (ZeroMQ RFC 32), the text form CurveZMQ wants for its 32-byte keys.

Kept here, a dozen lines, so that ``meshfl.crypto`` does not import ``zmq``.
"""

from __future__ import annotations

from ..errors import CryptoError

_ALPHABET = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}


def z85_encode(data: bytes) -> bytes:
    """Encode bytes whose length is a multiple of 4 (5 characters per 4 bytes)."""
    if len(data) % 4:
        raise CryptoError("z85 input length must be a multiple of 4", code="bad_argument")
    out = bytearray()
    for i in range(0, len(data), 4):
        value = int.from_bytes(data[i : i + 4], "big")
        chunk = bytearray(5)
        for j in range(4, -1, -1):
            value, chunk[j] = divmod(value, 85)
            chunk[j] = _ALPHABET[chunk[j]]
        out += chunk
    return bytes(out)


def z85_decode(text: bytes | str) -> bytes:
    """Inverse of :func:`z85_encode`; CryptoError ``bad_argument`` on malformed text."""
    if isinstance(text, str):
        text = text.encode("ascii", "replace")
    if len(text) % 5:
        raise CryptoError("z85 text length must be a multiple of 5", code="bad_argument")
    out = bytearray()
    for i in range(0, len(text), 5):
        value = 0
        for c in text[i : i + 5]:
            if c not in _INDEX:
                raise CryptoError("invalid z85 character", code="bad_argument")
            value = value * 85 + _INDEX[c]
        if value >= 1 << 32:
            raise CryptoError("z85 group out of range", code="bad_argument")
        out += value.to_bytes(4, "big")
    return bytes(out)
