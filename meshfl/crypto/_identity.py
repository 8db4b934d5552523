"""Peer identities: one Ed25519 key per home, plus two certified X25519 keys.

The Ed25519 key is the identity (the peer id is its fingerprint). The X25519 key for CurveZMQ links
("link") and the one for end-to-end NaCl boxes ("box") are generated separately rather than converted
from it, as libsodium advises, and the identity key signs them into a :class:`PeerCard`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from nacl.exceptions import BadSignatureError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from ..errors import CryptoError
from ._z85 import z85_encode

CARD_VERSION = 1
CARD_PREFIX = "meshfl1:"
KEY_DIR = "keys"
SECRET_FILE = "identity.key"
CARD_FILE = "identity.card"
MAX_NAME_BYTES = 64

# A card signature covers this prefix so that it can never be mistaken for any other message the
# identity key signs (overlay headers, seals, round configs).
_CARD_CONTEXT = b"meshfl.card.v1\x00"
_KEY = 32
_SIG = 64
# version | sign_key | link_key | box_key | signature | name (UTF-8, the rest)
_CARD_FIXED = 1 + 3 * _KEY + _SIG


def peer_id_of(sign_key: bytes) -> str:
    """Short, stable fingerprint of an Ed25519 public key: 16 lowercase base32 characters.

    80 bits is plenty to name peers; it is ASCII with a letter-or-digit first byte, so it doubles as
    a ZeroMQ routing id (which must not start with a zero byte).
    """
    if len(sign_key) != _KEY:
        raise CryptoError("an Ed25519 public key is 32 bytes", code="bad_argument")
    digest = hashlib.blake2b(bytes(sign_key), digest_size=10).digest()
    return base64.b32encode(digest).decode("ascii").lower()


def verify_signature(sign_key: bytes, data: bytes, signature: bytes) -> None:
    """Raise CryptoError ``bad_signature`` unless ``signature`` is ``sign_key``'s over ``data``."""
    try:
        VerifyKey(bytes(sign_key)).verify(data, bytes(signature))
    except (BadSignatureError, ValueError, TypeError) as exc:
        raise CryptoError("signature does not verify", code="bad_signature") from exc


def _check_name(name: object, code: str) -> str:
    if not isinstance(name, str) or not name or not name.isprintable():
        raise CryptoError("a peer name is a non-empty printable string", code=code)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise CryptoError(f"a peer name is at most {MAX_NAME_BYTES} UTF-8 bytes", code=code)
    return name


def _card_message(version: int, name: str, sign_key: bytes, link_key: bytes, box_key: bytes) -> bytes:
    raw = name.encode("utf-8")
    return b"".join(
        (_CARD_CONTEXT, bytes([version]), len(raw).to_bytes(1, "big"), raw, sign_key, link_key, box_key)
    )


@dataclass(frozen=True)
class PeerCard:
    """The public half of an identity, exchanged like an SSH public key.

    A PeerCard object always carries a valid certificate: the constructor checks the signature, so
    code holding one never has to remember to.
    """

    name: str
    sign_key: bytes
    link_key: bytes
    box_key: bytes
    signature: bytes
    version: int = CARD_VERSION
    peer_id: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.version != CARD_VERSION:
            raise CryptoError(f"unsupported card version {self.version!r}", code="bad_card")
        _check_name(self.name, "bad_card")
        for attr, size in (("sign_key", _KEY), ("link_key", _KEY), ("box_key", _KEY), ("signature", _SIG)):
            value = getattr(self, attr)
            if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != size:
                raise CryptoError(f"card {attr} must be {size} bytes", code="bad_card")
            object.__setattr__(self, attr, bytes(value))
        verify_signature(
            self.sign_key,
            _card_message(self.version, self.name, self.sign_key, self.link_key, self.box_key),
            self.signature,
        )
        object.__setattr__(self, "peer_id", peer_id_of(self.sign_key))

    @property
    def link_key_z85(self) -> bytes:
        """The CURVE public key as zmq's ``curve_serverkey`` / ZAP credentials expect it."""
        return z85_encode(self.link_key)

    # --- text form: one line a human can paste -------------------------------------------------

    def to_bytes(self) -> bytes:
        return b"".join(
            (bytes([self.version]), self.sign_key, self.link_key, self.box_key, self.signature,
             self.name.encode("utf-8"))
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> "PeerCard":
        raw = bytes(raw)
        if len(raw) <= _CARD_FIXED or raw[0] != CARD_VERSION:
            raise CryptoError("malformed peer card", code="bad_card")
        keys = [raw[1 + i * _KEY : 1 + (i + 1) * _KEY] for i in range(3)]
        signature = raw[1 + 3 * _KEY : _CARD_FIXED]
        try:
            name = raw[_CARD_FIXED:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CryptoError("peer card name is not UTF-8", code="bad_card") from exc
        return cls(name, keys[0], keys[1], keys[2], signature, raw[0])

    def to_text(self) -> str:
        """``meshfl1:`` + unpadded urlsafe base64 of :meth:`to_bytes`."""
        return CARD_PREFIX + base64.urlsafe_b64encode(self.to_bytes()).rstrip(b"=").decode("ascii")

    @classmethod
    def from_text(cls, text: str) -> "PeerCard":
        """Parse and verify; ``bad_card`` if malformed, ``bad_signature`` if forged or altered."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        if not isinstance(text, str):
            raise CryptoError("a peer card is text", code="bad_card")
        text = text.strip()
        if not text.startswith(CARD_PREFIX):
            raise CryptoError(f"a peer card starts with {CARD_PREFIX!r}", code="bad_card")
        body = text[len(CARD_PREFIX) :]
        try:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CryptoError("peer card is not valid base64", code="bad_card") from exc
        return cls.from_bytes(raw)

    # --- dict form: a row in a trust table -----------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "name": self.name,
            "peer_id": self.peer_id,
            "sign_key": self.sign_key.hex(),
            "link_key": self.link_key.hex(),
            "box_key": self.box_key.hex(),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PeerCard":
        """Inverse of :meth:`to_dict`; a stored ``peer_id`` must match the key it claims to name."""
        try:
            card = cls(
                data["name"],
                bytes.fromhex(data["sign_key"]),
                bytes.fromhex(data["link_key"]),
                bytes.fromhex(data["box_key"]),
                bytes.fromhex(data["signature"]),
                data.get("version", CARD_VERSION),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CryptoError("malformed peer card record", code="bad_card") from exc
        if "peer_id" in data and data["peer_id"] != card.peer_id:
            raise CryptoError("peer card record names another peer id", code="bad_card")
        return card

    def __repr__(self) -> str:
        return f"PeerCard(name={self.name!r}, peer_id={self.peer_id!r})"


class Identity:
    """A peer's secret keys. Build with :meth:`create`, :meth:`load`, or :meth:`generate`."""

    _BOX_CACHE_SIZE = 256

    def __init__(self, name: str, signing_key: SigningKey, link_secret: PrivateKey, box_secret: PrivateKey):
        self.name = _check_name(name, "bad_argument")
        self._signing_key = signing_key
        self._link = link_secret
        self._box = box_secret
        sign_key = bytes(signing_key.verify_key)
        link_key, box_key = bytes(link_secret.public_key), bytes(box_secret.public_key)
        signature = signing_key.sign(_card_message(CARD_VERSION, name, sign_key, link_key, box_key)).signature
        self.card = PeerCard(name, sign_key, link_key, box_key, signature)
        self.peer_id = self.card.peer_id
        # Box() costs an X25519 scalar multiplication; keep the ones for recent peers (see _box.py).
        self._boxes: OrderedDict[bytes, Box] = OrderedDict()
        self._boxes_lock = threading.Lock()

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def generate(cls, name: str) -> "Identity":
        """A fresh identity in memory only (tests, in-process meshes)."""
        return cls(name, SigningKey.generate(), PrivateKey.generate(), PrivateKey.generate())

    @classmethod
    def create(cls, home: Path | str, name: str) -> "Identity":
        """Generate and persist a new identity; CryptoError ``exists`` if the home already has one."""
        key_dir = Path(home) / KEY_DIR
        if (key_dir / SECRET_FILE).exists():
            raise CryptoError(f"an identity already exists in {key_dir}", code="exists")
        ident = cls.generate(name)
        key_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(key_dir, 0o700)
        secret = orjson.dumps(
            {
                "meshfl_identity": 1,
                "name": ident.name,
                "sign_seed": bytes(ident._signing_key).hex(),
                "link_secret": ident.link_secret.hex(),
                "box_secret": bytes(ident._box).hex(),
            },
            option=orjson.OPT_INDENT_2,
        )
        _write_atomic(key_dir / SECRET_FILE, secret, 0o600, overwrite=False)
        _write_atomic(key_dir / CARD_FILE, (ident.card.to_text() + "\n").encode("ascii"), 0o644)
        return ident

    @classmethod
    def load(cls, home: Path | str) -> "Identity":
        """Read the identity of a home, refusing a secret file others could read."""
        path = Path(home) / KEY_DIR / SECRET_FILE
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError as exc:
            raise CryptoError(f"no identity in {path.parent}", code="no_identity") from exc
        except OSError as exc:
            raise CryptoError(f"cannot open {path}: {exc}", code="bad_key_file") from exc
        with os.fdopen(fd, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if os.name == "posix" and mode & 0o077:
                raise CryptoError(
                    f"{path} is readable by others (mode {mode & 0o777:o}); run chmod 600 on it",
                    code="insecure_key_file",
                )
            raw = fh.read()
        try:
            doc = orjson.loads(raw)
            if doc.get("meshfl_identity") != 1:
                raise ValueError("unknown identity file version")
            return cls(
                doc["name"],
                SigningKey(bytes.fromhex(doc["sign_seed"])),
                PrivateKey(bytes.fromhex(doc["link_secret"])),
                PrivateKey(bytes.fromhex(doc["box_secret"])),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, CryptoError) as exc:
            raise CryptoError(f"malformed identity file {path}", code="bad_key_file") from exc

    @classmethod
    def load_or_create(cls, home: Path | str, name: str) -> "Identity":
        try:
            return cls.load(home)
        except CryptoError as exc:
            if exc.code != "no_identity":
                raise
        return cls.create(home, name)

    # --- use ----------------------------------------------------------------------------------

    def sign(self, data: bytes) -> bytes:
        """A detached 64-byte Ed25519 signature."""
        return self._signing_key.sign(bytes(data)).signature

    @property
    def link_secret(self) -> bytes:
        return bytes(self._link)

    @property
    def link_public(self) -> bytes:
        return self.card.link_key

    @property
    def link_secret_z85(self) -> bytes:
        """For ``socket.curve_secretkey``."""
        return z85_encode(self.link_secret)

    @property
    def link_public_z85(self) -> bytes:
        """For ``socket.curve_publickey``."""
        return z85_encode(self.link_public)

    @property
    def box_secret(self) -> PrivateKey:
        return self._box

    def _box_with(self, peer_box_key: bytes) -> Box:
        """The NaCl Box between our box key and a peer's, cached (LRU) per peer key."""
        with self._boxes_lock:
            box = self._boxes.get(peer_box_key)
            if box is not None:
                self._boxes.move_to_end(peer_box_key)
                return box
        box = Box(self._box, PublicKey(peer_box_key))
        with self._boxes_lock:
            self._boxes[peer_box_key] = box
            while len(self._boxes) > self._BOX_CACHE_SIZE:
                self._boxes.popitem(last=False)
        return box

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, peer_id={self.peer_id!r})"


def _write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool = True) -> None:
    """Write via a temp file created with ``mode`` (never briefly world-readable), fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 card)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic "create if absent"
            except FileExistsError as exc:
                raise CryptoError(f"{path} already exists", code="exists") from exc
            except OSError:  # file system without hard links
                if path.exists():
                    raise CryptoError(f"{path} already exists", code="exists") from None
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
