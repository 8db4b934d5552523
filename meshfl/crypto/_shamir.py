"""Shamir t-of-n secret sharing over GF(2**521 - 1), for recovering dropped secagg nodes.

A secret of up to 64 bytes is encoded as the field element ``len(secret) * 2**512 + int(secret)``
(so leading zero bytes survive) and hidden as the constant term of a random polynomial of degree
t - 1. Share ``i`` (1..n) is ``(i, bytes([t]) + P(i) as 66 big-endian bytes)``.

Any t shares give the secret. Fewer than t carry no information about it (information-theoretic);
:func:`shamir_combine` refuses them with CryptoError ``not_enough_shares`` since each share records
t. Extra shares beyond t are checked against the polynomial, so one corrupted share among more than t
is detected (``bad_shares``) rather than silently producing a wrong secret.
"""

from __future__ import annotations

import secrets

from ..errors import CryptoError

PRIME = (1 << 521) - 1
MAX_SECRET_BYTES = 64
MAX_SHARES = 254
_Y_BYTES = 66  # ceil(521 / 8)


def shamir_split(secret: bytes, n: int, t: int) -> list[tuple[int, bytes]]:
    """Split ``secret`` into ``n`` shares of which any ``t`` recover it."""
    secret = bytes(secret)
    if len(secret) > MAX_SECRET_BYTES:
        raise CryptoError(f"a shared secret is at most {MAX_SECRET_BYTES} bytes", code="bad_argument")
    if not (isinstance(n, int) and isinstance(t, int) and 1 <= t <= n <= MAX_SHARES):
        raise CryptoError(f"need 1 <= t <= n <= {MAX_SHARES}, got t={t!r} n={n!r}", code="bad_argument")
    value = (len(secret) << 512) | int.from_bytes(secret, "big")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, bytes([t]) + y.to_bytes(_Y_BYTES, "big")))
    return shares


def shamir_combine(shares) -> bytes:
    """Recover the secret from at least t distinct shares (any order)."""
    points: dict[int, int] = {}
    threshold = None
    for share in shares:
        try:
            x, raw = share
            raw = bytes(raw)
        except (TypeError, ValueError) as exc:
            raise CryptoError("a share is (index, bytes)", code="bad_shares") from exc
        if not isinstance(x, int) or not 1 <= x <= MAX_SHARES or len(raw) != 1 + _Y_BYTES:
            raise CryptoError(f"malformed share {x!r}", code="bad_shares")
        t, y = raw[0], int.from_bytes(raw[1:], "big")
        if threshold is None:
            threshold = t
        if t != threshold or not 1 <= t <= MAX_SHARES or y >= PRIME:
            raise CryptoError("shares come from different splits or are corrupt", code="bad_shares")
        if points.setdefault(x, y) != y:
            raise CryptoError(f"two different shares with index {x}", code="bad_shares")
    if threshold is None or len(points) < threshold:
        raise CryptoError(
            f"need {threshold} shares, got {len(points)}", code="not_enough_shares",
            details={"need": threshold, "got": len(points)},
        )
    items = sorted(points.items())
    basis, extra = items[:threshold], items[threshold:]
    for x, y in extra:
        if _interpolate(basis, x) != y:
            raise CryptoError(f"share {x} is inconsistent with the others", code="bad_shares")
    value = _interpolate(basis, 0)
    length, body = value >> 512, value & ((1 << 512) - 1)
    if length > MAX_SECRET_BYTES or body >> (8 * length):
        raise CryptoError("shares do not decode to a secret", code="bad_shares")
    return body.to_bytes(length, "big")


def _interpolate(points: list[tuple[int, int]], at: int) -> int:
    """Lagrange interpolation through ``points``, evaluated at ``at`` (mod PRIME)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total
