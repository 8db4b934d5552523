"""A peer's home folder: its configuration, identity keys, LMDB store and trusted peers.

Layout (the folder is mode 0700)::

    home/config.toml        settings, written once by ``meshfl init`` as a commented template
    home/keys/              identity.key (0600) and identity.card, see meshfl.crypto.Identity
    home/store/             the LMDB environment (tables, task queue, outbox, audit chain)

Trust lives in the store (table ``trust``) so that adding or revoking a peer is one committed,
audited write, like an SSH ``known_hosts`` file with a history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .crypto import Identity, PeerCard
from .errors import ConfigError, CryptoError
from .store import AuditLog, Store

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
STORE_DIR = "store"
KEYS_DIR = "keys"
ROLES = ("node", "researcher", "directory")
TRUST_TABLE = "trust"


@dataclass(frozen=True)
class Config:
    """The settings of a home; every value is checked on construction."""

    role: str
    name: str
    listen: str | None = None
    dev: bool = False
    minimum_samples: int = 10
    allow_cuda: bool = True
    task_timeout: float = 3600.0
    force_secure_aggregation: bool = False
    sandbox: bool = True
    plan_memory_mb: int = 0
    plan_cpu_seconds: float = 0.0
    sandbox_read_paths: tuple = ()
    analytics: bool = True
    analytics_max_bins: int = 10000
    heartbeat: float = 1.0
    dead_after: float = 10.0

    def sandbox_settings(self) -> dict | None:
        """What the training worker confines itself with (``meshfl.node._sandbox``); None: nothing."""
        if not self.sandbox:
            return None
        memory = self.plan_memory_mb or max(2048, (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) >> 21)
        return {"network": True, "audit_hook": True, "memory_mb": memory,
                "cpu_seconds": self.plan_cpu_seconds or self.task_timeout,
                "read_paths": list(self.sandbox_read_paths)}

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}",
                              code="bad_config")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("name must be a non-empty string", code="bad_config")
        if self.listen is not None:
            check_endpoint(self.listen)
        for field in ("dev", "allow_cuda", "force_secure_aggregation", "sandbox", "analytics"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"{field} must be true or false", code="bad_config")
        if not _is_int(self.minimum_samples) or self.minimum_samples < 0:
            raise ConfigError("minimum_samples must be an integer >= 0", code="bad_config")
        if not _is_int(self.plan_memory_mb) or self.plan_memory_mb < 0:
            raise ConfigError("plan_memory_mb must be an integer >= 0 (0: half this machine's memory)",
                              code="bad_config")
        if not _is_int(self.analytics_max_bins) or self.analytics_max_bins < 1:
            raise ConfigError("analytics_max_bins must be an integer >= 1", code="bad_config")
        if not _is_number(self.plan_cpu_seconds) or self.plan_cpu_seconds < 0:
            raise ConfigError("plan_cpu_seconds must be a number >= 0 (0: task_timeout)", code="bad_config")
        paths = self.sandbox_read_paths
        if isinstance(paths, str) or not all(isinstance(p, str) and os.path.isabs(p) for p in paths):
            raise ConfigError("sandbox_read_paths must be a list of absolute paths", code="bad_config")
        object.__setattr__(self, "sandbox_read_paths", tuple(paths))
        object.__setattr__(self, "plan_cpu_seconds", float(self.plan_cpu_seconds))
        for field in ("task_timeout", "heartbeat", "dead_after"):
            value = getattr(self, field)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"{field} must be a number of seconds > 0", code="bad_config")
            object.__setattr__(self, field, float(value))
        if self.dead_after <= self.heartbeat:
            raise ConfigError("dead_after must be longer than heartbeat", code="bad_config")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) in {source}: {', '.join(unknown)}",
                              code="bad_config")
        missing = [name for name in ("role", "name") if name not in data]
        if missing:
            raise ConfigError(f"{source} lacks {', '.join(missing)}", code="bad_config")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc.message}", code=exc.code) from None

    @classmethod
    def load(cls, path: Path) -> "Config":
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}", code="bad_config") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}", code="bad_config") from None
        return cls.from_dict(data, str(path))

    def to_toml(self) -> str:
        """The commented template ``meshfl init`` writes; parses back to this Config."""
        listen = (f"listen = {_toml(self.listen)}" if self.listen is not None
                  else '# listen = "tcp://0.0.0.0:5555"')
        return _TEMPLATE.format(
            role=_toml(self.role), name=_toml(self.name), listen=listen,
            **{f.name: _toml(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("role", "name", "listen")},
        )


_TEMPLATE = """\
# meshfl home configuration, written by `meshfl init`. It is read when the peer starts:
# restart the node or researcher after editing. Delete a setting to get its default.

# What this peer is: "node" (keeps data, trains on it), "researcher" (runs experiments) or
# "directory" (lists datasets that nodes publish, relays access requests; sees no data).
role = {role}
# A name for humans. Peers are identified by their key (see `meshfl peer id`), not by name.
name = {name}
# Address this peer accepts connections on, e.g. "tcp://0.0.0.0:5555". A researcher needs
# one, so does a directory; a node usually has none, because it dials out to its researchers.
{listen}

# --- node settings (a researcher ignores these) ---
# Development mode: run ANY training plan without the operator's approval. Never enable it on
# a node that holds real data.
dev = {dev}
# Datasets with fewer samples than this are never offered to researchers.
minimum_samples = {minimum_samples}
# Train on a CUDA GPU when this machine has one.
allow_cuda = {allow_cuda}
# Seconds a training task may run before it is stopped and reported failed.
task_timeout = {task_timeout}
# Refuse training rounds that do not use secure aggregation.
force_secure_aggregation = {force_secure_aggregation}
# Confine plans (docs/security.md): no network, a memory and a CPU-time cap, files limited to
# the task's dataset and scratch folder. Turn off only to debug a plan on synthetic data.
sandbox = {sandbox}
# Memory cap of the training worker in MiB (0: half of this machine's memory).
plan_memory_mb = {plan_memory_mb}
# CPU seconds a task may use (0: as many as task_timeout allows).
plan_cpu_seconds = {plan_cpu_seconds}
# Folders plans may also read (absolute paths), e.g. ["/srv/models"] for pretrained weights.
sandbox_read_paths = {sandbox_read_paths}
# Answer federated analytics and preprocessing statistics (datasets' policies can refuse them too).
analytics = {analytics}
# The most histogram bins one analytics query may ask for.
analytics_max_bins = {analytics_max_bins}

# --- links (both roles) ---
# Seconds between liveness messages to connected peers.
heartbeat = {heartbeat}
# Seconds of silence after which a peer is considered gone.
dead_after = {dead_after}
"""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, tuple, list)):
        return json.dumps(value if isinstance(value, str) else list(value))  # valid TOML too
    return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_endpoint(endpoint: Any) -> str:
    if not isinstance(endpoint, str) or "://" not in endpoint or endpoint.startswith("://"):
        raise ConfigError(f"an endpoint looks like tcp://host:port or ipc:///path, "
                          f"not {endpoint!r}", code="bad_endpoint")
    return endpoint


class Home:
    """An open home folder. Build it with :meth:`init` (new) or :meth:`open` (existing)."""

    def __init__(self, path: Path, config: Config, identity: Identity):
        """Private: use :meth:`init` or :meth:`open`. Opens the store."""
        self.path = path
        self.config = config
        self.identity = identity
        self.store = Store(path / STORE_DIR)
        self.audit = AuditLog(self.store, "audit")
        self._trust = self.store.table(TRUST_TABLE)

    @classmethod
    def init(cls, path: str | os.PathLike, role: str, name: str, listen: str | None = None,
             **config_overrides: Any) -> "Home":
        """Create a new home: folder (0700), config.toml, identity keys and store."""
        path = Path(path).expanduser().absolute()
        config = Config.from_dict({"role": role, "name": name, "listen": listen,
                                   **config_overrides})
        if (path / CONFIG_FILE).exists() or (path / KEYS_DIR).exists():
            raise ConfigError(f"{path} is already a meshfl home", code="exists",
                              details={"home": str(path)})
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        try:
            identity = Identity.create(path, name)
        except CryptoError as exc:
            raise ConfigError(f"cannot create keys in {path}: {exc.message}", code=exc.code) from None
        # config.toml last: its presence is what marks a finished home.
        tmp = path / f".{CONFIG_FILE}.tmp"
        tmp.write_text(config.to_toml(), encoding="utf-8")
        os.replace(tmp, path / CONFIG_FILE)
        home = cls(path, config, identity)
        home.audit.append("home.init", role=role, name=name, peer_id=identity.peer_id)
        log.info("created %s home %s (peer id %s)", role, path, identity.peer_id)
        return home

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Home":
        """Open an existing home; ConfigError ``no_home`` when there is none at `path`."""
        path = Path(path).expanduser().absolute()
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(
                f"no meshfl home at {path}; create one with "
                f"`meshfl init --home {path} --role node --name NAME`, "
                f"or point --home (or MESHFL_HOME) at an existing one",
                code="no_home", details={"home": str(path)},
            )
        config = Config.load(path / CONFIG_FILE)
        try:
            identity = Identity.load(path)
        except CryptoError as exc:
            raise ConfigError(f"home {path}: {exc.message}", code=exc.code) from None
        return cls(path, config, identity)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Home":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Home {str(self.path)!r} {self.config.role} {self.identity.peer_id}>"

    # --- trust ---------------------------------------------------------------------------------

    def trust(self, card: PeerCard, endpoint: str | None = None, name: str | None = None,
              directory: bool = False) -> dict:
        """Trust `card` (again, to change its name or endpoint); names are unique per home.

        ``directory``: the peer is a dataset directory (meshfl.directory), never a node or
        researcher: a node publishes to it and serves it nothing, a researcher searches it."""
        if card.peer_id == self.identity.peer_id:
            raise ConfigError("a peer does not need to trust its own key", code="self_trust")
        if endpoint is not None:
            check_endpoint(endpoint)
        name = (name or card.name).strip()
        for other in self.trusted():
            if other["name"] == name and other["peer_id"] != card.peer_id:
                raise ConfigError(f"the name {name!r} is already used by peer "
                                  f"{other['peer_id']}; choose another --name",
                                  code="name_taken")
        row = {"name": name, "card": card.to_text(), "endpoint": endpoint}
        if directory:
            row["directory"] = True
        self._trust.put(card.peer_id, row)
        self.audit.append("peer.trust", peer_id=card.peer_id, name=name, endpoint=endpoint,
                          **({"directory": True} if directory else {}))
        log.info("trusting peer %s (%s)", card.peer_id, name)
        return {"peer_id": card.peer_id, "name": name, "card": card, "endpoint": endpoint,
                "directory": directory}

    def revoke(self, peer_id_or_name: str) -> bool:
        """Stop trusting a peer given by id or name; False when no trusted peer matches."""
        for entry in self.trusted():
            if peer_id_or_name in (entry["peer_id"], entry["name"]):
                self._trust.delete(entry["peer_id"])
                self.audit.append("peer.revoke", peer_id=entry["peer_id"], name=entry["name"])
                log.info("revoked trust in peer %s (%s)", entry["peer_id"], entry["name"])
                return True
        return False

    def trusted(self) -> list[dict]:
        """Trusted peers, each ``{"peer_id", "name", "card": PeerCard, "endpoint", "directory"}``."""
        out = []
        for peer_id, row in self._trust.items():
            card = PeerCard.from_text(row["card"])  # verifies the signature again
            if card.peer_id != peer_id:
                raise ConfigError(f"trust record {peer_id} holds another peer's card",
                                  code="bad_trust")
            out.append({"peer_id": peer_id, "name": row["name"], "card": card,
                        "endpoint": row.get("endpoint"), "directory": bool(row.get("directory"))})
        return out

    def directories(self) -> list[dict]:
        """The trusted peers that are dataset directories (see :meth:`trust`)."""
        return [entry for entry in self.trusted() if entry["directory"]]

    def find_trusted(self, peer_id_or_name: str) -> dict | None:
        """The trusted peer with this id or name, or None."""
        for entry in self.trusted():
            if peer_id_or_name in (entry["peer_id"], entry["name"]):
                return entry
        return None

    def trust_into(self, peer: Any) -> list[dict]:
        """Give a running transport peer the trusted peers it lacks (a node dials a researcher
        approved while it runs); returns those entries. Revocations still need a restart."""
        added = []
        for entry in self.trusted():
            if entry["peer_id"] not in peer.trust_table:
                peer.trust(entry["card"], entry["endpoint"])
                added.append(entry)
        return added
