"""meshfl.home: creating and opening a home, its configuration, and the trust table."""

from __future__ import annotations

import stat
import tomllib

import pytest

from meshfl.crypto import Identity
from meshfl.errors import ConfigError
from meshfl.home import CONFIG_FILE, Config, Home


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_private_keys_and_commented_config(tmp_path):
    path = tmp_path / "home"
    with Home.init(path, "node", "site-a", dev=True, minimum_samples=5) as home:
        peer_id = home.identity.peer_id
        assert [r.event for r in home.audit.records()] == ["home.init"]
    assert mode(path) == 0o700
    assert mode(path / "keys" / "identity.key") == 0o600
    text = (path / CONFIG_FILE).read_text()
    assert sum(line.startswith("#") for line in text.splitlines()) > 10
    parsed = tomllib.loads(text)
    assert parsed["role"] == "node" and parsed["dev"] is True and parsed["minimum_samples"] == 5
    assert "listen" not in parsed  # a node has none: the line is a commented example
    with Home.open(path) as home:
        assert home.identity.peer_id == peer_id
        assert home.config == Config(role="node", name="site-a", listen=None, dev=True,
                                     minimum_samples=5)


def test_config_round_trips_every_setting(tmp_path):
    config = Config(role="researcher", name='odd "name" é', listen="tcp://127.0.0.1:5555",
                    allow_cuda=False, task_timeout=60, heartbeat=0.5, dead_after=3)
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert Config.load(path) == config


def test_init_refuses_an_existing_home_and_bad_settings(tmp_path):
    Home.init(tmp_path / "h", "node", "a").close()
    with pytest.raises(ConfigError) as err:
        Home.init(tmp_path / "h", "node", "a")
    assert err.value.code == "exists"
    for kwargs in ({"role": "admin"}, {"no_such_setting": 1}, {"heartbeat": 20.0},
                   {"minimum_samples": "10"}, {"listen": "localhost"}):
        args = {"role": "node", "name": "b", **kwargs}
        with pytest.raises(ConfigError):
            Home.init(tmp_path / "other", **args)
    assert not (tmp_path / "other").exists()  # nothing is created before the settings check


def test_open_missing_home_says_how_to_create_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        Home.open(tmp_path / "nowhere")
    assert err.value.code == "no_home"
    assert "meshfl init" in err.value.message and str(tmp_path / "nowhere") in err.value.message


def test_open_rejects_an_unknown_setting(tmp_path):
    Home.init(tmp_path, "node", "a").close()
    with open(tmp_path / CONFIG_FILE, "a") as fh:
        fh.write("hartbeat = 2.0\n")
    with pytest.raises(ConfigError, match="hartbeat"):
        Home.open(tmp_path)


def test_trust_and_revoke_round_trip(tmp_path):
    researcher = Identity.generate("lab")
    other = Identity.generate("other")
    with Home.init(tmp_path, "node", "site") as home:
        entry = home.trust(researcher.card, endpoint="tcp://lab:5555")
        assert entry["name"] == "lab" and entry["card"] == researcher.card
        home.trust(other.card, name="second")
        with pytest.raises(ConfigError) as err:
            home.trust(Identity.generate("x").card, name="lab")
        assert err.value.code == "name_taken"
        with pytest.raises(ConfigError):
            home.trust(home.identity.card)
        with pytest.raises(ConfigError):
            home.trust(other.card, endpoint="nonsense")
    with Home.open(tmp_path) as home:  # persisted
        trusted = {e["name"]: e for e in home.trusted()}
        assert set(trusted) == {"lab", "second"}
        assert trusted["lab"]["endpoint"] == "tcp://lab:5555"
        assert trusted["lab"]["card"] == researcher.card
        assert home.revoke("second") is True  # by name
        assert home.revoke(researcher.peer_id) is True  # by id
        assert home.revoke("lab") is False
        assert home.trusted() == []
        events = [r.event for r in home.audit.records()]
        assert events.count("peer.trust") == 2 and events.count("peer.revoke") == 2
        assert home.audit.verify().ok
