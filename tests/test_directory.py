"""The dataset directory (#17 §1): signed publication, verified search, access requests.

One directory, one node and two researchers in this process (real homes, LMDB, CURVE over
loopback tcp); the CLI round trip runs the directory and the node as processes.
"""

from __future__ import annotations

import logging

import orjson
import pytest

from helpers.data import write_blobs_csv
from helpers.plans import TinyPlan
from helpers.waiting import wait_until
from meshfl.directory import ENTRY, REQUEST, Directory, Publications, decide, verify
from meshfl.errors import ConfigError
from meshfl.home import Home
from meshfl.node import Node
from meshfl.node._plans import plan_hash
from meshfl.plans import plan_source
from meshfl.researcher import Experiment, Researcher

pytestmark = pytest.mark.timeout(120)

TIMING = {"heartbeat": 0.3, "dead_after": 3.0}
LOOPBACK = "tcp://127.0.0.1:0"


def _researcher(root, name, directory):
    home = Home.init(root / name, "researcher", name, listen=LOOPBACK, **TIMING)
    home.trust(directory.home.identity.card, directory.endpoint, directory=True)
    directory.home.trust(home.identity.card)  # the directory's operator admits it
    directory.home.trust_into(directory.peer)  # at once (a running directory reads it every 2 s)
    return Researcher(home).start()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("directory")
    directory = Directory(Home.init(root / "dir", "directory", "dir", listen=LOOPBACK, **TIMING)).start()
    node_home = Home.init(root / "site", "node", "site", **TIMING)
    node_home.trust(directory.home.identity.card, directory.endpoint, directory=True)
    directory.home.trust(node_home.identity.card)
    directory.home.trust_into(directory.peer)
    csv = write_blobs_csv(root / "site" / "blobs.csv", n=60)
    from meshfl.node._datasets import DatasetRegistry

    DatasetRegistry(node_home.store, node_home.audit).add("blobs", ["blobs", "tabular"], "csv", csv,
                                                         target="target", description="two blobs")
    DatasetRegistry(node_home.store, node_home.audit).add("private", ["blobs"], "csv", csv, target="target")
    Publications(node_home).publish("blobs", "dir")  # "private" stays unpublished
    node = Node(node_home).start()
    node.plans.submit(plan_source(TinyPlan))
    node.plans.approve(plan_hash(plan_source(TinyPlan)))
    alice = _researcher(root, "alice", directory)
    bob = _researcher(root, "bob", directory)
    world = {"root": root, "directory": directory, "node": node, "alice": alice, "bob": bob, "csv": csv}
    yield world
    for researcher in (alice, bob):
        researcher.close()
    node.stop()
    directory.stop()


def _found(researcher, tags=("blobs",)):
    found = {}

    def some():
        found.update(researcher.search(list(tags), directories=[]))
        return found

    assert wait_until(some, timeout=20), "the node's publication never reached the directory"
    return found


def test_published_datasets_are_found_verified_and_without_paths(world):
    alice, node, directory = world["alice"], world["node"], world["directory"]
    found = _found(alice)
    [entry] = found[node.peer.peer_id]
    assert entry["name"] == "blobs" and entry["samples"] == 60 and entry["description"] == "two blobs"
    assert entry["node_name"] == "site" and entry["card"] == node.home.identity.card.to_text()
    assert entry["columns"] and entry["shape"] == [60, 4] and entry["directory"] == directory.peer.peer_id
    # Never a path: not in what the researcher gets, nor in what the directory stores.
    assert str(world["csv"]) not in orjson.dumps(found).decode()
    assert all(str(world["root"]) not in orjson.dumps(row).decode() for _, row in directory.entries.items())
    assert alice.search(["nothing-like-it"], directories=["dir"]) == {}
    assert alice.nodes() == []  # the directory is no node, and the node does not trust alice yet
    events = [r.event for r in directory.home.audit.records()]
    assert "entries.published" in events and "entries.searched" in events
    assert "directory.published" in [r.event for r in node.home.audit.records()]


def test_an_entry_the_directory_alters_is_dropped_with_a_warning(world, caplog):
    alice, directory = world["alice"], world["directory"]
    _found(alice)
    [(key, row)] = directory.entries.items()
    forged = row["doc"]["body"].replace('"samples":60', '"samples":6000')
    assert forged != row["doc"]["body"]
    directory.entries.put(key, {**row, "doc": {**row["doc"], "body": forged}})
    try:
        with caplog.at_level(logging.WARNING, logger="meshfl.directory"):
            assert alice.search(["blobs"], directories=["dir"]) == {}
        assert any("does not verify" in r.getMessage() for r in caplog.records)
    finally:
        directory.entries.put(key, row)
    assert alice.search(["blobs"], directories=["dir"])  # the genuine entry verifies again


def test_signed_documents_resist_forgery():
    from meshfl.crypto import Identity
    from meshfl.directory._signed import entry_for, request_for, sign
    from meshfl.errors import CryptoError

    node, other = Identity.generate("site"), Identity.generate("other")
    record = {"name": "blobs", "tags": ["blobs"], "samples": 60, "path": "/secret/blobs.csv"}
    entry = entry_for(node, record, published=1.0)
    body = verify(entry, ENTRY)
    assert body["dataset"] == "blobs" and body["card"] == node.card and "/secret" not in entry["body"]
    altered = {**entry, "body": entry["body"].replace('"samples":60', '"samples":61')}
    text = orjson.loads(entry["body"])
    swapped = {**entry, "body": orjson.dumps({**text, "card": other.card.to_text(), "node": other.peer_id},
                                             option=orjson.OPT_SORT_KEYS).decode()}
    foreign = {**entry, "body": orjson.dumps({**text, "node": other.peer_id}, option=orjson.OPT_SORT_KEYS).decode()}
    for bad, code in ((altered, "bad_signature"), (swapped, "bad_signature"), (foreign, "bad_document"),
                      ({"body": "[]", "sig": ""}, "bad_document"), ("junk", "bad_document")):
        with pytest.raises(CryptoError) as err:
            verify(bad, ENTRY)
        assert err.value.code == code
    # A signature for one kind of document never passes for another.
    request = request_for(other, node.peer_id, "blobs", "tcp://lab:5555")
    assert verify(request, REQUEST)["researcher"] == other.peer_id
    relabelled = sign(other, ENTRY, {"dataset": "blobs"})
    with pytest.raises(CryptoError):
        verify({**relabelled, "sig": request["sig"]}, ENTRY)
    with pytest.raises(CryptoError):
        verify(request, ENTRY)


def test_unpublishing_withdraws_the_entry(world):
    node, directory, alice = world["node"], world["directory"], world["alice"]
    _found(alice)
    publications = Publications(node.home)
    publications.unpublish("blobs")
    node.notify_released()
    assert wait_until(lambda: len(directory.entries) == 0, timeout=10)
    assert alice.search(["blobs"], directories=[]) == {}
    publications.publish("blobs", "dir")
    node.notify_released()
    assert _found(alice)[node.peer.peer_id][0]["name"] == "blobs"
    assert {"dataset.unpublished", "dataset.published"} <= {r.event for r in node.home.audit.records()}


def test_access_approved_lets_the_researcher_search_and_train(world):
    alice, node, directory = world["alice"], world["node"], world["directory"]
    [entry] = _found(alice)[node.peer.peer_id]
    queued = alice.request_access(entry, message="for a study of blobs")
    assert queued["status"] == "pending"
    access = node.directories.access
    assert wait_until(lambda: access.list("pending"), timeout=10), "the request never reached the node"
    [request] = access.list("pending")
    assert request["researcher"] == alice.peer.peer_id and request["endpoint"] == alice.endpoint
    assert request["dataset"] == "blobs" and request["message"] == "for a study of blobs"
    decided = decide(node.home, request["id"], True, by="test")
    assert decided["status"] == "approved"
    node.notify_released()  # what SIGUSR1 (nudge_node) does for a node run by `meshfl node start`
    alice.wait_for_nodes(1, timeout=15)
    # Trusted now, alice sees what any trusted researcher sees (dataset policies can narrow it).
    assert [r["name"] for r in alice.search(["blobs"])[node.peer.peer_id]] == ["blobs", "private"]
    history = Experiment(alice, TinyPlan, ["blobs", "tabular"], 1, training_args={"epochs": 1, "lr": 0.05},
                         round_timeout=60, min_nodes=1, progress=False).run()
    assert set(history[-1]["nodes"]) == {"site"} and history[-1]["samples"] == 48
    # The directory is told, and every step is in both audit chains.
    assert wait_until(lambda: [r["status"] for r in alice.access_requests()] == ["approved"], timeout=10)
    node_events = [r.event for r in node.home.audit.records()]
    assert {"access.received", "access.approved", "peer.trust"} <= set(node_events)
    assert {"access.requested", "peer.trust"} <= {r.event for r in alice.home.audit.records()}
    dir_events = [r.event for r in directory.home.audit.records()]
    assert {"access.requested", "access.delivered", "access.decided"} <= set(dir_events)


def test_access_denied_gives_nothing(world):
    bob, node = world["bob"], world["node"]
    [entry] = _found(bob)[node.peer.peer_id]
    rid = bob.request_access(entry)["id"]
    assert wait_until(lambda: [r["id"] for r in node.directories.access.list("pending")] == [rid], timeout=10)
    decide(node.home, rid, False, by="test")
    node.notify_released()
    assert wait_until(lambda: [r["status"] for r in bob.access_requests()] == ["denied"], timeout=10)
    assert bob.peer.peer_id not in node.peer.trust_table and bob.nodes() == []
    assert "access.denied" in [r.event for r in node.home.audit.records()]


def test_a_directory_whose_key_the_node_does_not_trust_gets_nothing(world):
    """An impostor at a directory's address (another key) gets no entry from the node, and a
    researcher cannot search a directory it was not told to trust."""
    root, node, alice = world["root"], world["node"], world["alice"]
    expected = Home.init(root / "dir-b", "directory", "dir-b", listen=LOOPBACK)
    impostor = Directory(Home.init(root / "impostor", "directory", "impostor", listen=LOOPBACK, **TIMING)).start()
    impostor.home.trust(node.home.identity.card)  # it would take whatever the node sent
    try:
        node.home.trust(expected.identity.card, impostor.endpoint, directory=True)
        Publications(node.home).publish("blobs", "dir-b")
        node.notify_released()
        assert wait_until(lambda: expected.identity.peer_id in node.peer.trust_table, timeout=10)
        assert not node.peer.wait_online([expected.identity.peer_id], 2.0)  # CURVE: the key is not dir-b's
        assert len(impostor.entries) == 0 and len(impostor.requests) == 0
    finally:
        node.peer.revoke(expected.identity.peer_id)
        Publications(node.home).unpublish("blobs", "dir-b")
        node.home.revoke("dir-b")
        impostor.stop()
        expected.close()
    with pytest.raises(ConfigError, match="no trusted directory 'impostor'"):
        alice.search(["blobs"], directories=["impostor"])


def _cli(*args):
    from click.testing import CliRunner

    from meshfl.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return orjson.loads(result.stdout) if "--json" in args else result.stdout


def test_cli_round_trip(tmp_path):
    """As operators would: a directory and a node as processes, the researcher's side from the CLI."""
    import subprocess
    import sys

    from helpers.procs import start_node, stop

    dir_home, node_home, lab_home = tmp_path / "dir", tmp_path / "site", tmp_path / "lab"
    dir_at, lab_at = f"ipc://{tmp_path}/dir.sock", f"ipc://{tmp_path}/lab.sock"
    cards = {}
    for home, role, listen in ((dir_home, "directory", dir_at), (node_home, "node", None), (lab_home, "researcher", lab_at)):
        cards[role] = _cli("init", "--home", home, "--role", role, "--name", home.name,
                           *(["--listen", listen] if listen else []), "--json")["card"]
    _cli("peer", "trust", "--home", dir_home, "--key", cards["node"])
    _cli("peer", "trust", "--home", dir_home, "--key", cards["researcher"])
    for home in (node_home, lab_home):
        _cli("peer", "trust", "--home", home, "--key", cards["directory"], "--endpoint", dir_at, "--directory")
    assert "(directory)" in _cli("peer", "list", "--home", node_home)
    csv = write_blobs_csv(node_home / "blobs.csv", n=40)
    _cli("dataset", "add", "--home", node_home, "--name", "blobs", "--tags", "blobs", "--format", "csv",
         "--path", csv, "--target", "target")
    assert _cli("dataset", "publish", "blobs", "--home", node_home, "--directory", "dir", "--json")["directories"] == ["dir"]
    log = open(tmp_path / "dir.log", "ab")
    directory = subprocess.Popen([sys.executable, "-m", "meshfl.cli", "-v", "directory", "start", "--home", str(dir_home)],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    node = start_node(node_home)
    try:
        search = ("directory", "search", "--home", lab_home, "--tags", "blobs", "--json")
        assert wait_until(lambda: _cli(*search), timeout=60), (node_home / "node.log").read_text()[-3000:]
        [entry] = _cli(*search)
        assert entry["name"] == "blobs" and entry["samples"] == 40 and entry["node_name"] == "site"
        listed = _cli("directory", "entries", "--home", dir_home, "--json")
        assert [(e["dataset"], e["verified"]) for e in listed] == [("blobs", True)]
        queued = _cli("access", "request", "--home", lab_home, "--node", entry["node"], "--dataset", "blobs",
                      "--endpoint", lab_at, "--message", "hello", "--json")
        assert wait_until(lambda: _cli("access", "list", "--home", node_home, "--status", "pending", "--json"), timeout=20)
        [pending] = _cli("access", "list", "--home", node_home, "--json")
        assert pending["id"] == queued["id"] and pending["name"] == "lab" and pending["endpoint"] == lab_at
        status = _cli("node", "status", "--home", node_home, "--json")
        assert status["access_pending"] == 1 and status["published"] == [
            {"dataset": "blobs", "directories": ["dir"], "since": status["published"][0]["since"]}]
        assert _cli("access", "approve", queued["id"], "--home", node_home, "--json")["status"] == "approved"
        assert wait_until(lambda: [r["status"] for r in _cli("access", "list", "--home", lab_home, "--json")]
                          == ["approved"], timeout=20)
        assert "lab" in _cli("peer", "list", "--home", node_home)
        with Researcher(lab_home) as lab:
            [node_id] = lab.wait_for_nodes(1, timeout=20)
            assert node_id == entry["node"] and lab.ping(node_id)["name"] == "site"
    finally:
        stop(node)
        stop(directory)
        log.close()
