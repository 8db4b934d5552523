"""Per-dataset policy: what the data owner allows a dataset to be used for.

A policy is a small record the operator sets with ``meshfl dataset policy NAME ...``; it lives in
table ``policies`` (dataset name -> record) and every change is audited. A dataset without a record
has the default policy: every trusted researcher, every request kind, results released at once,
no privacy budget. Node-wide settings in ``config.toml`` tighten every dataset's policy (today:
``force_secure_aggregation``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import MeshflError
from ..store import AuditLog, Store
from ..store._codec import decode_value

TABLE = "policies"
#: The request kinds a node serves; a policy allows a subset of them. ``hosted``: training for a
#: hosted model the operator joined (``meshfl node join``), whose diff goes to the host.
KINDS = ("training", "analytics", "preprocessing", "hosted")


class PolicyError(MeshflError):
    """A policy that cannot be set as given (code ``bad_policy``)."""

    code = "bad_policy"


@dataclass(frozen=True)
class Policy:
    """The rules for one dataset; every field is checked on construction."""

    #: Researchers (peer ids or the names this node trusts them under) that may use the dataset;
    #: None: every trusted researcher.
    researchers: tuple[str, ...] | None = None
    #: Request kinds the dataset serves.
    kinds: tuple[str, ...] = KINDS
    #: The fewest nodes whose updates may be summed with this dataset's: anything above 1 needs
    #: secure aggregation, the only way this node can check the size of an aggregate.
    min_participants: int = 1
    require_secagg: bool = False
    #: Only differentially private tasks, with a noise multiplier of at least ``min_noise``.
    require_dp: bool = False
    min_noise: float = 0.0
    #: The privacy budget (epsilon, delta) of the dataset, spent by its released results; None:
    #: no budget. A dataset with a budget serves only differentially private tasks.
    epsilon: float | None = None
    delta: float = 1e-5
    #: Results wait for the operator's review (``meshfl result release``) before they leave.
    review: bool = False
    #: Analytics: a released cell (a bin, a level's count, a group) counted from fewer records is
    #: suppressed; None: the node's minimum_samples.
    min_cell: int | None = None
    #: Analytics: plain answers carry exact minima and maxima (else rounded outward to a coarse grid).
    exact_extremes: bool = False

    def __post_init__(self) -> None:
        if self.researchers is not None:
            names = tuple(str(r).strip() for r in self.researchers)
            if not names or not all(names):
                raise PolicyError("researchers is a non-empty list of peer ids or names, or None for all")
            object.__setattr__(self, "researchers", names)
        kinds = tuple(self.kinds)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise PolicyError(f"kinds are some of {', '.join(KINDS)}; got {', '.join(map(str, kinds)) or 'none'}")
        object.__setattr__(self, "kinds", tuple(k for k in KINDS if k in kinds))
        if isinstance(self.min_participants, bool) or not isinstance(self.min_participants, int) \
                or self.min_participants < 1:
            raise PolicyError("min_participants is an integer >= 1")
        if self.min_cell is not None and (isinstance(self.min_cell, bool) or not isinstance(self.min_cell, int)
                                          or self.min_cell < 1):
            raise PolicyError("min_cell is an integer >= 1, or None for the node's minimum_samples")
        for name in ("require_secagg", "require_dp", "review", "exact_extremes"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"{name} is true or false")
        if not _real(self.min_noise) or self.min_noise < 0:
            raise PolicyError("min_noise is a number >= 0")
        if self.epsilon is not None and (not _real(self.epsilon) or self.epsilon <= 0):
            raise PolicyError("the budget's epsilon is a number > 0")
        if not _real(self.delta) or not 0 < self.delta < 1:
            raise PolicyError("the budget's delta is a number in (0, 1)")
        object.__setattr__(self, "min_noise", float(self.min_noise))
        object.__setattr__(self, "delta", float(self.delta))
        if self.epsilon is not None:
            object.__setattr__(self, "epsilon", float(self.epsilon))

    @property
    def needs_dp(self) -> bool:
        """Whether only differentially private tasks may use the dataset."""
        return self.require_dp or self.epsilon is not None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["researchers"] = None if self.researchers is None else list(self.researchers)
        out["kinds"] = list(self.kinds)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Policy":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(f"unknown policy setting(s): {', '.join(unknown)}")
        data = dict(data)
        if data.get("researchers") is not None:
            data["researchers"] = tuple(data["researchers"])
        if "kinds" in data:
            data["kinds"] = tuple(data["kinds"])
        return cls(**data)

    def tightened(self, *, force_secure_aggregation: bool) -> "Policy":
        """This policy with the node-wide settings applied on top."""
        if force_secure_aggregation and not self.require_secagg:
            return dataclasses.replace(self, require_secagg=True)
        return self

    def describe(self) -> list[str]:
        """One readable line per rule, as ``meshfl dataset show`` prints them."""
        who = "every trusted researcher" if self.researchers is None else ", ".join(self.researchers)
        budget = "none" if self.epsilon is None else f"epsilon {self.epsilon:g}, delta {self.delta:g}"
        dp = "required" if self.needs_dp else "optional"
        if self.min_noise:
            dp += f", noise multiplier >= {self.min_noise:g}"
        return [
            f"researchers:      {who}",
            f"request kinds:    {', '.join(self.kinds)}",
            f"min participants: {self.min_participants}",
            f"secure agg.:      {'required' if self.require_secagg else 'optional'}",
            f"diff. privacy:    {dp}",
            f"privacy budget:   {budget}",
            f"results:          {'released after review' if self.review else 'released at once'}",
            f"analytics cells:  suppressed below {self.min_cell or 'minimum_samples'} records; "
            f"extremes {'exact' if self.exact_extremes else 'coarse'}",
        ]


class PolicyTable:
    """The stored policies; :meth:`set` audits every change."""

    def __init__(self, store: Store, audit: AuditLog | None = None) -> None:
        self._table = store.table(TABLE)
        self._audit = audit
        self._parsed: dict[bytes | None, Policy] = {None: Policy()}  # stored record -> its (frozen) Policy

    def get(self, dataset: str) -> Policy:
        """The dataset's policy (the default one if none was set), read anew each time (another
        process may change it); a record seen before is not parsed and checked again."""
        raw = self._table.get_bytes(dataset)
        policy = self._parsed.get(raw)
        if policy is None:
            if len(self._parsed) > 64:
                self._parsed = {None: self._parsed[None]}
            policy = self._parsed[raw] = Policy.from_dict(decode_value(raw, f"{TABLE}[{dataset!r}]"))
        return policy

    def set(self, dataset: str, by: str = "operator", **changes: Any) -> Policy:
        """Change some rules of ``dataset``'s policy (the others stay); returns the new policy."""
        policy = Policy.from_dict({**self.get(dataset).to_dict(), **changes})
        self._table.put(dataset, policy.to_dict())
        if self._audit is not None:
            self._audit.append("policy.set", dataset=dataset, by=by, policy=policy.to_dict())
        return policy

    def reset(self, dataset: str, by: str = "operator") -> bool:
        """Back to the default policy; False when the dataset had none set."""
        removed = self._table.delete(dataset)
        if removed and self._audit is not None:
            self._audit.append("policy.reset", dataset=dataset, by=by)
        return removed

    def items(self) -> Iterable[tuple[str, Policy]]:
        return [(name, Policy.from_dict(record)) for name, record in self._table.items()]


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
