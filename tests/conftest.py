"""Fixtures shared by the hosted-model test modules (the others keep theirs beside their tests)."""

from __future__ import annotations

import pytest
import zmq

from helpers.hosted import make_host_home
from meshfl.hosted import Host


@pytest.fixture
def ctx():
    """One ZeroMQ context for a test's light clients."""
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def host(tmp_path):
    """A started host on a fresh researcher home."""
    h = Host(make_host_home(tmp_path)).start()
    yield h
    h.close()
