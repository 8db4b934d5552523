"""The operator console in a real headless Chromium, against real node and console processes.

The node (`meshfl node start`), its console (`meshfl node console`) and the researcher's console
are separate processes sharing LMDB homes, as an operator runs them; the researcher runs in this
process. Everything listens on loopback (the consoles) or ipc (the mesh), and Chromium runs with
its background networking off. A screenshot of each page goes to the folder printed (by default
.artifacts/console in the repository, or $MESHFL_ARTIFACTS/console).

Needs Playwright for Python (the dev extra) and Debian's chromium (.ci/run installs it): in CI
(CI set) a missing one fails the test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.plans import TinyPlan
from helpers.procs import make_homes, start_console, start_node, stop
from helpers.waiting import wait_until
from meshfl.home import Home
from meshfl.node._datasets import DatasetRegistry
from meshfl.node._plans import plan_hash
from meshfl.plans import plan_source
from meshfl.privacy import PolicyTable
from meshfl.researcher import Experiment, Researcher, RoundFailed

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("MESHFL_ARTIFACTS", Path(__file__).parents[1] / ".artifacts")) / "console"


@pytest.fixture(scope="module")
def browser():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("Playwright for Python (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append("Debian's chromium (apt-get install chromium)")
    if missing:
        reason = "the browser tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason)  # never a silent skip in CI
        pytest.skip(reason)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots in {ARTIFACTS}")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _experiment(researcher, source: str, rounds: int = 1, **kw) -> Experiment:
    return Experiment(researcher, source, ["blobs"], rounds, plan_class="TinyPlan", min_nodes=2,
                      training_args={"epochs": 2, "lr": 0.05}, round_timeout=60, progress=False, **kw)


def _meshfl(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "meshfl.cli", *args], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_operator_approves_a_plan_and_releases_a_held_result_in_the_browser(tmp_path, browser):
    r_path, n_paths = make_homes(tmp_path, 2, plan=TinyPlan)  # the old plan is approved on both
    changed = plan_source(TinyPlan).replace(
        "return nn.Linear(features, classes)",
        "return nn.Sequential(nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, classes))")
    digest = plan_hash(changed)
    nodes = [start_node(path) for path in n_paths]
    console, url = start_console(n_paths[0], "--by", "dr. console")
    base = url.split("?")[0]
    researcher = Researcher(r_path).start()
    lab_console = None
    try:
        researcher.wait_for_nodes(2, timeout=60)
        # The researcher sends a changed plan: refused, and told what the operators must do.
        with pytest.raises(RoundFailed) as refused:
            _experiment(researcher, changed).run()
        message = str(refused.value)
        assert f"meshfl plan show {digest} --diff" in message and f"meshfl plan approve {digest}" in message

        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        assert page.goto(url).status == 200  # the token logs in and is dropped from the address
        assert page.url == base
        assert "node0" in page.inner_text("h1")
        assert "online" in page.inner_text("#peers")

        page.click("nav >> text=Plans")
        first_row = page.locator("main table tr").nth(1)
        assert "pending" in first_row.inner_text() and "+1 -1 against" in first_row.inner_text()
        _shot(page, "plans")
        first_row.locator("a").click()
        assert page.url == f"{base}plans/{digest}"
        assert "nn.Linear(features, classes)" in page.inner_text(".d-del")
        assert "nn.ReLU()" in page.inner_text(".d-add")
        _shot(page, "plan-pending")
        page.click("text=Approve as dr. console")
        assert "Plan approved by dr. console" in page.inner_text(".flash")
        _shot(page, "plan-approved")
        # The other site's operator uses the CLI: the same code path, while its node runs.
        _meshfl("plan", "approve", digest, "--home", str(n_paths[1]), "--by", "dr. cli")

        # The running nodes take the decisions at once: the same plan now trains.
        exp = _experiment(researcher, changed, rounds=4)
        history = exp.run()
        assert [sorted(entry["nodes"]) for entry in history] == [["node0", "node1"]] * 4

        page.click("nav >> text=Overview")
        assert "4 done" in page.inner_text(".legend")  # one task per round on this node
        # Node0's operator wants to see each result of its data first (and keeps a privacy budget on
        # another dataset): the round waits until the result is released here.
        with Home.open(n_paths[0]) as home:  # as `meshfl dataset policy NAME --review` (--budget 8) does
            PolicyTable(home.store, home.audit).set("blobs", review=True, by="dr. console")
            DatasetRegistry(home.store, home.audit).add("records", ["records"], "csv", n_paths[0] / "blobs.csv",
                                                        target="target")
            PolicyTable(home.store, home.audit).set("records", epsilon=8.0, by="dr. console")
        reviewed_exp = _experiment(researcher, changed)
        pool = ThreadPoolExecutor(1)
        reviewed = pool.submit(reviewed_exp.run)
        try:
            page.click("nav >> text=Results awaiting release")
            release = page.locator("text=Release as dr. console")
            assert wait_until(lambda: page.reload() and release.count() == 1, timeout=60)
            held = page.inner_text("section.held")
            assert reviewed_exp.id in held and digest in held and "update norm" in held
            assert not reviewed.done()
            _shot(page, "results")
            page.click("nav >> text=Overview")
            assert "1 result(s) await your review" in page.inner_text("main")
            assert "No network" in page.inner_text("#sandbox")
            _shot(page, "overview")
            page.click("nav >> text=Results awaiting release")
            release.click()
            assert "released by dr. console; the running node was told at once" in page.inner_text(".flash")
            history = reviewed.result(timeout=60)
        finally:
            pool.shutdown()
        assert sorted(history[0]["nodes"]) == ["node0", "node1"]
        page.click("nav >> text=Datasets")
        table = page.inner_text("main table")
        assert "released after review" in table and "epsilon 8, delta 1e-05" in table
        assert page.locator("svg.budget").count() == 1
        _shot(page, "datasets")

        page.click("nav >> text=Audit")
        page.select_option("select[name=event]", "plan.approved")
        page.click("text=Filter")
        rows = page.locator("main table tr")
        assert rows.count() == 3  # header, the console's approval, the set-up's
        assert "by=dr. console" in rows.nth(1).inner_text() and digest in rows.nth(1).inner_text()
        assert "Chain verified" in page.inner_text(".flash")
        _shot(page, "audit")
        page.select_option("select[name=event]", "result.released")
        page.click("text=Filter")
        rows = page.locator("main table tr")  # newest first: the console's release, then the 4 rounds' own
        assert "by=dr. console" in rows.nth(1).inner_text() and "by=auto" in rows.nth(2).inner_text()

        # An action without the session's CSRF token is refused, and changes nothing.
        for form in ({}, {"csrf": "forged"}):
            assert page.request.post(f"{base}plans/{digest}/reject", form=form).status == 403
        page.goto(f"{base}plans/{digest}")
        assert "approved" in page.inner_text("h1 .badge")

        # No token, or a wrong one: 403 on every page.
        stranger = browser.new_context().new_page()
        for address in (base, f"{base}plans", f"{base}?token=wrong", f"{base}plans/{digest}"):
            assert stranger.goto(address).status == 403, address
        assert stranger.request.post(f"{base}plans/{digest}/reject", form={}).status == 403

        # The researcher's home: its experiments, rounds, participation and metric curves.
        lab_console, lab_url = start_console(r_path)
        page.goto(lab_url)
        _shot(page, "experiments")
        page.click(f"text={exp.id}")
        assert page.locator("svg.chart polyline").count() >= 3  # global + 2 nodes, per metric
        assert page.inner_text("#participation").count("ok") == 8
        _shot(page, "experiment")
        # The warning a node operator sees without -v: which plan waits, and how to review it.
        log = (n_paths[0] / "node.log").read_text()
        assert f"training plan {digest} from researcher awaits approval" in log
        assert f"meshfl plan show {digest} --diff" in log
        assert stop(lab_console) == 0 and stop(console) == 0  # SIGTERM: a clean, quiet stop
    finally:
        researcher.close()
        for proc in (lab_console, console, *nodes):
            if proc is not None:
                stop(proc)
