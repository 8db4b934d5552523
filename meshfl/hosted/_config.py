"""A hosted model's server configuration, checked once when the model is added.

``mode`` is ``"cycle"`` (PyGrid's synchronous cycles) or ``"async"`` (FedBuff). A cycle accepts
up to ``max_clients`` clients and closes as soon as ``goal`` diffs arrived (default: max_clients),
or at its deadline (``cycle_length`` seconds after it opened) if at least ``min_clients`` did;
with fewer it is extended by another ``cycle_length`` and the slots of clients that never sent a
diff are freed. In async mode every ``buffer`` diffs make a new version; a diff computed on
version v arriving at version v+tau weighs ``samples / sqrt(1 + tau)`` and is refused past
``max_staleness``.

With ``secure_aggregation`` (cycle mode only) the host sees only the cycle's masked sum
(:mod:`meshfl.hosted._secure`): between ``min_clients`` (at least 2) and ``max_clients`` (at most
:data:`MAX_SECURE_CLIENTS`) members, each set-up step waiting at most ``setup_timeout`` seconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError

MODES = ("cycle", "async")
MAX_SECURE_CLIENTS = 100  # members of one secure cycle: shares grow as n**2, the host's unmasking as n
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_model_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"a hosted model name is 1-64 letters, digits, '-' or '_', not {name!r}",
                          code="bad_config")
    return name


@dataclass(frozen=True)
class ServerConfig:
    mode: str = "cycle"
    cycle_length: float = 60.0
    min_clients: int = 1
    max_clients: int = 100
    goal: int = 0  # diffs that close a cycle; 0: max_clients
    buffer: int = 10
    max_staleness: int = 10
    aggregator: dict = field(default_factory=lambda: {"name": "fedavg"})
    max_diff_bytes: int = 1 << 30
    keep_versions: int = 20  # model versions kept as tensors (their history is kept forever)
    secure_aggregation: bool = False
    setup_timeout: float = 10.0  # secure cycles: the longest wait for the roster, the keys and the reveals

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}", code="bad_config")
        if not _number(self.cycle_length) or self.cycle_length <= 0:
            raise ConfigError("cycle_length must be a number of seconds > 0", code="bad_config")
        object.__setattr__(self, "cycle_length", float(self.cycle_length))
        for name, low in (("min_clients", 1), ("max_clients", 1), ("goal", 0), ("buffer", 1),
                          ("max_staleness", 0), ("max_diff_bytes", 1), ("keep_versions", 1)):
            value = getattr(self, name)
            if not _int(value) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}", code="bad_config")
        if self.min_clients > self.max_clients:
            raise ConfigError("min_clients must not exceed max_clients", code="bad_config")
        if self.goal > self.max_clients:
            raise ConfigError("goal must not exceed max_clients", code="bad_config")
        if not isinstance(self.secure_aggregation, bool):
            raise ConfigError("secure_aggregation must be true or false", code="bad_config")
        if not _number(self.setup_timeout) or self.setup_timeout <= 0:
            raise ConfigError("setup_timeout must be a number of seconds > 0", code="bad_config")
        object.__setattr__(self, "setup_timeout", float(self.setup_timeout))
        if self.secure_aggregation:
            self._check_secure()
        from ..aggregate import make_aggregator

        agg = make_aggregator(self.aggregator)
        if not agg.streaming:
            raise ConfigError(f"aggregator {agg.name!r} keeps every update; a host needs a streaming one",
                              code="bad_config")

    def _check_secure(self) -> None:
        if self.mode == "async":
            # FedBuff's secure buffers need a trusted aggregator enclave (Nguyen et al. §5); a
            # masked sum needs a fixed set of members, which an async buffer never has.
            raise ConfigError("secure aggregation is not available in async mode: a buffer has no fixed set of "
                              "members to mask among (use mode cycle)", code="secagg_async")
        if self.max_clients > MAX_SECURE_CLIENTS:
            raise ConfigError(f"a secure cycle has at most {MAX_SECURE_CLIENTS} clients (every member seals a share "
                              f"to every other: n**2 shares), not max_clients {self.max_clients}",
                              code="secagg_limit")
        if self.min_clients < 2:
            raise ConfigError("a secure cycle needs min_clients >= 2: one client's sum is its own update",
                              code="secagg_limit")
        if self.goal:
            raise ConfigError("a secure cycle closes when every member pushed (or at its deadline): no goal",
                              code="bad_config")

    @property
    def close_at(self) -> int:
        """Diffs that make a new version at once."""
        if self.mode == "async":
            return self.buffer
        return self.goal or self.max_clients

    @classmethod
    def from_dict(cls, data: dict | None) -> "ServerConfig":
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown server setting(s): {', '.join(unknown)}", code="bad_config")
        if isinstance(data.get("aggregator"), str):
            data["aggregator"] = {"name": data["aggregator"]}
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"server config: {exc}", code="bad_config") from None

    def to_dict(self) -> dict:
        return asdict(self)


def staleness_weight(tau: int) -> float:
    """FedBuff's default discount of a diff ``tau`` versions old."""
    return 1.0 / math.sqrt(1.0 + tau)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
