"""The data owner decides, on a live mesh: per-dataset policy, differential privacy against a budget
the node keeps, and results held for the operator's review."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import orjson
import pytest
import torch
from opacus.accountants import RDPAccountant

from helpers.data import write_blobs_csv
from helpers.plans import AddOnePlan, TinyPlan
from helpers.waiting import wait_until
from meshfl.privacy import ClientDP, DPSGD
from meshfl.researcher import Experiment, PrivacyBudgetExhausted, RoundFailed
from meshfl.testing import FederatedMesh

pytestmark = pytest.mark.timeout(240)
SAMPLES = 200


@pytest.fixture(scope="module")
def mesh():
    with FederatedMesh(2) as m:
        for i, node in enumerate(m.nodes):
            path = write_blobs_csv(node.home.path / "blobs.csv", n=SAMPLES, seed=i)
            node.datasets.add("blobs", ["blobs"], "csv", path, target="target")
        m.approve(TinyPlan)
        m.approve(AddOnePlan)
        yield m


@pytest.fixture
def policy(mesh):
    """Set a policy on every node's dataset for one test; back to the default after it."""
    def set_policy(**rules):
        for node in mesh.nodes:
            node.gate.policies.reset("blobs")
            if rules:
                node.gate.policies.set("blobs", **rules)

    yield set_policy
    set_policy()


def _experiment(mesh, plan=TinyPlan, rounds=1, tags=("blobs",), **kw):
    kw.setdefault("min_nodes", len(mesh.nodes))
    kw.setdefault("training_args", {"epochs": 1, "lr": 0.05})
    return Experiment(mesh.researcher, plan, list(tags), rounds, round_timeout=60, progress=False, **kw)


def _fresh_dataset(mesh, name: str, **rules) -> None:
    """A dataset of its own (tagged ``name``) with an empty ledger and ``rules`` as its policy."""
    for i, node in enumerate(mesh.nodes):
        path = write_blobs_csv(node.home.path / f"{name}.csv", n=SAMPLES, seed=i)
        node.datasets.add(name, [name], "csv", path, target="target")
        node.gate.policies.set(name, **rules)


def _failed_codes(mesh, **kw) -> set[str]:
    with pytest.raises(RoundFailed) as caught:
        _experiment(mesh, **kw).run()
    return {e["code"] for e in caught.value.details["failed"].values()}


def test_search_shows_the_rules_to_meet_and_the_budget_left(mesh, policy):
    policy(require_secagg=True, epsilon=3.0, delta=1e-6, review=True)
    found = mesh.researcher.search(["blobs"])
    for (record,) in found.values():
        assert record["policy"] == {"kinds": ["training", "analytics", "preprocessing", "hosted"], "min_participants": 1,
                                    "require_secagg": True, "require_dp": True, "min_noise": 0.0, "review": True,
                                    "min_cell": 10, "exact_extremes": False}
        assert record["privacy"] == {"epsilon": 3.0, "delta": 1e-6, "spent": 0.0, "left": 3.0}
        assert "path" not in record


def test_a_researcher_the_policy_leaves_out_sees_nothing_and_is_refused(mesh, policy):
    exp = _experiment(mesh)
    exp.run()  # it knows the datasets now
    policy(researchers=["another-lab"])
    assert mesh.researcher.search(["blobs"]) == {n: [] for n in mesh.researcher.nodes()}
    with pytest.raises(RoundFailed) as caught:
        exp.rounds = 2
        exp.run()  # it still sends tasks to the nodes it found: each refuses, naming the rule
    assert {e["code"] for e in caught.value.details["failed"].values()} == {"policy_denied"}
    refusals = [r for r in mesh.nodes[0].audit.records() if r.event == "task.refused"]
    assert refusals[-1].fields["reason"] == "policy_denied" and refusals[-1].fields["dataset"] == "blobs"


def test_secure_aggregation_and_a_minimum_of_participants_are_enforced(mesh, policy):
    policy(require_secagg=True)
    assert _failed_codes(mesh) == {"secagg_required"}
    policy(min_participants=2)
    assert _failed_codes(mesh) == {"too_few_participants"}  # without secagg a node cannot tell
    history = _experiment(mesh, secagg={"threshold": 2}).run()  # a sum of 2 meets the minimum of 2
    assert len(history[0]["nodes"]) == 2


def test_differential_privacy_requirements_are_enforced(mesh, policy):
    policy(require_dp=True, min_noise=1.0)
    assert _failed_codes(mesh) == {"dp_required"}
    assert _failed_codes(mesh, dp=ClientDP(0.5, clip=1.0)) == {"dp_noise_too_low"}
    assert len(_experiment(mesh, dp=ClientDP(1.0, clip=1.0)).run()[0]["nodes"]) == 2


def test_dp_sgd_costs_what_opacus_counts_and_the_history_shows_it(mesh):
    _fresh_dataset(mesh, "dpsgd", epsilon=100.0, delta=1e-5)
    args = {"epochs": 2, "batch_size": 40, "lr": 0.05, "test_fraction": 0.2}
    history = _experiment(mesh, rounds=2, tags=["dpsgd"], dp=DPSGD(1.2, max_grad_norm=1.0), training_args=args).run()
    # 160 train samples, batches of 40: Poisson rate 0.25, int(1 / 0.25) = 4 steps a pass, 2 passes
    opacus = RDPAccountant()  # Opacus' own accountant, fed the same mechanisms
    opacus.history = [(1.2, 0.25, 8), (1.2, 0.25, 8)]
    spent = opacus.get_epsilon(1e-5)
    for node in mesh.nodes:
        entries = node.ledger.entries("dpsgd")
        assert [e["mechanism"] for e in entries] == [[1.2, 0.25, 8]] * 2
        assert node.ledger.spent("dpsgd", 1e-5) == pytest.approx(spent, rel=1e-9)
        (cost,) = [info["privacy"] for info in history[-1]["nodes"].values() if info["task"] == entries[-1]["task"]]
        assert cost["epsilon_spent"] == pytest.approx(spent) and cost["epsilon_left"] == pytest.approx(100.0 - spent)
        assert cost["epsilon"] == pytest.approx(entries[-1]["epsilon"]) and cost["epsilon"] > 0
    # Only the noised model leaves: no data-dependent metric (loss, accuracy) comes back.
    assert all(set(info["metrics"]) == {"steps"} for info in history[-1]["nodes"].values())


def test_dp_sgd_refuses_a_plan_with_its_own_loop(mesh, policy):
    assert _failed_codes(mesh, plan=AddOnePlan, dp=DPSGD(1.0)) == {"dp_custom_loop"}


def test_client_dp_clips_and_noises_each_update_in_the_node_process(mesh, policy):
    """AddOnePlan moves every parameter by +1 (norm sqrt(P) >> clip): the node clips it to 0.5."""
    exp = _experiment(mesh, plan=AddOnePlan, dp=ClientDP(1e-6, clip=0.5))
    before = torch.cat([t.reshape(-1) for t in exp.global_state.values()])
    exp.run()
    after = torch.cat([t.reshape(-1) for t in exp.global_state.values()])
    assert float((after - before).norm()) == pytest.approx(0.5, rel=1e-3)  # both nodes: the same clipped step
    noisy = _experiment(mesh, plan=AddOnePlan, dp=ClientDP(20.0, clip=0.5))
    before = torch.cat([t.reshape(-1) for t in noisy.global_state.values()])
    noisy.run()
    change = torch.cat([t.reshape(-1) for t in noisy.global_state.values()]) - before
    assert float(change.norm()) > 5 * 0.5  # the noise dominates; the step alone is 0.5


def test_an_experiment_that_runs_out_of_budget_stops_naming_the_dataset(mesh):
    def spent(releases: int) -> float:
        accountant = RDPAccountant()
        accountant.history = [(1.0, 1.0, releases)]
        return accountant.get_epsilon(1e-5)

    _fresh_dataset(mesh, "scarce", epsilon=(spent(2) + spent(3)) / 2)  # 2 releases fit, not 3
    exp = _experiment(mesh, rounds=5, tags=["scarce"], dp=ClientDP(1.0, clip=1.0))
    with pytest.raises(PrivacyBudgetExhausted) as caught:
        exp.run()
    assert "scarce" in caught.value.message and caught.value.code == "privacy_budget_exhausted"
    assert set(caught.value.details["datasets"].values()) == {"scarce"}
    assert exp.round == 2  # the rounds the budget allowed ran and were kept
    for node in mesh.nodes:
        budget = node.gate.budget("scarce")
        assert len(node.ledger.entries("scarce")) == 2 and budget["spent"] <= budget["epsilon"]
        assert budget["left"] < spent(3) - spent(2)


def _run_in_background(exp):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    return pool, pool.submit(exp.run)


def _meshfl(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshfl.cli", *args], capture_output=True, text=True, timeout=60)


def test_a_result_held_for_review_leaves_when_the_operator_releases_it(mesh, policy):
    """The operator reviews and releases from another process (`meshfl result ...`) while the node runs."""
    reviewer = mesh.nodes[0]
    reviewer.gate.policies.set("blobs", review=True)
    pool, future = _run_in_background(_experiment(mesh))
    try:
        assert wait_until(lambda: reviewer.outbox.held(), timeout=60)
        home = str(reviewer.home.path)
        (held,) = orjson.loads(_meshfl("result", "list", "--home", home, "--json").stdout)
        assert held["dataset"] == "blobs" and held["researcher"] == "researcher" and held["plan"]
        assert held["update_norm"] > 0 and "test_accuracy" in held["metrics"] and held["privacy_cost"] is None
        shown = _meshfl("result", "show", held["task"], "--home", home)
        assert "update norm" in shown.stdout and held["task"] in shown.stdout
        assert not future.done()  # the round waits for the held result
        released = _meshfl("result", "release", held["task"], "--home", home, "--by", "dr. smith")
        assert released.returncode == 0, released.stderr
        history = future.result(timeout=60)
    finally:
        pool.shutdown()
    assert len(history[0]["nodes"]) == 2
    events = [(r.event, r.fields.get("by")) for r in reviewer.audit.records() if r.event.startswith("result.")]
    assert ("result.held", None) in events and ("result.released", "dr. smith") in events


def test_a_denied_result_fails_its_node_and_debits_nothing(mesh):
    _fresh_dataset(mesh, "reviewed", epsilon=50.0)
    reviewer = mesh.nodes[0]
    reviewer.gate.policies.set("reviewed", review=True)
    pool, future = _run_in_background(_experiment(mesh, min_nodes=1, tags=["reviewed"], dp=ClientDP(1.0)))
    try:
        assert wait_until(lambda: reviewer.outbox.held(), timeout=60)
        (held,) = reviewer.outbox.held()
        spent = reviewer.ledger.spent("reviewed", 1e-5)
        reviewer.release.decide(held.msg_id, release=False, by="dr. smith")
        reviewer.notify_released()
        history = future.result(timeout=60)
    finally:
        pool.shutdown()
    (code,) = {e["code"] for e in history[0]["failed"].values()}
    assert code == "result_denied" and len(history[0]["nodes"]) == 1
    assert reviewer.ledger.spent("reviewed", 1e-5) == spent and reviewer.ledger.reserved() == {}
    assert reviewer.ledger.entry(held.msg_id) is None


def test_the_cli_sets_and_shows_policies_and_node_status_names_the_protections(mesh):
    home = str(mesh.nodes[1].home.path)
    out = _meshfl("dataset", "policy", "blobs", "--home", home, "--researchers", "researcher", "--min-participants",
                  "3", "--budget", "4", "--review", "--by", "dr. jones", "--json")
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout)["policy"]["min_participants"] == 3
    shown = _meshfl("dataset", "show", "blobs", "--home", home).stdout
    assert "min participants: 3" in shown and "epsilon 4" in shown and "released after review" in shown
    status = orjson.loads(_meshfl("node", "status", "--home", home, "--json").stdout)
    assert status["policies"]["blobs"]["policy"]["review"] is True
    assert status["sandbox"]["network"] == "namespace" and status["sandbox"]["memory_cap"]
    out = _meshfl("dataset", "policy", "blobs", "--home", home, "--min-cell", "25", "--exact-extremes", "--json")
    assert orjson.loads(out.stdout)["policy"]["min_cell"] == 25 and mesh.nodes[1].gate.policy("blobs").exact_extremes
    assert "suppressed below 25 records; extremes exact" in _meshfl("dataset", "show", "blobs", "--home", home).stdout
    _meshfl("dataset", "policy", "blobs", "--home", home, "--default-min-cell", "--coarse-extremes")
    assert mesh.nodes[1].gate.policy("blobs").min_cell is None
    assert _meshfl("dataset", "policy", "blobs", "--home", home, "--reset").returncode == 0
    assert _meshfl("dataset", "policy", "nope", "--home", home).returncode == 1
    audit = [r for r in mesh.nodes[1].audit.records() if r.event.startswith("policy.")]
    assert audit[-4].fields["by"] == "dr. jones" and audit[-2].fields["policy"]["min_cell"] is None
    assert audit[-1].event == "policy.reset"


def test_dp_refuses_an_aggregator_that_sends_tensors_of_its_own(mesh):
    from meshfl.aggregate import Scaffold
    from meshfl.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        _experiment(mesh, dp=ClientDP(1.0), aggregator=Scaffold())
    assert caught.value.code == "dp_incompatible"
