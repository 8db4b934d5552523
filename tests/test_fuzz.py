"""Bad input never crashes a node: fuzzed handler fields, random and mutated frames on its socket."""

from __future__ import annotations

import os
import random

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.data import write_blobs_csv
from helpers.plans import TinyPlan
from meshfl.errors import MeshflError
from meshfl.plans import plan_source
from meshfl.testing import FederatedMesh
from meshfl.wire import Message, decode, encode

pytestmark = pytest.mark.timeout(300)
FRAMES = int(os.environ.get("MESHFL_FUZZ_FRAMES", "3000"))  # 10**5 for the long run

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
NODE_TYPES = ["ping", "datasets.search", "plan.status", "plan.submit", "train", "result.pull", "result.ack", "task.cancel"]


@pytest.fixture(scope="module")
def mesh():
    with FederatedMesh(1) as m:
        node = m.nodes[0]
        node.datasets.add("blobs", ["blobs"], "csv", write_blobs_csv(node.home.path / "b.csv"), target="target")
        m.approve(TinyPlan)
        yield m


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mtype=st.sampled_from(NODE_TYPES), fields=st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_handlers_answer_any_fields_with_a_reply_or_a_coded_error(mesh, mtype, fields):
    node = mesh.nodes[0]
    msg = Message(mtype, fields, sender=mesh.researcher.peer.peer_id)
    try:
        node._handle(msg)
    except MeshflError as exc:
        assert exc.code and exc.message
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # Only reachable for fields the wire would have refused; the handler must still not crash
        # the node, which the Peer guarantees by answering "internal". Make sure it was invalid:
        from meshfl.errors import WireError
        from meshfl.wire import lookup

        with pytest.raises(WireError):
            lookup(mtype).check(fields, 0)


def test_train_with_wrong_tensors_is_refused_cleanly(mesh):
    node = mesh.nodes[0]
    fields = {
        "task_id": "fuzz.bad-model", "experiment": "fuzz", "round": 1, "plan_source": plan_source(TinyPlan),
        "plan_class": "TinyPlan", "dataset_tags": ["blobs"], "training_args": {}, "model_args": {},
    }
    reply = node._handle(Message("train", fields, {"nonsense": torch.ones(3)}, sender=mesh.researcher.peer.peer_id))
    assert reply.type == "train.accepted"  # accepted, then fails as a task with a readable error
    node_id = node.peer.peer_id
    assert mesh.researcher.ping(node_id)["role"] == "node"


def _mutations(rng: random.Random, valid: list[bytes]) -> list[bytes]:
    kind = rng.randrange(5)
    frames = [bytearray(f) for f in valid]
    if kind == 0:  # random bytes
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 4))]
    if kind == 1:  # flip bytes of the envelope
        env = frames[0]
        for _ in range(rng.randrange(1, 6)):
            if env:
                env[rng.randrange(len(env))] = rng.randrange(256)
    elif kind == 2:  # drop or duplicate a frame
        if len(frames) > 1 and rng.random() < 0.5:
            del frames[rng.randrange(1, len(frames))]
        else:
            frames.append(frames[-1])
    elif kind == 3:  # truncate a frame
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    return [bytes(f) for f in frames]


def test_random_and_mutated_frames_on_the_live_socket(tmp_path):
    """The node dials a raw socket holding the researcher's keys; it answers every frame it can
    with an error code, stays up, and its memory stays bounded."""
    with FederatedMesh(1, root=tmp_path / "mesh") as m:
        node = m.nodes[0]
        researcher_id = m.researcher.home.identity
        endpoint = m.researcher.endpoint
        m.researcher.peer.close(linger=0)  # free the endpoint; a raw ROUTER takes its place
        ctx = zmq.Context.instance()
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.curve_server = True
        router.curve_secretkey, router.curve_publickey = researcher_id.link_secret_z85, researcher_id.link_public_z85
        router.setsockopt(zmq.RCVTIMEO, 10_000)
        router.bind(endpoint)
        try:
            rid = router.recv_multipart()[0]  # the node's hello after it redials
            assert rid == node.peer.peer_id.encode()
            valid = encode(Message("ping", sender=researcher_id.peer_id))
            valid_train = encode(Message("result.pull", {"task_id": "x", "first": 0, "count": 1}, sender=researcher_id.peer_id))
            rng = random.Random(1234)
            rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
            errors = 0
            start_rss = None
            for i in range(FRAMES):
                router.send_multipart([rid, *_mutations(rng, valid if i % 2 else valid_train)])
                if i == FRAMES // 10:
                    start_rss = rss()
                # Drain replies as we go; every 200 frames until the node is quiet, so that a slow
                # reader (a loaded machine) never fills the node's send queue: past it the node
                # drops replies rather than block on a flooding peer.
                while router.poll(200 if i % 200 == 199 else 0):
                    reply = router.recv_multipart()
                    if len(reply) > 1 and b'"type":"error"' in reply[1]:
                        errors += 1
                        assert decode(reply[1:]).fields["code"]
            router.send_multipart([rid, *valid])
            while True:  # replies come in order: every error is in before the final pong
                reply = router.recv_multipart()
                if len(reply) > 1 and b'"pong"' in reply[1]:
                    break
                errors += len(reply) > 1 and b'"type":"error"' in reply[1]
            assert errors > FRAMES // 2  # it kept answering, with error codes
            assert rss() - start_rss < 200 * 2**20  # no unbounded growth
        finally:
            router.close(0)
