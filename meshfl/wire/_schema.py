"""Message types, declared once and checked on receipt.

A type names its required and optional control fields (with their Python types) and whether it
may carry tensors. Layers register the types they speak when imported: the transport its own
(hello, heartbeat, error), the node and researcher theirs. Receiving an undeclared type, a
missing or mistyped field, or a field nobody declared is a :class:`~meshfl.errors.WireError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import WireError

# Field kinds a message may declare. ``float`` accepts ints; ``int`` refuses bools (orjson decodes
# ``true`` as bool, which Python would otherwise pass as an int).
_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
    "any": (object,),
}


@dataclass(frozen=True)
class MessageType:
    name: str
    required: Mapping[str, str] = field(default_factory=dict)
    optional: Mapping[str, str] = field(default_factory=dict)
    tensors: bool = False

    def check(self, fields: Any, n_tensors: int) -> None:
        if not isinstance(fields, dict):
            raise WireError(f"{self.name}: fields must be an object", code="bad_envelope")
        for name, kind in self.required.items():
            if name not in fields:
                raise WireError(f"{self.name}: missing field {name!r}", code="missing_field")
            _check_kind(self.name, name, kind, fields[name])
        for name, value in fields.items():
            if name in self.required:
                continue
            kind = self.optional.get(name)
            if kind is None:
                raise WireError(f"{self.name}: unexpected field {name!r}", code="bad_field")
            if value is not None:
                _check_kind(self.name, name, kind, value)
        if n_tensors and not self.tensors:
            raise WireError(f"{self.name} carries no tensors, got {n_tensors}", code="too_many_frames")


def _check_kind(type_name: str, name: str, kind: str, value: Any) -> None:
    ok = isinstance(value, _KINDS[kind])
    if ok and kind in ("int", "float") and isinstance(value, bool):
        ok = False
    if not ok:
        raise WireError(
            f"{type_name}: field {name!r} must be {kind}, got {type(value).__name__}", code="bad_field"
        )


_REGISTRY: dict[str, MessageType] = {}


def declare(
    name: str,
    *,
    required: Mapping[str, str] | None = None,
    optional: Mapping[str, str] | None = None,
    tensors: bool = False,
) -> MessageType:
    """Declare a message type. Declaring the same name twice with another shape is a bug."""
    for kind in list((required or {}).values()) + list((optional or {}).values()):
        if kind not in _KINDS:
            raise ValueError(f"unknown field kind {kind!r}")
    mtype = MessageType(name, dict(required or {}), dict(optional or {}), tensors)
    existing = _REGISTRY.get(name)
    if existing is not None and existing != mtype:
        raise ValueError(f"message type {name!r} already declared differently")
    _REGISTRY[name] = mtype
    return mtype


def lookup(name: str) -> MessageType:
    mtype = _REGISTRY.get(name)
    if mtype is None:
        raise WireError(f"unknown message type {name!r}", code="unknown_type")
    return mtype


# The one type every layer understands: an error reply.
declare("error", required={"code": "str", "message": "str"}, optional={"details": "dict"})
