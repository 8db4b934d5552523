"""LAN discovery with pinned keys: mDNS/DNS-SD through the optional ``zeroconf`` package (``[lan]``).

A researcher (or any peer that listens) announces the service ``_meshfl._tcp.local.``: its
endpoint, its peer id (the fingerprint of its identity key) and its whole signed card, split
over TXT strings (one holds at most 255 bytes). Discovery verifies each card and compares it
with the keys this home pinned: an announcement under a trusted name with another key is
flagged, never trusted. Trusting a discovered peer needs the fingerprint its operator reads out
over another channel (``meshfl peer id`` on that host) - mDNS itself is unauthenticated.
The endpoint is not signed: a forged one only makes the CURVE handshake fail, as the link
is keyed by the pinned card.

The pure part (records, fingerprints, pins) is separate from the two zeroconf calls,
:func:`announce` and :func:`discover`.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit

from .._extras import require
from ..crypto import PeerCard
from ..errors import MeshflError

SERVICE = "_meshfl._tcp.local."
RECORD_VERSION = "1"
CHUNK = 200  # characters of the card per TXT string (each string is at most 255 bytes)
_FINGERPRINT = re.compile(r"^[a-z2-7]{16}$")  # a peer id: 16 base32 characters (80 bits)


class LanError(MeshflError):
    code = "lan"


@dataclass(frozen=True)
class Announcement:
    """One peer seen on the LAN; ``card`` is None (and ``error`` says why) when its card does
    not verify or does not match the peer id it announces."""

    name: str
    role: str
    peer_id: str
    endpoint: str | None
    card: PeerCard | None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "peer_id": self.peer_id, "endpoint": self.endpoint,
                "card": self.card.to_text() if self.card else None, "error": self.error}


# ----------------------------------------------------------------------------- records (pure)
def encode(card: PeerCard, role: str, endpoint: str | None) -> dict[str, str]:
    """The TXT properties announcing ``card``; ``endpoint`` None: the record's address and port."""
    text = card.to_text()
    props = {"v": RECORD_VERSION, "name": card.name, "role": role, "id": card.peer_id}
    if endpoint:
        props["endpoint"] = endpoint
    for i in range(0, len(text), CHUNK):
        props[f"c{i // CHUNK}"] = text[i:i + CHUNK]
    return props


def decode(props: dict, addresses: list[str], port: int | None) -> Announcement:
    """An announcement from a record's TXT properties, addresses and port, its card verified."""
    p = {_text(k): _text(v) for k, v in props.items()}
    name, role, peer_id = p.get("name", "?"), p.get("role", "?"), p.get("id", "")
    endpoint = p.get("endpoint") or (f"tcp://{_host(addresses[0])}:{port}" if addresses and port else None)
    chunks, i = [], 0
    while f"c{i}" in p:
        chunks.append(p[f"c{i}"])
        i += 1
    card, error = None, None
    if p.get("v") != RECORD_VERSION:
        error = f"record version {p.get('v')!r}, this meshfl reads {RECORD_VERSION}"
    else:
        try:
            card = PeerCard.from_text("".join(chunks))
            if card.peer_id != peer_id:
                card, error = None, f"its card is of peer {card.peer_id}, not {peer_id}"
            elif card.name != name:
                card, error = None, f"its card names {card.name!r}, not {name!r}"
        except MeshflError as exc:
            error = f"its card does not verify ({exc.message})"
    return Announcement(name, role, peer_id, endpoint, card, error)


def fingerprint(text: str) -> str:
    """A fingerprint as an operator may type it (any case, spaces, dashes or colons), normalised
    to the peer id it must equal; ``bad_fingerprint`` if it cannot be one."""
    fp = re.sub(r"[\s:-]", "", str(text)).lower()
    if not _FINGERPRINT.match(fp):
        raise LanError("a fingerprint is the peer's id, 16 characters a-z 2-7, as `meshfl peer id` prints it "
                       "on the peer's host", code="bad_fingerprint")
    return fp


def pin_status(ann: Announcement, trusted: Iterable[dict]) -> tuple[str, str | None]:
    """How ``ann`` stands with this home's pinned keys: ``trusted`` (its key is pinned), ``new``,
    ``key_changed`` (a peer of that name is pinned with another key) or ``invalid``; and the
    warning to show, if any."""
    if ann.card is None:
        return "invalid", f"WARNING: {ann.name} ({ann.peer_id or '?'}) announces no valid card: {ann.error}"
    trusted = list(trusted)
    if any(entry["peer_id"] == ann.peer_id for entry in trusted):
        return "trusted", None
    for entry in trusted:
        if entry["name"] == ann.name:
            return "key_changed", (f"WARNING: {ann.name} announces key {ann.peer_id}, but this home pinned "
                                   f"{entry['peer_id']} for that name: not trusted (ask its operator; "
                                   f"`meshfl peer revoke {ann.name}` first if the key really changed)")
    return "new", None


def choose(seen: Iterable[Announcement], name: str, confirmed: str) -> Announcement:
    """The announcement of ``name`` whose key has the fingerprint the operator ``confirmed``;
    else ``not_discovered`` (no valid one of that name) or ``fingerprint_mismatch``."""
    fp = fingerprint(confirmed)
    candidates = [a for a in seen if a.name == name and a.card is not None]
    if not candidates:
        raise LanError(f"no peer named {name!r} announced a valid card on the LAN (see `meshfl peer discover`)",
                       code="not_discovered", details={"name": name})
    for ann in candidates:
        if ann.peer_id == fp:
            return ann
    raise LanError(f"the fingerprint you confirmed ({fp}) is not that of the key {name} announces "
                   f"({', '.join(sorted({a.peer_id for a in candidates}))}): not trusted",
                   code="fingerprint_mismatch", details={"name": name, "announced": [a.peer_id for a in candidates]})


def announced_endpoint(listen: str | None, endpoint: str | None = None) -> tuple[str | None, str | None, int]:
    """(endpoint to put in the record or None, host address or None, port) from a listen address
    (``tcp://0.0.0.0:5555`` announces the record's own addresses) or an explicit ``endpoint``."""
    given = endpoint or listen
    if not given or not given.startswith("tcp://"):
        raise LanError(f"LAN discovery announces a tcp:// endpoint; this peer listens on {given!r} "
                       f"(give --endpoint tcp://HOST:PORT)", code="bad_endpoint")
    parts = urlsplit(given)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not port:
        raise LanError(f"{given} names no port to announce (give --endpoint tcp://HOST:PORT)", code="bad_endpoint")
    host = parts.hostname or ""
    if host in ("", "*", "0.0.0.0", "::"):
        return None, None, port
    return given, host, port


# ----------------------------------------------------------------------------- zeroconf
class Announcer:
    """An mDNS announcement, withdrawn by :meth:`close` (use it as a context manager)."""

    def __init__(self, card: PeerCard, role: str, listen: str | None, *, endpoint: str | None = None,
                 interfaces: list[str] | None = None) -> None:
        zeroconf = require("zeroconf", "lan")
        record_endpoint, host, port = announced_endpoint(listen, endpoint)
        addresses = _addresses(zeroconf, host, interfaces)
        self._zc = zeroconf.Zeroconf(interfaces=interfaces or zeroconf.InterfaceChoice.All)
        self.info = zeroconf.ServiceInfo(
            SERVICE, f"meshfl-{card.peer_id}.{SERVICE}", port=port, server=f"meshfl-{card.peer_id}.local.",
            addresses=[socket.inet_aton(a) for a in addresses], properties=encode(card, role, record_endpoint))
        try:
            self._zc.register_service(self.info)
        except zeroconf.NonUniqueNameException:
            self._zc.close()
            raise LanError(f"{card.name} ({card.peer_id}) is announced on this LAN already (another "
                           f"`meshfl peer announce` of this home?)", code="already_announced") from None
        except BaseException:
            self._zc.close()
            raise
        self.endpoint = record_endpoint or f"tcp://{addresses[0]}:{port}"

    def close(self) -> None:
        try:
            self._zc.unregister_service(self.info)
        finally:
            self._zc.close()

    def __enter__(self) -> "Announcer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def announce(home, *, endpoint: str | None = None, interfaces: list[str] | None = None) -> Announcer:
    """Announce ``home``'s peer (its card, and its listen address or ``endpoint``) on the LAN."""
    return Announcer(home.identity.card, home.config.role, home.config.listen, endpoint=endpoint,
                     interfaces=interfaces)


def discover(timeout: float, *, interfaces: list[str] | None = None,
             until: Callable[[list[Announcement]], bool] | None = None) -> list[Announcement]:
    """The peers announcing themselves within ``timeout`` seconds (sooner once ``until`` of those
    seen so far is true), one per peer id, in the order seen."""
    zeroconf = require("zeroconf", "lan")
    seen: dict[str, Announcement] = {}
    changed = threading.Condition()

    class Listener:
        def add_service(self, zc, type_: str, name: str) -> None:
            info = zc.get_service_info(type_, name, timeout=3000)
            if info is None:
                return
            ann = decode(info.properties or {}, info.parsed_addresses(), info.port)
            with changed:
                seen[name] = ann
                changed.notify_all()

        update_service = add_service

        def remove_service(self, zc, type_: str, name: str) -> None:
            pass  # what was seen within the window stays listed

    zc = zeroconf.Zeroconf(interfaces=interfaces or zeroconf.InterfaceChoice.All)
    try:
        browser = zeroconf.ServiceBrowser(zc, SERVICE, Listener())
        deadline = time.monotonic() + timeout
        with changed:
            while (left := deadline - time.monotonic()) > 0 and not (until and until(list(seen.values()))):
                changed.wait(left)
            found = list(seen.values())
        browser.cancel()
    finally:
        zc.close()
    return found


def _addresses(zeroconf, host: str | None, interfaces: list[str] | None) -> list[str]:
    """IPv4 addresses for the record: the listen host's, else the chosen interfaces', else all but loopback."""
    if host is not None:
        try:
            return [socket.gethostbyname(host)]
        except OSError:
            raise LanError(f"cannot resolve {host} to announce it", code="bad_endpoint") from None
    if interfaces:
        return list(interfaces)
    found = [a for a in zeroconf.get_all_addresses() if not a.startswith("127.")]
    if not found:
        raise LanError("this host has no LAN address to announce (give --endpoint)", code="bad_endpoint")
    return found


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
