"""Mask keystreams for secure aggregation, and the seeds they grow from.

Mask generation, not the network, is the cost of secure aggregation, so the keystream is written
straight into a preallocated numpy array through cffi (no Python ``bytes`` copies, GIL released).

Keystream (algorithm ``"aegis128l"``, the default; ~17 GB/s here): the output is cut into chunks
of :data:`CHUNK_BYTES`; chunk ``i`` is AEGIS-128L encryption of zeros under key = the seed's first
16 bytes and nonce = :data:`_NONCE_PREFIX` (8 bytes) || ``i`` as u64 little-endian, with its tag
dropped. AEGIS is an AEAD, so its ciphertext under a unique (key, nonce) is indistinguishable from
random: a PRG. A 128-bit key is the usual security level of a mask PRG (SecAgg's AES-128 in
counter mode); AEGIS-128L makes it 1.7x faster than AEGIS-256 here, and masking is most of a
secure round's extra cost.
``"chacha20"`` (~2 GB/s) is libsodium's ``randombytes_buf_deterministic`` for libsodium builds
without AEGIS (< 1.0.19, i.e. PyNaCl < 1.6). Both ends of a mask must use the same algorithm, so a
protocol should name it rather than rely on what each peer happens to have.

Words are the keystream read as little-endian uint32 (the native order of every platform meshfl
targets).
"""

from __future__ import annotations

import hashlib

import nacl.bindings  # noqa: F401  (runs sodium_init(): picks the AES-NI/AVX code paths; without
#                       it AEGIS falls back to portable code ~300x slower, same output)
import numpy as np
from nacl._sodium import ffi, lib

from ..errors import CryptoError

SEED_BYTES = 32
CHUNK_BYTES = 256 * 1024  # part of the keystream definition: changing it changes every mask
_NONCE_PREFIX = hashlib.blake2b(b"meshfl prg aegis128l v1", digest_size=8).digest()
_KEY_BYTES = 16

_HAS_AEGIS = hasattr(lib, "crypto_aead_aegis128l_encrypt")
PRG_ALGORITHMS: tuple[str, ...] = (("aegis128l",) if _HAS_AEGIS else ()) + ("chacha20",)
DEFAULT_PRG = PRG_ALGORITHMS[0]

if _HAS_AEGIS:
    _TAG_BYTES = lib.crypto_aead_aegis128l_abytes()
    _ZEROS = ffi.new("unsigned char[]", CHUNK_BYTES)  # read-only after creation: thread-safe


def derive_seed(shared_secret: bytes, context: bytes) -> bytes:
    """A full 256-bit mask seed: BLAKE2b-256 keyed by ``shared_secret`` over ``context``.

    ``context`` should name everything the mask is for (round id, the two peer ids, purpose), so one
    agreement never yields the same keystream twice. Never fold a seed to 32 bits (Flower's mistake:
    a 2**32 search then recovers the mask).
    """
    shared_secret = bytes(shared_secret)
    if not 16 <= len(shared_secret) <= 64:
        raise CryptoError("a shared secret for derive_seed is 16..64 bytes", code="bad_argument")
    return hashlib.blake2b(bytes(context), digest_size=SEED_BYTES, key=shared_secret,
                           person=b"meshfl.seed.v1").digest()


def prg_uint32(seed: bytes, n: int, *, out: np.ndarray | None = None,
               algorithm: str | None = None) -> np.ndarray:
    """Expand a 32-byte seed into ``n`` pseudorandom uint32 words (deterministic per seed).

    ``out``: an optional C-contiguous uint32 array of ``n`` words to fill in place (e.g. a reused
    mask buffer); otherwise a new array is returned. :class:`AegisChunks` makes the same AEGIS
    keystream one chunk at a time, for walking a long vector block by block.
    """
    seed = bytes(seed)
    if len(seed) != SEED_BYTES:
        raise CryptoError(f"a PRG seed is {SEED_BYTES} bytes", code="bad_argument")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise CryptoError("n must be a non-negative integer", code="bad_argument")
    algorithm = algorithm or DEFAULT_PRG
    if algorithm not in PRG_ALGORITHMS:
        raise CryptoError(f"PRG {algorithm!r} unavailable here (have {PRG_ALGORITHMS})", code="unsupported")
    n = int(n)
    if out is None:
        out = np.empty(n, dtype=np.uint32)
    elif out.dtype != np.uint32 or out.size != n or not out.flags.c_contiguous or not out.flags.writeable:
        raise CryptoError("out must be a writable C-contiguous uint32 array of n words", code="bad_argument")
    if n == 0:
        return out
    if algorithm == "chacha20":
        lib.randombytes_buf_deterministic(ffi.from_buffer("unsigned char[]", out, require_writable=True), 4 * n, seed)
        return out
    stream, raw = AegisChunks(), out.view(np.uint8)
    for index, start in enumerate(range(0, raw.size, CHUNK_BYTES)):
        block = raw[start : start + CHUNK_BYTES]
        block[:] = stream.chunk(seed, index, block.size)
    return out


class AegisChunks:
    """The AEGIS keystream one chunk at a time, into one reusable buffer with room for the AEAD's
    32-byte tag after the chunk: mask code walks a long vector chunk by chunk, for many seeds,
    and uses each chunk where it lies. The one implementation of the keystream
    (:func:`prg_uint32` copies its chunks out)."""

    def __init__(self) -> None:
        if not _HAS_AEGIS:
            raise CryptoError("this libsodium has no AEGIS-128L (PyNaCl >= 1.6 has)", code="unsupported")
        self._buf = np.empty(CHUNK_BYTES + _TAG_BYTES, dtype=np.uint8)
        self._ptr = ffi.from_buffer("unsigned char[]", self._buf, require_writable=True)

    def chunk(self, seed: bytes, index: int, nbytes: int = CHUNK_BYTES) -> np.ndarray:
        """The first ``nbytes`` of keystream chunk ``index`` for ``seed`` (a view, valid until the
        next call): the same bytes as ``prg_uint32(seed, ...)`` at that chunk."""
        if len(seed) != SEED_BYTES or not 0 < nbytes <= CHUNK_BYTES:
            raise CryptoError(f"a {SEED_BYTES}-byte seed and 1..{CHUNK_BYTES} bytes", code="bad_argument")
        nonce = _NONCE_PREFIX + index.to_bytes(8, "little")
        lib.crypto_aead_aegis128l_encrypt(self._ptr, ffi.NULL, _ZEROS, nbytes, ffi.NULL, 0, ffi.NULL, nonce,
                                          seed[:_KEY_BYTES])
        return self._buf[:nbytes]
