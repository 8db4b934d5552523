"""End-to-end sealed messages for the overlay: boxed for the recipient, signed by the sender.

A relay forwarding a sealed message can neither read it (NaCl Box) nor alter it or its header
(Ed25519 signature), and the recipient can show a third party who wrote it (a Box alone cannot:
either party of a Box could have produced it).

Layout of a sealed message::

    signature (64) | nonce (24) | Box ciphertext (16-byte MAC + plaintext length)

The signature is Ed25519 by the sender's identity key over
``BLAKE2b-256(person="meshfl.seal.v1", len(header) as u32 BE || header || nonce || ciphertext)``;
signing a digest keeps Ed25519's two SHA-512 passes off large payloads, and the length prefix keeps
the header/ciphertext boundary unambiguous. The header travels in the clear beside the sealed bytes.
"""

from __future__ import annotations

import hashlib

from nacl.exceptions import CryptoError as NaclCryptoError

from ..errors import CryptoError
from ._identity import Identity, PeerCard, verify_signature

SIGNATURE_BYTES = 64
NONCE_BYTES = 24
MAC_BYTES = 16
SEAL_OVERHEAD = SIGNATURE_BYTES + NONCE_BYTES + MAC_BYTES


def _digest(header: bytes, boxed: memoryview | bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32, person=b"meshfl.seal.v1")
    h.update(len(header).to_bytes(4, "big"))
    h.update(header)
    h.update(boxed)
    return h.digest()


def seal(sender: Identity, recipient: PeerCard, plaintext: bytes, header: bytes = b"") -> bytes:
    """Encrypt ``plaintext`` for ``recipient`` and sign it (with ``header``) as ``sender``."""
    header = bytes(header)
    if len(header) >= 1 << 32:
        raise CryptoError("seal header too long", code="bad_argument")
    boxed = sender._box_with(recipient.box_key).encrypt(bytes(plaintext))  # nonce || ciphertext
    return sender.sign(_digest(header, boxed)) + bytes(boxed)


def open_sealed(recipient: Identity, sender: PeerCard, data: bytes, header: bytes = b"") -> bytes:
    """Check the sender's signature, then decrypt; ``bad_signature`` or ``bad_box`` otherwise."""
    view = memoryview(bytes(data) if not isinstance(data, (bytes, bytearray)) else data)
    if len(view) < SEAL_OVERHEAD:
        raise CryptoError("sealed message too short", code="bad_box")
    signature, boxed = view[:SIGNATURE_BYTES], view[SIGNATURE_BYTES:]
    verify_signature(sender.sign_key, _digest(bytes(header), boxed), bytes(signature))
    box = recipient._box_with(sender.box_key)
    try:
        return box.decrypt(bytes(boxed[NONCE_BYTES:]), bytes(boxed[:NONCE_BYTES]))
    except NaclCryptoError as exc:
        raise CryptoError("sealed message does not decrypt", code="bad_box") from exc
