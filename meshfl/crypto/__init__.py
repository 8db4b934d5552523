"""Cryptography for meshfl: identities, peer cards, sealed messages, Shamir shares, mask PRG.

Knows nothing of nodes, networks or training; everything here is a pure function of its inputs
(plus the key files of an :class:`Identity`). Errors are :class:`meshfl.errors.CryptoError` with a
``code``.
"""

from ._box import SEAL_OVERHEAD, open_sealed, seal
from ._identity import CARD_PREFIX, Identity, PeerCard, peer_id_of, verify_signature
from ._prg import CHUNK_BYTES, AegisChunks, DEFAULT_PRG, PRG_ALGORITHMS, SEED_BYTES, derive_seed, prg_uint32
from ._shamir import shamir_combine, shamir_split
from ._z85 import z85_decode, z85_encode

__all__ = [
    "CARD_PREFIX",
    "AegisChunks",
    "CHUNK_BYTES",
    "DEFAULT_PRG",
    "Identity",
    "PRG_ALGORITHMS",
    "PeerCard",
    "SEAL_OVERHEAD",
    "SEED_BYTES",
    "derive_seed",
    "open_sealed",
    "peer_id_of",
    "prg_uint32",
    "seal",
    "shamir_combine",
    "shamir_split",
    "verify_signature",
    "z85_decode",
    "z85_encode",
]
