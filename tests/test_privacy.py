"""The data owner's rules without sockets: policy records, the one gate, the ledger, the accountant."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from meshfl.privacy import (
    ClientDP,
    DPError,
    DPSGD,
    DPSpec,
    Gate,
    Ledger,
    Policy,
    PolicyError,
    PolicyRefused,
    PolicyTable,
    Request,
    mechanism,
)
from meshfl.privacy import _accountant
from meshfl.store import AuditLog, Outbox, Store

DATASET = {"name": "records", "samples": 200}


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as s:
        yield s


def _gate(store, **kw):
    policies = PolicyTable(store, AuditLog(store))
    return Gate(policies, Ledger(store), check_plan=lambda request: "h" * 64, **kw)


def _request(**kw):
    base = dict(kind="training", researcher="r1peerid", dataset=DATASET, researcher_name="lab",
                plan_source="source", training_args={"batch_size": 32, "epochs": 1, "test_fraction": 0.2})
    return Request(**{**base, **kw})


def test_policy_values_are_checked_and_round_trip():
    policy = Policy(researchers=["lab"], min_participants=3, require_secagg=True, epsilon=2, delta=1e-6, review=True)
    assert Policy.from_dict(policy.to_dict()) == policy
    assert policy.needs_dp  # a budget means DP only
    for bad in ({"kinds": ["mining"]}, {"min_participants": 0}, {"epsilon": -1}, {"delta": 1.5},
                {"researchers": []}, {"min_noise": float("nan")}, {"review": "yes"}):
        with pytest.raises(PolicyError):
            Policy(**bad)
    with pytest.raises(PolicyError):
        Policy.from_dict({"owner": "me"})


def test_every_policy_change_is_audited_and_reset_restores_the_default(store):
    audit = AuditLog(store)
    table = PolicyTable(store, audit)
    assert table.get("records") == Policy()
    table.set("records", by="dr. smith", review=True)
    assert table.set("records", min_participants=2) == Policy(review=True, min_participants=2)  # others kept
    assert table.reset("records", by="dr. smith") and table.get("records") == Policy()
    events = [(r.event, r.fields.get("by")) for r in audit.records()]
    assert events == [("policy.set", "dr. smith"), ("policy.set", "operator"), ("policy.reset", "dr. smith")]


def test_the_gate_refuses_with_a_code_naming_each_rule(store):
    gate = _gate(store)
    gate.policies.set("records", researchers=["other-lab"])
    _refused(gate, _request(), "policy_denied")
    assert not gate.may_use("r1peerid", "lab", "records") and gate.may_use("x", "other-lab", "records")
    gate.policies.set("records", researchers=None, require_secagg=True)
    _refused(gate, _request(), "secagg_required")
    gate.policies.set("records", min_participants=3)
    _refused(gate, _request(secagg=True, summed_over=2), "too_few_participants")
    assert gate.check(_request(secagg=True, summed_over=3)).epsilon == 0
    gate.policies.set("records", require_dp=True, min_noise=1.0)
    _refused(gate, _request(secagg=True, summed_over=3), "dp_required")
    _refused(gate, _request(secagg=True, summed_over=3, dp=DPSpec("client", 0.5, 1.0)), "dp_noise_too_low")
    gate.policies.set("records", epsilon=1.0)
    _refused(gate, _request(secagg=True, summed_over=3, dp=DPSpec("client", 1.0, 1.0)), "privacy_budget_exhausted")
    granted = gate.check(_request(secagg=True, summed_over=3, dp=DPSpec("client", 5.0, 1.0)))
    assert 0 < granted.epsilon <= 1.0 and granted.mechanism == (5.0, 1.0, 1)


def test_the_node_wide_secagg_setting_tightens_every_dataset(store):
    gate = _gate(store, force_secure_aggregation=True)
    assert gate.policy("records").require_secagg
    _refused(gate, _request(), "secagg_required")


def test_the_plan_rule_comes_first(store):
    def refuse(request):
        raise PolicyRefused("not approved", code="plan_not_approved")

    gate = Gate(PolicyTable(store), Ledger(store), check_plan=refuse)
    gate.policies.set("records", researchers=["someone-else"])
    with pytest.raises(PolicyRefused) as caught:
        gate.check(_request())
    assert caught.value.code == "plan_not_approved"


def _refused(gate, request, code):
    with pytest.raises(PolicyRefused) as caught:
        gate.check(request)
    assert caught.value.code == code and caught.value.details["dataset"] == "records"


def test_dp_requests_are_checked_and_their_mechanism_is_what_the_node_will_run():
    assert DPSpec.from_wire(DPSGD(1.1, 0.5)) == DPSpec("sample", 1.1, 0.5)
    assert DPSpec.from_wire(ClientDP(2.0, clip=0.1).to_wire()) == DPSpec("client", 2.0, 0.1)
    for bad in ({"mode": "sample"}, {"mode": "global", "noise_multiplier": 1, "clip": 1},
                {"mode": "client", "noise_multiplier": 0, "clip": 1}, {"mode": "client", "noise_multiplier": True, "clip": 1}):
        with pytest.raises(DPError):
            DPSpec.from_wire(bad)
    # 200 samples, 20 % held out: 160 train; batches of 32 are Poisson rate 0.2, int(1/0.2) = 5 a pass
    assert mechanism(DPSpec("sample", 1.0, 1.0), 200, {"batch_size": 32, "epochs": 3, "test_fraction": 0.2}) == (1.0, 0.2, 15)
    assert mechanism(DPSpec("sample", 1.0, 1.0), 200, {"batch_size": 32, "steps": 7, "test_fraction": 0.2})[2] == 7
    assert mechanism(DPSpec("client", 3.0, 1.0), 200, {}) == (3.0, 1.0, 1)


def test_the_ledger_matches_opacus_accountant_and_never_debits_twice(store):
    ledger = Ledger(store)
    mechanisms = [(1.1, 0.05, 100), (0.8, 1.0, 1), (1.1, 0.05, 100)]
    for i, mech in enumerate(mechanisms):
        ledger.reserve(f"t{i}", "records", mech)
        ledger.debit(f"t{i}", "records", "lab", mech, 1e-5)
    ledger.debit("t0", "records", "lab", mechanisms[0], 1e-5)  # a replayed release: no second debit
    reference = RDPAccountant()
    reference.history = [tuple(m) for m in mechanisms]
    assert ledger.spent("records", 1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    entries = ledger.entries("records")
    assert [e["task"] for e in entries] == ["t0", "t1", "t2"]
    assert sum(e["epsilon"] for e in entries) == pytest.approx(entries[-1]["epsilon_total"])
    assert ledger.reserved() == {}  # each debit took its reservation


def test_reservations_count_against_the_budget_until_released_or_dropped(store):
    ledger = Ledger(store)
    one = _accountant.epsilon(_accountant.rdp_curve([(1.0, 1.0, 1)]), 1e-5)
    ledger.reserve("queued", "records", (1.0, 1.0, 1))
    assert ledger.spent("records", 1e-5) == 0
    assert ledger.committed("records", 1e-5) == pytest.approx(one)
    assert ledger.committed("records", 1e-5, exclude="queued") == 0
    assert ledger.committed("other", 1e-5) == 0
    assert ledger.unreserve("queued") and ledger.committed("records", 1e-5) == 0
    assert math.isclose(_accountant.epsilon([], 1e-5), 0.0)


def test_a_held_message_is_kept_but_not_sent_until_released(store):
    outbox = Outbox(store)
    outbox.put("ready", "r", {"n": 1})
    outbox.put("review", "r", {"n": 2}, [b"tensor"], held=True)
    assert [i.msg_id for i in outbox.pending()] == ["ready"]
    assert [i.msg_id for i in outbox.held()] == ["review"] and outbox.get("review").held
    assert outbox.release("ready") is None  # only a held message can be released
    released = outbox.release("review", {"n": 3})
    assert not released.held and released.envelope == {"n": 3} and released.buffers == [b"tensor"]
    assert [i.msg_id for i in outbox.pending()] == ["ready", "review"]
    assert outbox.take_released() == ["review"] and outbox.take_released() == []
    assert outbox.ack("review") and len(outbox) == 1
