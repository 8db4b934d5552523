"""Training-plan approval: a node runs a plan's code only if the operator approved its hash.

Plans travel as source text. Their identity is the SHA-256 of a canonical form of that text, so
a plan re-sent with other line endings or trailing spaces needs no new approval, while any real
change to the code does. Records live in table ``plans`` (hash -> record) and every decision is
appended to the audit chain.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import re
import shlex
import time
from dataclasses import dataclass

from ..errors import PlanError
from ..store import AuditLog, Store

log = logging.getLogger(__name__)

TABLE = "plans"
PENDING, APPROVED, REJECTED, UNKNOWN = "pending", "approved", "rejected", "unknown"
STATUSES = (PENDING, APPROVED, REJECTED)
MIN_PREFIX = 8
MAX_SOURCE_BYTES = 1 << 20
_HEX = re.compile(r"[0-9a-f]+")
_TOP_CLASS = re.compile(r"^class\s+([A-Za-z_]\w*)", re.MULTILINE)


def canonical_source(source: str) -> str:
    """`source` with "\\n" line endings, no trailing whitespace on any line and no trailing blank
    lines (ending with one "\\n"). Nothing else changes, so any real code change changes the hash."""
    lines = [line.rstrip() for line in source.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


@functools.lru_cache(maxsize=64)  # every request of a round carries the same source
def plan_hash(source: str) -> str:
    return hashlib.sha256(canonical_source(source).encode("utf-8")).hexdigest()


def plan_classes(source: str) -> set[str]:
    """The names of the classes a plan's source defines at top level (read, never run)."""
    return set(_TOP_CLASS.findall(source))


def review_commands(digest: str, home: str | None = None) -> str:
    """The operator's commands to review and approve plan `digest`, for messages and logs."""
    at = f" --home {shlex.quote(str(home))}" if home else ""
    return (f"`meshfl plan show {digest} --diff{at}` shows what changed, "
            f"`meshfl plan approve {digest}{at}` approves it")


@dataclass(frozen=True)
class PlanDiff:
    """What a plan changes against the last approved plan with the same name or class."""

    hash: str
    base: dict | None  # that approved plan's record without its source; None: there is none
    lines: list[str]  # a unified diff, base -> plan (empty without a base)
    added: int
    removed: int

    def summary(self) -> str:
        if self.base is None:
            return "new: no approved plan with this name or class"
        return f"+{self.added} -{self.removed} against {self.base['hash'][:MIN_PREFIX]}"

    def to_dict(self) -> dict:
        return {"hash": self.hash, "base": self.base, "lines": self.lines, "added": self.added,
                "removed": self.removed, "summary": self.summary()}


class PlanRegistry:
    def __init__(self, store: Store, audit: AuditLog):
        self._store = store
        self._table = store.table(TABLE)
        self._audit = audit

    def submit(self, source: str, name: str = "", requester: str = "") -> dict:
        """Record a plan as pending unless it is known already; returns its record."""
        if not isinstance(source, str):
            raise PlanError("a training plan is Python source text", code="bad_plan")
        source = canonical_source(source)
        if len(source.encode("utf-8")) > MAX_SOURCE_BYTES:
            raise PlanError(f"a training plan's source is at most {MAX_SOURCE_BYTES} bytes",
                            code="bad_plan")
        digest = plan_hash(source)
        fresh = {
            "hash": digest, "name": name, "status": PENDING, "source": source,
            "submitted": time.time(), "requester": requester,
            "decided_by": None, "decided_at": None,
        }

        def submit(tx) -> tuple[dict, bool]:
            existing = tx.get(TABLE, digest)
            if existing is not None:
                return existing, False
            tx.put(TABLE, digest, fresh)
            return fresh, True

        record, created = self._store.atomic(submit)
        if created:
            self._audit.append("plan.submitted", hash=digest, name=name, requester=requester)
            log.info("training plan %s (%s) awaits approval", digest, name or "unnamed")
        return record

    def status(self, hash: str) -> str:
        """"approved", "rejected", "pending" or "unknown" for a full hash."""
        record = self._table.get(hash)
        return UNKNOWN if record is None else record["status"]

    def get(self, hash: str) -> dict | None:
        """The record of a full hash or unique prefix; None when nothing matches."""
        try:
            return self._table.get(self.resolve(hash))
        except PlanError as exc:
            if exc.details.get("matches"):
                raise  # ambiguous: the caller must say which
            return None

    def list(self, status: str | None = None) -> list[dict]:
        """Records, oldest first, optionally only those with `status`."""
        if status is not None and status not in STATUSES:
            raise PlanError(f"status is one of {', '.join(STATUSES)}, not {status!r}",
                            code="bad_status")
        records = [r for _, r in self._table.items() if status is None or r["status"] == status]
        return sorted(records, key=lambda r: r["submitted"])

    def approve(self, hash: str, by: str = "operator") -> dict:
        return self._decide(hash, APPROVED, by)

    def reject(self, hash: str, by: str = "operator") -> dict:
        return self._decide(hash, REJECTED, by)

    def diff(self, hash: str) -> PlanDiff:
        """The plan `hash` (or prefix) against the approved plan it most likely replaces: the one
        approved last with the same name, or else defining a class of the same name."""
        record = self._table.get(self.resolve(hash))
        base = self._base(record, self.list(APPROVED))
        if base is None:
            return PlanDiff(record["hash"], None, [], 0, 0)
        lines = list(difflib.unified_diff(
            base["source"].splitlines(), record["source"].splitlines(),
            f"approved {base['hash'][:16]}", f"{record['status']} {record['hash'][:16]}", lineterm=""))
        added = sum(1 for line in lines[2:] if line.startswith("+"))
        removed = sum(1 for line in lines[2:] if line.startswith("-"))
        summary = {k: v for k, v in base.items() if k != "source"}
        return PlanDiff(record["hash"], summary, lines, added, removed)

    @staticmethod
    def _base(record: dict, approved: list[dict]) -> dict | None:
        others = [r for r in approved if r["hash"] != record["hash"]]
        named = [r for r in others if record["name"] and r["name"] == record["name"]]
        classes = plan_classes(record["source"])
        candidates = named or [r for r in others if classes & plan_classes(r["source"])]
        return max(candidates, key=lambda r: r["decided_at"] or 0, default=None)

    def remove(self, hash: str) -> bool:
        """Forget a plan (it will need approval again); False when nothing matches."""
        record = self.get(hash)
        if record is None or not self._table.delete(record["hash"]):
            return False
        self._audit.append("plan.removed", hash=record["hash"], name=record["name"])
        return True

    def resolve(self, prefix: str) -> str:
        """The full hash that `prefix` (>= 8 hex characters) names; PlanError ``unknown_plan``
        when it names none or several."""
        prefix = prefix.strip().lower() if isinstance(prefix, str) else ""
        if len(prefix) < MIN_PREFIX or len(prefix) > 64 or not _HEX.fullmatch(prefix):
            raise PlanError(f"a plan is named by its hash or the first {MIN_PREFIX} or more hex "
                            f"characters of it, not {prefix!r}", code="unknown_plan")
        matches = self._table.keys(prefix)
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise PlanError(f"no training plan {prefix} on this node (see `meshfl plan list`)",
                            code="unknown_plan")
        raise PlanError(f"{prefix} matches {len(matches)} plans; give more of the hash",
                        code="unknown_plan", details={"matches": matches})

    def check(self, source: str, *, dev: bool, home_hint: str | None = None, name: str = "",
              requester: str = "") -> str:
        """The plan's hash if it may run here; otherwise PlanError, and the plan waits (pending)
        for the operator. In development mode every plan may run."""
        if dev:
            digest = plan_hash(source)
            self._audit.append("plan.allowed_dev", hash=digest, name=name, requester=requester)
            log.warning("development mode: running training plan %s without approval", digest)
            return digest
        record = self.submit(source, name=name, requester=requester)
        digest, status = record["hash"], record["status"]
        if status == APPROVED:
            self._audit.append("plan.allowed", hash=digest, requester=requester)
            return digest
        self._audit.append("plan.refused", hash=digest, status=status, requester=requester)
        if status == REJECTED:
            raise PlanError(f"training plan {digest} was rejected on this node",
                            code="plan_rejected", details={"hash": digest})
        raise PlanError(
            f"training plan {digest} is not approved on this node; for its operator: "
            f"{review_commands(digest, home_hint)}",
            code="plan_not_approved", details={"hash": digest},
        )

    def _decide(self, hash: str, status: str, by: str) -> dict:
        digest = self.resolve(hash)

        def decide(tx) -> dict | None:
            record = tx.get(TABLE, digest)
            if record is None:
                return None
            record.update(status=status, decided_by=by, decided_at=time.time())
            tx.put(TABLE, digest, record)
            return record

        record = self._store.atomic(decide)
        if record is None:  # removed between resolve and decide
            raise PlanError(f"no training plan {digest} on this node", code="unknown_plan")
        self._audit.append(f"plan.{status}", hash=digest, name=record["name"], by=by)
        log.info("training plan %s %s by %s", digest, status, by)
        return record
