"""Signed documents: a directory entry (a node's dataset) and an access request (a researcher's).

A document travels as ``{"body": TEXT, "sig": HEX}``: ``body`` is canonical JSON (orjson, sorted
keys) and ``sig`` the author's Ed25519 signature over a context prefix plus those exact bytes, so
verifying never depends on re-encoding. The body carries the author's peer card, itself
self-signed; :func:`verify` checks both signatures and that the card is the author the body names.
The directory stores documents as they came: it can withhold one, never forge or alter one.
"""

from __future__ import annotations

import os
import time

import orjson

from ..crypto import Identity, PeerCard, verify_signature
from ..errors import CryptoError

ENTRY = "meshfl.directory.entry"
REQUEST = "meshfl.access.request"
_AUTHOR = {ENTRY: "node", REQUEST: "researcher"}
MAX_DOCUMENT_BYTES = 64 << 10

#: What a published entry says of a dataset: never its path, never its data.
ENTRY_FIELDS = ("tags", "description", "format", "samples", "shape", "columns")


def _context(kind: str) -> bytes:
    return kind.encode("ascii") + b".v1\x00"  # never mistaken for anything else the key signs


def sign(identity: Identity, kind: str, fields: dict) -> dict:
    """A signed document of ``kind`` by ``identity`` holding ``fields``."""
    body = {**fields, "type": kind, "v": 1, _AUTHOR[kind]: identity.peer_id, "card": identity.card.to_text()}
    text = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return {"body": text.decode("utf-8"), "sig": identity.sign(_context(kind) + text).hex()}


def verify(document: object, kind: str) -> dict:
    """The body of a genuine ``kind`` document with its author's ``PeerCard`` under ``"card"``;
    CryptoError ``bad_document`` (malformed) or ``bad_signature`` (forged or altered)."""
    if not isinstance(document, dict) or not isinstance(document.get("body"), str) \
            or not isinstance(document.get("sig"), str):
        raise CryptoError("a signed document is {body, sig}", code="bad_document")
    text = document["body"].encode("utf-8")
    if len(text) > MAX_DOCUMENT_BYTES:
        raise CryptoError("signed document too large", code="bad_document")
    try:
        body = orjson.loads(text)
        signature = bytes.fromhex(document["sig"])
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise CryptoError("malformed signed document", code="bad_document") from exc
    if not isinstance(body, dict) or body.get("type") != kind or body.get("v") != 1:
        raise CryptoError(f"not a {kind} document", code="bad_document")
    card = PeerCard.from_text(body.get("card", ""))  # checks the card's own signature
    if body.get(_AUTHOR[kind]) != card.peer_id:
        raise CryptoError("the document's card is not its author's", code="bad_document")
    verify_signature(card.sign_key, _context(kind) + text, signature)
    return {**body, "card": card}


def entry_for(identity: Identity, record: dict, published: float) -> dict:
    """The signed directory entry of a node's dataset ``record`` (the registry's), published
    since ``published`` (so the same record always signs to the same entry)."""
    fields = {key: record.get(key) for key in ENTRY_FIELDS}
    return sign(identity, ENTRY, {"dataset": record["name"], "published": published, **fields})


def request_for(identity: Identity, node: str, dataset: str, endpoint: str, message: str = "") -> dict:
    """A researcher's signed request for access to ``dataset`` on ``node``, dialed at ``endpoint``."""
    return sign(identity, REQUEST, {"id": os.urandom(8).hex(), "node": node, "dataset": dataset,
                                    "endpoint": endpoint, "message": message, "created": time.time()})
