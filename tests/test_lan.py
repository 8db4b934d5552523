"""LAN discovery with pinned keys (#17 §3): the records, fingerprints and pins as pure functions,
then one real mDNS exchange over loopback (zeroconf bound to 127.0.0.1): `meshfl peer announce`,
`discover`, `trust --discovered` refusing a wrong fingerprint and a changed key."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import uuid

import orjson
import pytest
from click.testing import CliRunner

from helpers.procs import kill
from meshfl._extras import MissingDependency
from meshfl.cli import main
from meshfl.crypto import Identity
from meshfl.home import Home
from meshfl.launch import lan

pytestmark = pytest.mark.timeout(120)


def _card(tmp_path, name="alice"):
    return Identity.create(tmp_path / uuid.uuid4().hex, name).card


def test_an_announcement_carries_a_verified_card_and_a_tampered_one_is_invalid(tmp_path):
    card = _card(tmp_path)
    props = lan.encode(card, "researcher", "tcp://lab:5555")
    assert all(len(k) + 1 + len(v) <= 255 for k, v in props.items())  # each TXT string fits
    raw = {k.encode(): v.encode() for k, v in props.items()}  # as zeroconf hands them over
    ann = lan.decode(raw, ["10.0.0.7"], 5555)
    assert (ann.name, ann.role, ann.peer_id, ann.endpoint, ann.card) == ("alice", "researcher", card.peer_id,
                                                                          "tcp://lab:5555", card)
    no_endpoint = lan.decode(lan.encode(card, "researcher", None), ["10.0.0.7"], 6000)
    assert no_endpoint.endpoint == "tcp://10.0.0.7:6000"  # the record's own address and port

    other = _card(tmp_path, "alice")
    swapped = {**props, **{k: v for k, v in lan.encode(other, "researcher", None).items() if k.startswith("c")}}
    bad = lan.decode(swapped, [], None)  # another key under alice's peer id
    assert bad.card is None and "not " + card.peer_id in bad.error
    flipped = dict(props, c0=props["c0"][:50] + ("A" if props["c0"][50] != "A" else "B") + props["c0"][51:])
    assert lan.decode(flipped, [], None).card is None
    assert lan.pin_status(bad, [])[0] == "invalid"


def test_fingerprints_are_peer_ids_however_typed():
    assert lan.fingerprint(" ABCD-EFGH:2345 67ab ") == "abcdefgh234567ab"
    for wrong in ("abcd", "abcdefgh234567a1", "abcdefgh234567abc"):
        with pytest.raises(lan.LanError) as info:
            lan.fingerprint(wrong)
        assert info.value.code == "bad_fingerprint"


def test_pins_and_the_confirmed_fingerprint_decide_what_is_trusted(tmp_path):
    alice, impostor, bob = _card(tmp_path), _card(tmp_path), _card(tmp_path, "bob")
    seen = [lan.decode(lan.encode(c, "researcher", "tcp://h:1"), [], None) for c in (alice, impostor, bob)]
    pinned = [{"peer_id": alice.peer_id, "name": "alice"}]
    assert [lan.pin_status(a, pinned)[0] for a in seen] == ["trusted", "key_changed", "new"]
    warning = lan.pin_status(seen[1], pinned)[1]
    assert warning.startswith("WARNING") and impostor.peer_id in warning and alice.peer_id in warning
    # Two cards announced under one name: the confirmed fingerprint picks the one meant.
    assert lan.choose(seen, "alice", impostor.peer_id.upper()).card == impostor
    with pytest.raises(lan.LanError) as info:
        lan.choose(seen, "alice", bob.peer_id)
    assert info.value.code == "fingerprint_mismatch"
    with pytest.raises(lan.LanError) as info:
        lan.choose(seen, "carol", bob.peer_id)
    assert info.value.code == "not_discovered"


def test_announced_endpoints():
    assert lan.announced_endpoint("tcp://0.0.0.0:5555") == (None, None, 5555)
    assert lan.announced_endpoint("tcp://0.0.0.0:5555", "tcp://lab.local:7000") == ("tcp://lab.local:7000",
                                                                                   "lab.local", 7000)
    for listen in ("ipc:///tmp/r.sock", None, "tcp://host"):
        with pytest.raises(lan.LanError) as info:
            lan.announced_endpoint(listen)
        assert info.value.code == "bad_endpoint"


def test_without_zeroconf_discovery_names_the_lan_extra(monkeypatch, tmp_path):
    Home.init(tmp_path / "node", "node", "site-a").close()
    monkeypatch.setitem(sys.modules, "zeroconf", None)  # import zeroconf now fails
    with pytest.raises(MissingDependency) as info:
        lan.discover(0.1)
    assert info.value.code == "missing_dependency" and "meshfl[lan]" in info.value.message
    home = ["--home", str(tmp_path / "node")]
    result = CliRunner().invoke(main, ["peer", "discover", *home, "--timeout", "0.1"])
    assert result.exit_code == 1 and "meshfl[lan]" in result.stderr
    for args, said in ((["peer", "trust", *home], "--key"),  # neither a key nor a discovered peer
                       (["peer", "trust", *home, "--discovered", "lab"], "--fingerprint")):  # never unconfirmed
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and said in result.stderr


def _cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, (result.output, result.stderr, result.exception)
    return result


def _announce(home) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "meshfl.cli", "peer", "announce", "--home", str(home),
                             "--interface", "127.0.0.1", "--seconds", "90"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=60)
    except queue.Empty:
        line = ""
    assert line.startswith("announcing"), line
    return proc


def test_a_node_discovers_a_researcher_on_the_lan_and_trusts_only_the_confirmed_key(tmp_path):
    pytest.importorskip("zeroconf")
    name = f"lab-{uuid.uuid4().hex[:6]}"  # other runs on this host may announce too
    with Home.init(tmp_path / "lab", "researcher", name, listen="tcp://127.0.0.1:47123") as h:
        lab = h.identity.card
    with Home.init(tmp_path / "node", "node", "site-a"):
        pass
    node = ["--home", tmp_path / "node", "--interface", "127.0.0.1"]
    proc = _announce(tmp_path / "lab")
    try:
        seen = orjson.loads(_cli("peer", "discover", *node, "--timeout", "2", "--json").stdout)
        (row,) = [r for r in seen if r["name"] == name]
        assert (row["peer_id"], row["endpoint"], row["status"]) == (lab.peer_id, "tcp://127.0.0.1:47123", "new")

        wrong = _cli("peer", "trust", *node, "--discovered", name, "--fingerprint", "a" * 16, "--timeout", "2",
                     ok=False)
        assert "not that of the key" in wrong.stderr and lab.peer_id in wrong.stderr
        assert orjson.loads(_cli("peer", "list", "--home", tmp_path / "node", "--json").stdout) == []
        trusted = orjson.loads(_cli("peer", "trust", *node, "--discovered", name, "--fingerprint", lab.peer_id,
                                    "--timeout", "20", "--json").stdout)
        assert (trusted["peer_id"], trusted["endpoint"]) == (lab.peer_id, "tcp://127.0.0.1:47123")

        # Someone else announces that name with another key: shown, flagged, never trusted.
        with Home.init(tmp_path / "impostor", "researcher", name, listen="tcp://127.0.0.1:47124") as other:
            with lan.announce(other, interfaces=["127.0.0.1"]):
                listed = _cli("peer", "discover", *node, "--timeout", "2")
                assert f"WARNING: {name} announces key {other.identity.peer_id}" in listed.stderr
                refused = _cli("peer", "trust", *node, "--discovered", name, "--fingerprint",
                               other.identity.peer_id, "--timeout", "20", ok=False)
                assert "pinned" in refused.stderr
        pinned = orjson.loads(_cli("peer", "list", "--home", tmp_path / "node", "--json").stdout)
        assert [p["peer_id"] for p in pinned] == [lab.peer_id]
    finally:
        kill(proc)
