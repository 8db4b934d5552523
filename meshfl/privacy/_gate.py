"""The node's one policy gate: every request kind is decided here, before any work starts.

A request names a kind, a researcher and a dataset, and what protections it comes with. The gate
checks, in this order, and refuses with a code that names the first rule broken:

==========================  ==============================================================
``plan_not_approved`` ...   the plan's code is not approved here (the plan registry's check)
``policy_denied``           the researcher may not use the dataset, or not for this kind
``secagg_required``         the dataset (or the node) serves only secure aggregation
``too_few_participants``    fewer nodes would be summed than the dataset's minimum
``dp_required``             the dataset serves only differentially private tasks
``dp_noise_too_low``        the task's noise multiplier is below the dataset's minimum
``privacy_budget_exhausted`` the task's cost does not fit in what is left of the budget
==========================  ==============================================================

A passed request comes back as a :class:`Grant`: the policy in force and the task's privacy cost,
which the node reserves with the task and debits at release (:mod:`._ledger`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import MeshflError
from ._dp import DPSpec, mechanism
from ._ledger import Ledger
from ._policy import Policy, PolicyTable


class PolicyRefused(MeshflError):
    """The node's policy refuses a request; ``code`` names the rule, ``details["dataset"]`` the dataset."""

    code = "policy_denied"


@dataclass(frozen=True)
class Request:
    kind: str
    researcher: str  # peer id
    dataset: dict  # the dataset's registry record
    researcher_name: str = ""
    plan_source: str | None = None
    plan_name: str = ""  # the plan's class: a pending plan is recorded under it
    secagg: bool = False
    #: The fewest nodes whose results are summed before the researcher sees them: the secure
    #: round's threshold, or 1 without secure aggregation.
    summed_over: int = 1
    dp: DPSpec | None = None
    training_args: dict | None = None
    task_id: str | None = None  # a task already reserved (its own reservation is left out)


@dataclass(frozen=True)
class Grant:
    policy: Policy
    plan_hash: str | None
    mechanism: tuple | None  # (sigma, q, steps) of a DP task
    epsilon: float  # what the task costs, at the policy's delta (0 without DP)


class Gate:
    def __init__(self, policies: PolicyTable, ledger: Ledger, *, check_plan: Callable[[Request], str],
                 force_secure_aggregation: bool = False, kinds_off: tuple[str, ...] = ()) -> None:
        self.policies, self.ledger = policies, ledger
        self._check_plan = check_plan
        self._force_secagg = force_secure_aggregation
        self._kinds_off = tuple(kinds_off)  # kinds the node serves for no dataset (config.toml)

    def policy(self, dataset: str) -> Policy:
        """The policy in force for ``dataset``: its own, tightened by the node-wide settings."""
        return self.policies.get(dataset).tightened(force_secure_aggregation=self._force_secagg)

    def may_use(self, researcher: str, researcher_name: str, dataset: str) -> bool:
        """Whether the researcher may see and use the dataset at all (search filters on this)."""
        return _admits(self.policy(dataset), researcher, researcher_name)

    def check(self, request: Request) -> Grant:
        """Decide ``request``; :class:`PolicyRefused` (or the plan registry's error) if refused."""
        name = request.dataset["name"]
        plan_hash = self._check_plan(request) if request.plan_source is not None else None
        policy = self.policy(name)
        refuse = _refuser(name)
        if not _admits(policy, request.researcher, request.researcher_name):
            raise refuse(f"researcher {request.researcher_name or request.researcher} may not use dataset {name}",
                         "policy_denied", rule="researchers")
        if request.kind in self._kinds_off:
            raise refuse(f"this node serves no {request.kind} requests (its operator switched them off)",
                         "policy_denied", rule="node")
        if request.kind not in policy.kinds:
            raise refuse(f"dataset {name} does not serve {request.kind} requests (it serves "
                         f"{', '.join(policy.kinds)})", "policy_denied", rule="kinds")
        if policy.require_secagg and not request.secagg:
            raise refuse(f"dataset {name} is used only with secure aggregation", "secagg_required")
        if request.summed_over < policy.min_participants:
            how = "with" if request.secagg else "without"
            raise refuse(f"dataset {name} contributes only to sums of at least {policy.min_participants} nodes; "
                         f"this request sums {request.summed_over} ({how} secure aggregation"
                         f"{'' if request.secagg else ': only secure aggregation sums before the researcher sees'})",
                         "too_few_participants", needed=policy.min_participants)
        if request.dp is None:
            if policy.needs_dp:
                raise refuse(f"dataset {name} serves only differentially private tasks "
                             f"(Experiment(..., dp=...))", "dp_required")
            return Grant(policy, plan_hash, None, 0.0)
        if request.dp.noise_multiplier < policy.min_noise:
            raise refuse(f"dataset {name} needs a noise multiplier of at least {policy.min_noise:g}, "
                         f"the task has {request.dp.noise_multiplier:g}", "dp_noise_too_low",
                         needed=policy.min_noise)
        mech = mechanism(request.dp, int(request.dataset.get("samples") or 0), request.training_args or {})
        if policy.epsilon is None:
            return Grant(policy, plan_hash, mech, 0.0)
        before = self.ledger.committed(name, policy.delta, exclude=request.task_id)
        after = self.ledger.committed(name, policy.delta, extra=mech, exclude=request.task_id)
        if after > policy.epsilon:
            left = max(0.0, policy.epsilon - before)
            raise refuse(f"dataset {name}'s privacy budget is exhausted: epsilon {left:.4g} of "
                         f"{policy.epsilon:g} left (delta {policy.delta:g}), this task would spend "
                         f"{after - before:.4g}", "privacy_budget_exhausted",
                         epsilon_left=left, epsilon_cost=after - before)
        return Grant(policy, plan_hash, mech, after - before)

    def budget(self, dataset: str) -> dict | None:
        """What a researcher may know of a dataset's budget: None if it has none."""
        policy = self.policy(dataset)
        if policy.epsilon is None:
            return None
        spent = self.ledger.spent(dataset, policy.delta)
        committed = self.ledger.committed(dataset, policy.delta)
        return {"epsilon": policy.epsilon, "delta": policy.delta, "spent": spent,
                "left": max(0.0, policy.epsilon - committed)}


def public_policy(policy: Policy, minimum_samples: int) -> dict[str, Any]:
    """The rules a researcher must meet to use a dataset (not who else may use it); ``min_cell``
    is the smallest analytics cell released (the node's ``minimum_samples`` unless set)."""
    return {"kinds": list(policy.kinds), "min_participants": policy.min_participants,
            "require_secagg": policy.require_secagg, "require_dp": policy.needs_dp,
            "min_noise": policy.min_noise, "review": policy.review,
            "min_cell": policy.min_cell or minimum_samples, "exact_extremes": policy.exact_extremes}


def _admits(policy: Policy, researcher: str, researcher_name: str) -> bool:
    allowed = policy.researchers
    return allowed is None or researcher in allowed or (bool(researcher_name) and researcher_name in allowed)


def _refuser(dataset: str):
    def refuse(message: str, code: str, **details: Any) -> PolicyRefused:
        return PolicyRefused(message, code=code, details={"dataset": dataset, **details})

    return refuse
