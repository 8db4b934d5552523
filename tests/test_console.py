"""The operator console over HTTP (Starlette's TestClient): the token, sessions, CSRF, read-only
mode, every page with real records, and what the node leaves for it to read."""

from __future__ import annotations

import os
import re
import sys

import pytest
from starlette.testclient import TestClient

from helpers.data import write_blobs_csv
from helpers.plans import TinyPlan
from meshfl.console import _views, create_app
from meshfl.console._app import _exposure_warning
from meshfl.console._chart import budget_chart, line_chart
from meshfl.errors import ConfigError, MeshflError
from meshfl.home import Home
from meshfl.node._datasets import DatasetRegistry
from meshfl.node._plans import PlanRegistry
from meshfl.node._presence import NodeLock, links, running_node
from meshfl.node._release import open_release
from meshfl.privacy import PolicyTable
from meshfl.store import TaskQueue
from meshfl.researcher import Experiment
from meshfl.testing import FederatedMesh

TOKEN = "t" * 32
OLD = "class Plan:\n    def train(self):\n        return 1\n"
NEW = "class Plan:\n    def train(self):\n        return 2\n"


@pytest.fixture
def home(tmp_path):
    lab = Home.init(tmp_path / "lab", "researcher", "lab", listen="ipc:///tmp/unused.sock")
    with Home.init(tmp_path / "node", "node", "site-a") as home:
        home.trust(lab.identity.card, "tcp://127.0.0.1:5555")
        lab.close()
        csv = write_blobs_csv(tmp_path / "blobs.csv", n=40)
        DatasetRegistry(home.store, home.audit).add("blobs", ["blobs", "tabular"], "csv", csv, target="target")
        plans = PlanRegistry(home.store, home.audit)
        plans.approve(plans.submit(OLD, name="Plan")["hash"], by="ann")
        plans.submit(NEW, name="Plan", requester=lab.identity.peer_id)
        yield home


def client(home, **options) -> TestClient:
    options.setdefault("by", "bob")
    return TestClient(create_app(home, token=TOKEN, **options))


def logged_in(home, **options) -> TestClient:
    return login(client(home, **options))


def login(c: TestClient) -> TestClient:
    assert c.get(f"/?token={TOKEN}").status_code == 200
    return c


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def pending(home) -> dict:
    return PlanRegistry(home.store, home.audit).list("pending")[0]


def hold(home, task_id: str, mechanism: list | None = None) -> None:
    """A finished task of `blobs` whose result its policy holds, through the node's release step
    (a DP task's cost set aside when accepted, as the node does)."""
    researcher = next(e["peer_id"] for e in home.trusted())
    privacy = {"mechanism": mechanism} if mechanism else None
    queue = TaskQueue(home.store, "tasks")
    queue.push({"experiment": "exp-1", "round": 2, "researcher": researcher, "dataset": "blobs",
                "plan_hash": pending(home)["hash"], "privacy": privacy, "secagg": None}, task_id)
    task = queue.claim()
    release = open_release(home)
    if privacy:
        release.ledger.reserve(task_id, "blobs", mechanism)
    fields = {"task_id": task_id, "experiment": "exp-1", "round": 2, "ok": True, "samples": 40}
    review = {"metrics": {"loss": 0.25}, "samples": 40, "duration": 0.5, "update_norm": 1.5}
    held, _ = release.finish(task, fields, {"layout": [["fc.weight", "float32", [2, 3], 24]]}, review)
    assert held


def test_every_request_needs_the_token_or_a_session(home):
    c = client(home)
    for path in ("/", "/plans", "/audit", "/no-such-page"):
        assert c.get(path).status_code == 403
    assert c.post(f"/plans/{pending(home)['hash']}/approve", data={"csrf": "x"}).status_code == 403
    wrong = c.get("/?token=" + "u" * 32, follow_redirects=False)
    assert wrong.status_code == 403 and "set-cookie" not in wrong.headers
    # The right token: a session cookie, and a redirect that drops the token from the address.
    login = c.get(f"/audit?event=plan.&token={TOKEN}", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/audit?event=plan."
    sneaky = c.get(f"http://testserver//elsewhere.example/x?token={TOKEN}", follow_redirects=False)
    assert sneaky.headers["location"] == "/elsewhere.example/x"  # a path here, never another host
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = c.get("/plans")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script" not in csp  # no script may run at all
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    forger = client(home)
    forger.cookies.set(c.app.user_middleware[0].kwargs["guard"].cookie, "forged")
    assert forger.get("/plans").status_code == 403


def test_pages_show_the_homes_records(home):
    c = logged_in(home)
    overview = c.get("/").text
    assert "site-a" in overview and home.identity.peer_id in overview
    assert "not running" in overview and "never connected" in overview  # no node process here
    assert "Plan approval" in overview and "records verify" in overview
    assert "Plan sandbox on this machine" in overview and "Memory cap" in overview
    datasets = c.get("/datasets").text
    assert "blobs" in datasets and "x0" in datasets and "target" in datasets
    assert "every trusted researcher" in datasets and "released at once" in datasets and "no budget" in datasets
    plans = c.get("/plans").text
    digest = pending(home)["hash"]
    assert plans.index(digest[:16]) < plans.index(">approved</span>")  # pending first
    assert "+1 -1 against" in plans and "lab" in plans  # the requester by its trusted name
    page = c.get(f"/plans/{digest[:10]}").text
    assert '<span class="d-del">-        return 1</span>' in page
    assert '<span class="d-add">+        return 2</span>' in page
    assert 'class="source"' in page and "Approve as bob" in page and "Reject as bob" in page
    assert "No result awaits your review" in c.get("/results").text
    assert c.get("/plans/" + "0" * 16).status_code == 404
    assert c.get("/experiments/exp-x").status_code == 404  # a researcher's page


def test_an_action_needs_its_sessions_csrf_token_and_is_audited_with_who(home):
    c = logged_in(home)
    other = login(TestClient(c.app))  # another browser: another session of the same console
    digest = pending(home)["hash"]
    token = csrf_of(c.get(f"/plans/{digest}").text)
    url = f"/plans/{digest}/approve"
    for data in ({}, {"csrf": ""}, {"csrf": "forged"}, {"csrf": csrf_of(other.get(f"/plans/{digest}").text)}):
        assert c.post(url, data=data).status_code == 403
    assert c.post(url, content=f"csrf={token}", headers={"content-type": "text/plain"}).status_code == 403
    assert c.get(url).status_code == 405  # GET never acts
    assert PlanRegistry(home.store, home.audit).status(digest) == "pending"
    done = c.post(url, data={"csrf": token}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/plans/{digest}?done=approved"
    record = PlanRegistry(home.store, home.audit).get(digest)
    assert (record["status"], record["decided_by"]) == ("approved", "bob")
    head = home.audit.head()
    assert (head.event, head.fields["hash"], head.fields["by"]) == ("plan.approved", digest, "bob")
    assert "Plan approved by bob" in c.get(done.headers["location"]).text
    assert c.post(f"/plans/{digest}/reject", data={"csrf": token}).status_code == 200
    assert PlanRegistry(home.store, home.audit).status(digest) == "rejected"
    assert c.post(f"/plans/{digest}/delete", data={"csrf": token}).status_code == 404


def test_read_only_console_shows_no_buttons_and_refuses_every_action(home):
    c = logged_in(home, read_only=True)
    digest = pending(home)["hash"]
    page = c.get(f"/plans/{digest}").text
    assert "read-only" in page and "<form" not in page.split("<h2>Changes")[0]
    assert c.post(f"/plans/{digest}/approve", data={"csrf": "anything"}).status_code == 403
    assert PlanRegistry(home.store, home.audit).status(digest) == "pending"
    PolicyTable(home.store, home.audit).set("blobs", review=True)
    hold(home, "t-held")
    results = c.get("/results").text
    assert "t-held" in results and "<form" not in results
    for action in ("release", "deny"):
        assert c.post(f"/results/t-held/{action}", data={"csrf": "anything"}).status_code == 403
    assert [item.msg_id for item in open_release(home).outbox.held()] == ["t-held"]


def test_held_results_show_what_would_leave_and_release_or_deny_is_audited_with_who(home, monkeypatch):
    PolicyTable(home.store, home.audit).set("blobs", review=True, epsilon=20.0, by="ann")
    hold(home, "t-private", mechanism=[1.0, 1.0, 1])  # client-level DP at noise 1
    hold(home, "t-queued", mechanism=[1.0, 1.0, 1])  # its cost set aside too
    hold(home, "t-plain")
    c = logged_in(home)
    assert "3 result(s) await your review" in c.get("/").text
    datasets = c.get("/datasets").text
    assert 'class="budget"' in datasets and "released after review" in datasets
    assert "epsilon 20" in datasets and "ledger: 0 released result(s) debited" in datasets
    page = c.get("/results").text
    digest = pending(home)["hash"]
    private = page.split('id="held-1"')[1].split("</section>")[0]
    assert "t-private" in private and "lab" in private and "blobs" in private and f"/plans/{digest}" in private
    assert "loss=0.25" in private and "1.5" in private and "fc.weight float32[2, 3]" in private
    shown = float(re.search(r"epsilon <b>([\d.]+)</b>", private).group(1))
    assert 4 < shown < 5.5 and "of the dataset's budget of 20.0" in private  # about 4.7 at delta 1e-5
    assert "not a differentially private task" in page.split('id="held-3"')[1]
    assert page.count("Release as bob") == 3 and page.count("Deny as bob") == 3
    token = csrf_of(page)
    for data in ({}, {"csrf": "forged"}):
        assert c.post("/results/t-private/release", data=data).status_code == 403
    assert c.get("/results/t-private/release").status_code == 405
    assert len(open_release(home).outbox.held()) == 3

    done = c.post("/results/t-private/release", data={"csrf": token}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/results?done=released&task=t-private&nudged=0"
    head = home.audit.head()
    assert (head.event, head.fields["task"], head.fields["by"]) == ("result.released", "t-private", "bob")
    assert f"{head.fields['epsilon']:.4g}" == f"{shown:.4g}"  # the cost shown is what the ledger debits
    assert "Result <code>t-private</code> released by bob" in c.get(done.headers["location"]).text
    assert "ledger: 1 released result(s) debited" in c.get("/datasets").text
    assert c.post("/results/t-plain/deny", data={"csrf": token}).status_code == 200
    head = home.audit.head()
    assert (head.event, head.fields["task"], head.fields["by"]) == ("result.denied", "t-plain", "bob")
    # The budget lowered below what a release would reach: releasing withholds it instead.
    PolicyTable(home.store, home.audit).set("blobs", epsilon=shown + 0.1, by="ann")
    withheld = c.post("/results/t-queued/release", data={"csrf": token})
    assert "was not released" in withheld.text and home.audit.head().event == "result.withheld"
    page = c.get("/results").text
    assert "No result awaits your review" in page
    outbox = page.split('id="outbox"')[1]  # all three now wait for their researcher's acknowledgement
    assert "t-private" in outbox and outbox.count("result_denied") == 1 and "privacy_budget_exhausted" in outbox
    assert c.post("/results/t-plain/release", data={"csrf": token}).status_code == 404  # decided already
    assert c.post("/results/t-plain/delete", data={"csrf": token}).status_code == 404
    # A console without Opacus cannot read a spent budget's epsilon: an error page that says so.
    monkeypatch.setitem(sys.modules, "opacus.accountants.analysis.rdp", None)
    missing = c.get("/datasets")
    assert missing.status_code == 500 and "pip install &#39;meshfl[dp]&#39;" in missing.text


def test_audit_page_filters_newest_first_and_reports_tampering(home):
    c = logged_in(home)
    page = c.get("/audit?event=plan.approved").text
    assert "Chain verified" in page and page.count("<code>plan.approved</code>") == 1
    family = _views.audit_page(home, "plan.")
    assert [r.event for r in family["records"]] == ["plan.submitted", "plan.approved", "plan.submitted"]
    everything = _views.audit_page(home, limit=3)
    indexes = [r.index for r in everything["records"]]
    assert indexes == sorted(indexes, reverse=True) and everything["older"] == indexes[-1]
    older = _views.audit_page(home, before=everything["older"], limit=3)
    assert older["records"][0].index == indexes[-1] - 1
    assert c.get("/audit?before=x").status_code == 400
    table = home.store.table("audit")
    key, record = table.items()[1]
    record["fields"]["name"] = "someone-else"
    table.put(key, record)
    assert "Chain broken at record 1" in c.get("/audit").text
    assert "BROKEN at record 1" in c.get("/").text


def test_researcher_home_shows_experiments_curves_and_reloads_while_one_runs(tmp_path):
    with FederatedMesh(2, root=tmp_path / "mesh") as mesh:
        for i, node in enumerate(mesh.nodes):
            path = write_blobs_csv(node.home.path / "blobs.csv", n=40, seed=i)
            node.datasets.add("blobs", ["blobs"], "csv", path, target="target")
        mesh.approve(TinyPlan)
        exp = Experiment(mesh.researcher, TinyPlan, ["blobs"], 2, min_nodes=2, round_timeout=60, progress=False)
        exp.run()
        home = mesh.researcher.home
        c = logged_in(home)
        listing = c.get("/").text
        assert exp.id in listing and "finished" in listing and 'http-equiv="refresh"' not in listing
        page = c.get(f"/experiments/{exp.id}").text
        assert page.count('<svg xmlns="http://www.w3.org/2000/svg" class="chart"') >= 2  # one per metric
        assert page.count("<polyline") >= 6 and "node0" in page and "node1" in page
        assert page.count('<span class="badge b-ok">ok</span>') == 4  # 2 rounds x 2 nodes
        assert c.get("/datasets").status_code == 404  # a node's page
        # An experiment still going (its record says 2 of 5): the pages reload themselves.
        record = home.store.table("experiments").get(exp.id)
        home.store.table("experiments").put(exp.id, {**record, "rounds": 5})
        assert 'http-equiv="refresh"' in c.get(f"/experiments/{exp.id}").text
        # One whose last run failed says so, with the error, and does not reload.
        home.audit.append("experiment.failed", experiment=exp.id, round=3, error="round_failed",
                          message="round 3: 0 of 2 nodes contributed")
        failed = c.get(f"/experiments/{exp.id}").text
        assert "round 3: 0 of 2 nodes contributed" in failed and 'http-equiv="refresh"' not in failed


def test_the_running_node_leaves_its_lock_and_links_for_the_console(tmp_path):
    with FederatedMesh(1, root=tmp_path / "mesh") as mesh:
        node = mesh.nodes[0]
        running = running_node(node.home.path)
        assert running["pid"] == os.getpid() and running["dev"] is False
        with pytest.raises(ConfigError) as second:
            NodeLock(node.home.path)
        assert second.value.code == "node_running"
        (researcher_link,) = links(node.home.store).values()
        assert researcher_link["up"] is True
        overview = _views.node_overview(node.home)
        assert [p["online"] for p in overview["peers"] if p["endpoint"]] == [True]
        path = node.home.path
    assert running_node(path) is None
    NodeLock(path).release()  # free again once the node stopped


def test_a_node_started_with_dev_shows_plan_approval_off_whatever_its_config_says(home):
    assert home.config.dev is False
    lock = NodeLock(home.path, dev=True)  # what `meshfl node start --dev` holds while it runs
    try:
        overview = logged_in(home).get("/").text
        assert "Development mode:" in overview and f"pid {os.getpid()}" in overview
        approval = _views.node_overview(home)["protections"][0]
        assert (approval["name"], approval["on"]) == ("Plan approval", False)
    finally:
        lock.release()
    assert _views.node_overview(home)["protections"][0]["on"] is True


def test_chart_draws_each_series_and_escapes_names():
    svg = line_chart("loss <b>", {"global": [(1, 0.5), (2, 0.25)], "<node>": [(1, float("nan")), (2, 0.3)]},
                     emphasis="global")
    assert svg.count("<polyline") == 1 and svg.count("<circle") == 3  # NaN left out, one point alone
    assert "<b>" not in svg and "&lt;node&gt;" in svg and 'stroke-width="3"' in svg
    assert "no values yet" in line_chart("empty", {"global": []})


def test_budget_chart_splits_the_budget_and_marks_one_lowered_below_its_spending():
    svg = budget_chart({"epsilon": 8.0, "delta": 1e-5, "spent": 2.0, "reserved": 1.0, "left": 5.0})
    widths = [float(w) for w in re.findall(r'<rect x="[\d.]+" y="16" width="([\d.]+)" height="14" fill', svg)]
    assert widths == pytest.approx([2 / 8 * 218, 1 / 8 * 218, 5 / 8 * 218], abs=0.1)  # spent, queued, left
    assert "<line" not in svg and "spent 2" in svg and "left 5" in svg
    over = budget_chart({"epsilon": 2.0, "delta": 1e-5, "spent": 4.0, "reserved": 0.0, "left": 0.0})
    assert over.count('fill="#') == 4 and '<line x1="110.0"' in over  # one bar segment; the budget's mark at half


def test_binding_beyond_loopback_warns():
    assert _exposure_warning("127.0.0.1") is None and _exposure_warning("::1") is None
    assert _exposure_warning("localhost") is None
    assert "plain HTTP" in _exposure_warning("0.0.0.0") and "SSH tunnel" in _exposure_warning("192.0.2.7")


def test_a_missing_extra_is_a_coded_error_naming_it(monkeypatch):
    for name in [m for m in sys.modules if m == "meshfl.console" or m.startswith("meshfl.console.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "starlette", None)
    with pytest.raises(MeshflError) as missing:
        import meshfl.console  # noqa: F401
    assert missing.value.code == "missing_dependency" and "pip install meshfl[console]" in missing.value.message
