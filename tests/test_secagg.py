"""Secure aggregation as pure objects (no sockets): fixed point, masks, shares, dropout recovery.

A round is played here the way Node and Experiment drive it, with messages passed by hand, so a
failure replays exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfl.crypto import DEFAULT_PRG, Identity
from meshfl.secagg import (
    METRIC_SLOTS,
    Encoding,
    MaskedSum,
    NodeSession,
    SecAggError,
    decode_sum,
    encode_update,
    frac_bits_for,
    ring_apply,
    unmask,
)

SESSION = "exp-test.r1.a0"


class Round:
    """``n`` nodes, their sessions, the researcher's view, and a true (unmasked) vector each."""

    def __init__(self, n: int, threshold: int, params: int = 1000, seed: int = 0) -> None:
        self.ids = [Identity.generate(f"node{i}") for i in range(n)]
        self.cards = {i.peer_id: i.card for i in self.ids}
        members = sorted(self.cards)
        self.sessions = {i.peer_id: NodeSession(i, SESSION, "researcher", members, threshold, DEFAULT_PRG)
                         for i in self.ids}
        self.threshold = threshold
        self.enc = Encoding(("w",), (params,), ("running_mean",), (5,), frac_bits=20)
        rng = np.random.default_rng(seed)
        self.true = {pid: rng.integers(0, 256, self.enc.nbytes, dtype=np.uint8) for pid in members}
        self.keys: dict[str, str] = {}

    def exchange(self, who=None) -> None:
        """Set-up (shares sealed to every other participant, by hand here), then the round keys
        of ``who`` (the members) passed to each member as the researcher's key list would."""
        for pid in sorted(self.sessions):
            for dest, payload in self.sessions[pid].distribute(self.cards.get):
                self.sessions[dest].receive_share(pid, payload)
        who = sorted(who or self.sessions)
        self.keys = {pid: self.sessions[pid].key_fields()["public"] for pid in who}
        for pid in who:
            self.sessions[pid].set_keys(self.keys, self.cards.get)

    def masked(self, pid: str, members=None) -> np.ndarray:
        true = self.true[pid]
        fill = lambda block, offset: np.copyto(block, true[offset : offset + block.size])  # noqa: E731
        vector = np.full(self.enc.nbytes, 0xAB, dtype=np.uint8)  # used memory: fill makes every byte
        self.sessions[pid].mask(vector, fill, self.enc.boundary)  # with exchange()'s members
        return vector

    def researcher_sum(self, survivors, members) -> np.ndarray:
        total = MaskedSum(self.enc)
        for pid in survivors:
            total.add({"masked": torch.from_numpy(self.masked(pid, members).view(np.int32))})
        dropped = [m for m in members if m not in survivors]
        reveals = [self.sessions[pid].reveal(survivors, dropped) for pid in survivors]
        keys = {pid: bytes.fromhex(k) for pid, k in self.keys.items()}
        unmask(total.total, self.enc.boundary, SESSION, keys, survivors, dropped, reveals, self.threshold, DEFAULT_PRG)
        return total.total

    def exact_sum(self, pids) -> np.ndarray:
        """The sum of the true vectors, each section in its own ring."""
        total = np.zeros(self.enc.nbytes, dtype=np.uint8)
        for pid in pids:
            ring_apply(np.add, total, self.true[pid], 0, self.enc.boundary)
        return total


def test_masks_cancel_and_the_sum_is_exact():
    r = Round(4, 3)
    r.exchange()
    members = sorted(r.sessions)
    assert np.array_equal(r.researcher_sum(members, members), r.exact_sum(members))


def test_two_of_five_drop_after_the_key_exchange_and_the_survivors_sum_is_recovered():
    r = Round(5, 3)
    r.exchange()
    members = sorted(r.sessions)
    survivors = members[:3]  # members[3:] drop after sharing, before sending their vectors
    assert np.array_equal(r.researcher_sum(survivors, members), r.exact_sum(survivors))


def test_a_participant_lost_in_set_up_is_no_member_and_a_member_lost_later_is_recovered():
    r = Round(5, 3)
    participants = sorted(r.sessions)
    members = participants[1:]  # participants[0] sent its shares but its round key never arrived
    r.exchange(who=members)
    survivors = members[:3]  # and members[3] drops before sending its vector
    assert np.array_equal(r.researcher_sum(survivors, members), r.exact_sum(survivors))


def test_one_dropout_too_many_cannot_be_unmasked():
    r = Round(5, 3)
    r.exchange()
    members = sorted(r.sessions)
    survivors, dropped = members[:2], members[2:]
    for pid in survivors:
        r.masked(pid, members)
        with pytest.raises(SecAggError) as info:
            r.sessions[pid].reveal(survivors, dropped)
        assert info.value.code == "secagg_not_enough"  # nothing revealed, nothing leaked


def test_every_vector_the_researcher_gets_is_masked():
    r = Round(3, 2, params=20_000)
    r.exchange()
    members = sorted(r.sessions)
    for pid in members:
        masked, true = r.masked(pid, members), r.true[pid]
        assert np.mean(masked == true) < 0.01  # bytes agree by chance only (1/256)
        corr = np.corrcoef(masked.astype(float), true.astype(float))[0, 1]
        assert abs(corr) < 0.05


def test_a_node_never_reveals_both_secrets_of_one_member():
    r = Round(5, 3)
    r.exchange()
    members = sorted(r.sessions)
    me = r.sessions[members[0]]
    r.masked(members[0], members)
    first = me.reveal(members[:3], members[3:])
    assert set(first["b"]) == set(members[:3]) and set(first["s"]) == set(members[3:])
    assert me.reveal(members[:3], members[3:]) == first  # asking again gets the same answer
    for survivors, dropped in ((members[:4], members[4:]), (members, []), (members[:3], [])):
        with pytest.raises(SecAggError) as info:  # another split would reveal a survivor's round key
            me.reveal(survivors, dropped)
        assert info.value.code == "secagg_conflict"


def test_a_node_refuses_a_threshold_below_a_majority():
    ident = Identity.generate("n")
    others = [Identity.generate(f"o{i}").peer_id for i in range(3)]
    for threshold in (1, 2, 5):  # 4 participants: only 3 and 4 are a majority within range
        with pytest.raises(SecAggError):
            NodeSession(ident, SESSION, "r", [ident.peer_id, *others], threshold, DEFAULT_PRG)
    assert NodeSession(ident, SESSION, "r", [ident.peer_id, *others], 3, DEFAULT_PRG).threshold == 3


def test_a_node_masks_once_per_round():
    r = Round(3, 2)
    r.exchange()
    members = sorted(r.sessions)
    r.masked(members[0], members)
    with pytest.raises(SecAggError) as info:  # two masked vectors with one mask would leak their difference
        r.masked(members[0], members)
    assert info.value.code == "secagg_conflict"


def test_a_swapped_or_unvouched_round_key_is_refused():
    def fresh(lost_share: bool = False):
        """3 sessions after set-up; with ``lost_share`` member 1's share to member 0 never arrives."""
        r = Round(3, 2)
        members = sorted(r.sessions)
        for pid in members:
            for dest, payload in r.sessions[pid].distribute(r.cards.get):
                if not (lost_share and pid == members[1] and dest == members[0]):
                    r.sessions[dest].receive_share(pid, payload)
        return r, members, {pid: r.sessions[pid].key_fields()["public"] for pid in members}

    r, members, keys = fresh()
    forged = dict(keys)
    forged[members[1]] = r.sessions[members[2]].public.hex()  # someone else's key
    with pytest.raises(SecAggError) as info:
        r.sessions[members[0]].set_keys(forged, r.cards.get)
    assert info.value.code == "secagg_protocol" and "sealed share" in info.value.message
    with pytest.raises(SecAggError) as info:  # the refusal is final: the task waiting to mask fails
        r.sessions[members[0]].wait_keys(1.0)
    assert info.value.code == "secagg_protocol"
    with pytest.raises(SecAggError) as info:  # one key list per round
        r.sessions[members[0]].set_keys(keys, r.cards.get)
    assert info.value.code == "secagg_conflict"
    r, members, keys = fresh(lost_share=True)
    with pytest.raises(SecAggError) as info:  # no intact share from member 1: its key is unchecked
        r.sessions[members[0]].set_keys(keys, r.cards.get)
    assert info.value.code == "secagg_protocol" and members[1] in info.value.message
    r.sessions[members[2]].set_keys(keys, r.cards.get)  # a node that got every share goes on
    assert set(r.sessions[members[2]].keys) == set(members)
    r, members, keys = fresh()  # no mask with a member this node does not trust
    with pytest.raises(SecAggError) as info:
        r.sessions[members[0]].set_keys(keys, {k: v for k, v in r.cards.items() if k != members[2]}.get)
    assert info.value.code == "secagg_untrusted_peer" and info.value.details["peers"] == [members[2]]
    r = Round(3, 2)  # and no share for it
    members = sorted(r.sessions)
    with pytest.raises(SecAggError) as info:
        r.sessions[members[0]].distribute({k: v for k, v in r.cards.items() if k != members[2]}.get)
    assert info.value.code == "secagg_untrusted_peer" and info.value.details["peers"] == [members[2]]


def test_masking_waits_for_the_key_list_and_an_empty_one_calls_the_round_off():
    r = Round(3, 2)
    members = sorted(r.sessions)
    with pytest.raises(SecAggError) as info:  # bounded: no keys, no mask
        r.sessions[members[0]].wait_keys(0.05)
    assert info.value.code == "secagg_protocol"
    with pytest.raises(SecAggError) as info:
        r.sessions[members[0]].set_keys({}, r.cards.get)
    assert info.value.code == "secagg_not_enough"
    with pytest.raises(SecAggError) as info:
        r.sessions[members[0]].wait_keys(0.05)
    assert info.value.code == "secagg_not_enough" and "called" in info.value.message
    waiting = r.sessions[members[1]]
    waiting.call_off("the researcher cancelled the experiment")  # a cancel ends the wait at once
    with pytest.raises(SecAggError) as info:
        waiting.wait_keys(60.0)
    assert info.value.code == "cancelled"


def test_too_few_shares_cannot_rebuild_a_secret():
    r = Round(4, 3)
    r.exchange()
    members = sorted(r.sessions)
    total = MaskedSum(r.enc)
    for pid in members:
        total.add({"masked": torch.from_numpy(r.masked(pid, members).view(np.int32))})
    reveals = [r.sessions[pid].reveal(members, []) for pid in members[:2]]  # 2 < t = 3
    keys = {pid: bytes.fromhex(k) for pid, k in r.keys.items()}
    with pytest.raises(SecAggError) as info:
        unmask(total.total, r.enc.boundary, SESSION, keys, members, [], reveals, 3, DEFAULT_PRG)
    assert info.value.code == "secagg_not_enough"


@settings(max_examples=40, deadline=None)
@given(
    samples=st.lists(st.integers(1, 5000), min_size=2, max_size=6),
    scale=st.floats(1e-4, 2.0),
    seed=st.integers(0, 2**31),
)
def test_fixed_point_sum_matches_the_weighted_mean_within_the_documented_bound(samples, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    state = {"w": torch.zeros(7, 3), "b": torch.zeros(3), "running_var": torch.ones(3),
             "steps": torch.zeros((), dtype=torch.int64), "mask": torch.zeros(2, dtype=torch.bool)}
    k, weight_scale = len(samples), max(samples) + 7
    enc = Encoding.for_state(state, {"w", "b"}, frac_bits_for(k, 8.0))
    assert enc.names32 == ("b", "w") and enc.names64 == ("running_var", "steps")  # bools are left out
    clip = lambda t: t.clamp(-7.9, 7.9)  # noqa: E731  (within the clip: only rounding errs here)
    deltas = [{"w": clip(torch.randn(7, 3, generator=gen) * scale), "b": clip(torch.randn(3, generator=gen) * scale),
               "running_var": torch.randn(3, generator=gen) * 5e4, "steps": torch.tensor(n // 10)} for n in samples]
    metrics = [{"loss": float(i) + 0.5, "acc": 0.25 * i} for i in range(k)]
    total = np.zeros(enc.nbytes, dtype=np.uint8)
    for d, n, m in zip(deltas, samples, metrics):
        vector, names = encode_update(d, n, weight_scale, m, enc)
        ring_apply(np.add, total, vector, 0, enc.boundary)
    assert names == ["acc", "loss"]
    mean, n_total, slots = decode_sum(total, enc, weight_scale)
    assert n_total == sum(samples) and len(slots) == METRIC_SLOTS
    for key, bits in (("w", enc.frac_bits), ("b", enc.frac_bits), ("running_var", 20), ("steps", 20)):
        bound = k * 2.0 ** -(bits + 1) * weight_scale / n_total  # the bound docs/security.md states,
        if key in enc.names32:  # plus float32 scaling in section 32: 2**-21 of the largest delta
            bound = bound + 2.0**-21 * torch.stack([d[key].abs() for d in deltas]).amax(0).reshape(-1).double().numpy()
        exact = sum(n * d[key].double() for d, n in zip(deltas, samples)) / n_total
        assert np.all(np.abs(mean[key] - exact.reshape(-1).numpy()) <= bound * (1 + 1e-6)), key
    exact_loss = sum(n * m["loss"] for n, m in zip(samples, metrics)) / n_total
    assert abs(slots[1] - exact_loss) <= k * 2.0**-21 * weight_scale / n_total * (1 + 1e-6)


def test_encoding_into_a_used_buffer_gives_the_same_bytes():
    """Encoding into a buffer that holds old bytes (padding included) leaves nothing of them."""
    state = {"w": torch.randn(7), "running_mean": torch.randn(3)}  # 7 words: 4 bytes of padding
    enc = Encoding.for_state(state, {"w"}, frac_bits_for(4, 8.0))
    fresh, names = encode_update(state, 10, 20, {"loss": 0.5}, enc)
    used = np.full(enc.nbytes, 0xAB, dtype=np.uint8)
    again, names_again = encode_update(state, 10, 20, {"loss": 0.5}, enc, out=used)
    assert again is used and np.array_equal(used, fresh) and names_again == names
    assert enc.boundary > 4 * 7 and not used[4 * 7 : enc.boundary].any()


def test_a_vector_made_block_by_block_is_the_whole_vector_and_its_masks_are_the_same():
    """A node encodes and masks its vector one 256 KiB block at a time: block edges fall
    inside tensors, in the padding and in the 64-bit section, and nothing may differ from the whole."""
    from meshfl.crypto import CHUNK_BYTES
    from meshfl.secagg import Masker, UpdateEncoder

    gen = torch.Generator().manual_seed(3)
    state = {"w": torch.randn(70_001, generator=gen), "b": torch.randn(3, generator=gen) * 20,
             "running_var": torch.rand(40_000, generator=gen) * 3, "steps": torch.tensor(12)}
    enc = Encoding.for_state(state, {"w", "b"}, frac_bits_for(4, 8.0))
    assert enc.nbytes > 2 * CHUNK_BYTES and enc.boundary % CHUNK_BYTES  # blocks cross the sections
    whole, names = encode_update(state, 30, 40, {"loss": 0.25}, enc)
    encoder = UpdateEncoder(state, 30, 40, {"loss": 0.25}, enc)
    assert encoder.names == names and encoder.clipped == 0
    for size in (CHUNK_BYTES, 4096 * 3):
        parts = []
        for offset in range(0, enc.nbytes, size):
            block = np.full(min(size, enc.nbytes - offset), 0xAB, dtype=np.uint8)  # a used buffer
            encoder.fill(block, offset)
            parts.append(block)
        assert np.array_equal(np.concatenate(parts), whole)
    masks = [(bytes([i]) * 32, 1 if i % 2 else -1) for i in range(1, 5)]
    masker = Masker(enc.nbytes, enc.boundary, DEFAULT_PRG)
    streamed = np.full(enc.nbytes, 0xAB, dtype=np.uint8)  # used memory: fill makes every byte
    masker.apply(streamed, masks, encoder.fill)
    in_place = whole.copy()
    masker.apply(in_place, masks)
    assert np.array_equal(streamed, in_place) and not np.array_equal(streamed, whole)
    with pytest.raises(SecAggError):
        encoder.fill(np.empty(16, dtype=np.uint8), 4)  # not a block of the vector


def test_values_beyond_the_range_are_refused_or_clipped_never_wrapped():
    state = {"w": torch.zeros(4)}
    enc = Encoding.for_state(state, {"w"}, frac_bits_for(8, 8.0), clip=8.0)
    with pytest.raises(SecAggError) as info:  # more samples than the public weight scale
        encode_update({"w": torch.ones(4)}, 101, 100, {}, enc)
    assert info.value.code == "secagg_range"
    clipped, _ = encode_update({"w": torch.tensor([1e6, -1e6, 0.5, 0.0])}, 10, 10, {}, enc)
    mean, _, _ = decode_sum(clipped, enc, 10)
    assert mean["w"].tolist() == [8.0, -8.0, 0.5, 0.0]
    for bad in (float("nan"), float("inf")):  # a diverged plan: refused, never wrapped into the sum
        with pytest.raises(SecAggError) as info:
            encode_update({"w": torch.tensor([0.5, bad, 0.0, 0.0])}, 10, 10, {}, enc)
        assert info.value.code == "secagg_range" and "'w'" in info.value.message
    with pytest.raises(SecAggError):  # too many members for any precision at this clip
        frac_bits_for(2**20, 8.0)


def test_shares_are_held_only_for_an_open_session():
    """Shares come with the key list, after the node's own set-up: one for a session it never
    opened (a restarted node, a stray message) is refused, and nothing waits in memory for it."""
    from meshfl.secagg import NodeSessions

    r = Round(3, 2)
    members = sorted(r.sessions)
    sessions = NodeSessions()
    with pytest.raises(SecAggError) as info:
        sessions.get(SESSION)
    assert info.value.code == "secagg_session_lost"
    sessions.open(r.sessions[members[0]])
    for pid in members[1:]:
        for dest, payload in r.sessions[pid].distribute(r.cards.get):
            if dest == members[0]:
                sessions.get(SESSION).receive_share(pid, payload)
    assert set(r.sessions[members[0]].held) == set(members[1:])
