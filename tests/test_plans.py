"""meshfl.node._plans: canonical plan hashes, approval states, prefix lookup and the check."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfl.errors import PlanError
from meshfl.node._plans import PlanRegistry, canonical_source, plan_classes, plan_hash
from meshfl.store import AuditLog, Store

PLAN = "class Plan:\n    def step(self, x):\n        return x * 2\n"


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as store:
        yield store


@pytest.fixture
def plans(store):
    return PlanRegistry(store, AuditLog(store))


def events(store) -> list[str]:
    return [r.event for r in AuditLog(store).records()]


def test_hash_ignores_line_endings_and_trailing_whitespace():
    variants = [
        PLAN,
        PLAN.replace("\n", "\r\n"),
        PLAN.replace("\n", "\r"),
        PLAN.replace("\n", "  \t\n"),
        PLAN + "\n\n   \n",
        PLAN.rstrip("\n"),
    ]
    assert len({plan_hash(v) for v in variants}) == 1
    assert plan_hash(PLAN) == plan_hash(canonical_source(PLAN))
    for changed in (PLAN.replace("2", "3"), PLAN.replace("    return", "     return"),
                    "\n" + PLAN, PLAN.replace("x * 2", "x*2")):
        assert plan_hash(changed) != plan_hash(PLAN)


@given(st.text())
def test_canonical_source_is_idempotent(text):
    assert canonical_source(canonical_source(text)) == canonical_source(text)


def test_unapproved_plan_is_refused_and_left_pending(plans, store):
    with pytest.raises(PlanError) as err:
        plans.check(PLAN, dev=False, home_hint="/srv/node", requester="lab")
    digest = plan_hash(PLAN)
    assert err.value.code == "plan_not_approved"
    assert digest in err.value.message
    assert f"meshfl plan approve {digest} --home /srv/node" in err.value.message
    assert err.value.details["hash"] == digest
    assert plans.status(digest) == "pending"
    record = plans.get(digest)
    assert record["requester"] == "lab" and record["source"] == PLAN
    assert [r["hash"] for r in plans.list("pending")] == [digest]
    assert events(store) == ["plan.submitted", "plan.refused"]


def test_approve_then_check_passes_and_changes_need_approval(plans, store):
    digest = plans.submit(PLAN, name="doubler")["hash"]
    record = plans.approve(digest, by="alice")
    assert (record["status"], record["decided_by"]) == ("approved", "alice")
    assert plans.check(PLAN.replace("\n", "\r\n"), dev=False) == digest
    assert plans.submit(PLAN)["status"] == "approved"  # re-submitting changes nothing
    changed = PLAN.replace("2", "20")
    with pytest.raises(PlanError) as err:
        plans.check(changed, dev=False)
    assert err.value.code == "plan_not_approved"
    assert plans.status(plan_hash(changed)) == "pending"
    assert events(store)[:3] == ["plan.submitted", "plan.approved", "plan.allowed"]
    assert AuditLog(store).verify().ok


def test_rejected_and_dev(plans, store):
    digest = plans.submit(PLAN)["hash"]
    plans.reject(digest)
    with pytest.raises(PlanError) as err:
        plans.check(PLAN, dev=False)
    assert err.value.code == "plan_rejected"
    other = "print('hi')\n"
    assert plans.check(other, dev=True) == plan_hash(other)
    assert plans.status(plan_hash(other)) == "unknown"
    assert events(store)[-1] == "plan.allowed_dev"


def test_prefixes(plans, store):
    digest = plans.submit(PLAN)["hash"]
    assert plans.approve(digest[:8])["hash"] == digest
    assert plans.get(digest[:12].upper())["hash"] == digest
    for bad in (digest[:7], "zzzzzzzz", "0" * 8 if not digest.startswith("0" * 8) else "1" * 8):
        with pytest.raises(PlanError) as err:
            plans.approve(bad)
        assert err.value.code == "unknown_plan"
    twin = digest[:10] + "0" * 54 if digest[10:] != "0" * 54 else digest[:10] + "1" * 54
    store.table("plans").put(twin, {**plans.get(digest), "hash": twin})  # a forged near-twin
    with pytest.raises(PlanError) as err:
        plans.reject(digest[:10])
    assert err.value.code == "unknown_plan" and "2 plans" in err.value.message
    assert plans.reject(digest[:11])["hash"] == digest


def test_remove_and_unknown(plans, store):
    digest = plans.submit(PLAN)["hash"]
    assert plans.remove(digest[:8]) is True
    assert plans.remove(digest) is False
    assert plans.status(digest) == "unknown" and plans.get(digest) is None
    with pytest.raises(PlanError) as err:
        plans.approve(digest)
    assert err.value.code == "unknown_plan"
    with pytest.raises(PlanError):
        plans.list("maybe")
    with pytest.raises(PlanError):
        plans.submit(b"bytes are not source")
    assert "plan.removed" in events(store)


def test_diff_against_the_last_approved_plan_with_the_same_name_or_class(plans):
    first = plans.submit(PLAN, name="doubler")["hash"]
    plans.approve(first, by="ann")
    assert plans.diff(first).base is None  # nothing approved before it
    second_source = PLAN.replace("x * 2", "x * 2 + 0")
    second = plans.submit(second_source, name="doubler")["hash"]
    plans.approve(second, by="bob")
    changed_source = second_source.replace("return x * 2 + 0", "y = x\n        return y * 2")
    changed = plans.submit(changed_source, name="doubler")["hash"]
    diff = plans.diff(changed[:10])
    assert diff.base["hash"] == second and "source" not in diff.base  # the latest approval wins
    assert (diff.added, diff.removed) == (2, 1)
    assert diff.lines[0] == f"--- approved {second[:16]}" and diff.lines[1] == f"+++ pending {changed[:16]}"
    assert "-        return x * 2 + 0" in diff.lines and "+        y = x" in diff.lines
    assert diff.summary() == f"+2 -1 against {second[:8]}"
    assert diff.to_dict()["lines"] == diff.lines
    # No name: the class the source defines finds its predecessor; a rejected plan is no base.
    unnamed = plans.submit(PLAN.replace("2", "3"))["hash"]
    assert plans.diff(unnamed).base["hash"] == second
    plans.reject(second)
    assert plans.diff(unnamed).base["hash"] == first
    other = plans.submit("class Other:\n    pass\n", name="other")["hash"]
    assert plans.diff(other).base is None and plans.diff(other).summary().startswith("new")
    assert plan_classes("import x\nclass A(B):\n    class Inner:\n        pass\nclass C:\n    pass\n") == {"A", "C"}


def test_an_unapproved_plan_names_the_review_commands(plans):
    with pytest.raises(PlanError) as err:
        plans.check(PLAN, dev=False)
    digest = plan_hash(PLAN)
    assert f"`meshfl plan show {digest} --diff`" in err.value.message
    assert f"`meshfl plan approve {digest}`" in err.value.message and "--home" not in err.value.message
