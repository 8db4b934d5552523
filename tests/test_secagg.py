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
    unmask,
)

SESSION = "exp-test.r1.a0"


class Round:
    """``n`` nodes, their sessions, the researcher's view, and a true (unmasked) vector each."""

    def __init__(self, n: int, threshold: int, length: int = 1000, seed: int = 0) -> None:
        self.ids = [Identity.generate(f"node{i}") for i in range(n)]
        self.cards = {i.peer_id: i.card for i in self.ids}
        members = sorted(self.cards)
        self.sessions = {i.peer_id: NodeSession(i, SESSION, "researcher", members, threshold, DEFAULT_PRG)
                         for i in self.ids}
        self.threshold = threshold
        rng = np.random.default_rng(seed)
        self.true = {pid: rng.integers(-2**40, 2**40, length).view(np.uint64) for pid in members}
        self.keys: dict[str, list] = {}

    def exchange(self, who=None) -> None:
        """Round keys to the researcher, key list back, shares sealed to each member (by hand here)."""
        who = sorted(who or self.sessions)
        self.keys = {pid: [self.sessions[pid].key_fields()[k] for k in ("public", "signature")] for pid in who}
        for pid in who:
            for dest, payload in self.sessions[pid].distribute(self.keys, self.cards.get):
                self.sessions[dest].receive_share(pid, payload)

    def masked(self, pid: str, members) -> np.ndarray:
        vector = self.true[pid].copy()
        self.sessions[pid].mask(members, vector)
        return vector

    def researcher_sum(self, survivors, members) -> np.ndarray:
        total = MaskedSum(len(next(iter(self.true.values()))))
        for pid in survivors:
            total.add({"masked": torch.from_numpy(self.masked(pid, members).view(np.int64))})
        dropped = [m for m in members if m not in survivors]
        reveals = [self.sessions[pid].reveal(survivors, dropped) for pid in survivors]
        keys = {pid: bytes.fromhex(k[0]) for pid, k in self.keys.items()}
        unmask(total.total, SESSION, keys, survivors, dropped, reveals, self.threshold, DEFAULT_PRG)
        return total.total


def _exact_sum(vectors) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v
    return total


def test_masks_cancel_and_the_sum_is_exact():
    r = Round(4, 3)
    r.exchange()
    members = sorted(r.sessions)
    assert np.array_equal(r.researcher_sum(members, members), _exact_sum([r.true[p] for p in members]))


def test_two_of_five_drop_after_the_key_exchange_and_the_survivors_sum_is_recovered():
    r = Round(5, 3)
    r.exchange()
    members = sorted(r.sessions)
    survivors = members[:3]  # members[3:] drop after sharing, before sending their vectors
    assert np.array_equal(r.researcher_sum(survivors, members), _exact_sum([r.true[p] for p in survivors]))


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
    r = Round(3, 2, length=20_000)
    r.exchange()
    members = sorted(r.sessions)
    for pid in members:
        masked, true = r.masked(pid, members), r.true[pid]
        assert np.mean(masked == true) < 1e-3
        corr = np.corrcoef(masked.view(np.int64).astype(float), true.view(np.int64).astype(float))[0, 1]
        assert abs(corr) < 0.05


def test_a_node_never_reveals_both_secrets_of_one_member():
    r = Round(4, 2)
    r.exchange()
    members = sorted(r.sessions)
    me = r.sessions[members[0]]
    r.masked(members[0], members)
    first = me.reveal(members[:3], members[3:])
    assert set(first["b"]) == set(members[:3]) and set(first["s"]) == set(members[3:])
    assert me.reveal(members[:3], members[3:]) == first  # asking again gets the same answer
    for survivors, dropped in ((members[:2], members[2:]), (members, []), (members[:3], [])):
        with pytest.raises(SecAggError) as info:  # another split would reveal a survivor's round key
            me.reveal(survivors, dropped)
        assert info.value.code == "secagg_conflict"


def test_a_node_masks_once_per_round():
    r = Round(3, 2)
    r.exchange()
    members = sorted(r.sessions)
    r.masked(members[0], members)
    with pytest.raises(SecAggError) as info:  # two masked vectors with one mask would leak their difference
        r.masked(members[0], members)
    assert info.value.code == "secagg_conflict"


def test_a_swapped_or_unsigned_round_key_is_refused():
    r = Round(3, 2)
    members = sorted(r.sessions)
    keys = {pid: [r.sessions[pid].key_fields()[k] for k in ("public", "signature")] for pid in members}
    forged = dict(keys)
    forged[members[1]] = [r.sessions[members[2]].public.hex(), keys[members[1]][1]]  # someone else's key
    with pytest.raises(SecAggError) as info:
        r.sessions[members[0]].distribute(forged, r.cards.get)
    assert info.value.code == "secagg_protocol"
    stranger = {k: v for k, v in r.cards.items() if k != members[2]}
    with pytest.raises(SecAggError) as info:
        r.sessions[members[0]].distribute(keys, stranger.get)
    assert info.value.code == "secagg_untrusted_peer" and info.value.details["peers"] == [members[2]]


def test_too_few_shares_cannot_rebuild_a_secret():
    r = Round(4, 3)
    r.exchange()
    members = sorted(r.sessions)
    total = MaskedSum(1000)
    for pid in members:
        total.add({"masked": torch.from_numpy(r.masked(pid, members).view(np.int64))})
    reveals = [r.sessions[pid].reveal(members, []) for pid in members[:2]]  # 2 < t = 3
    keys = {pid: bytes.fromhex(k[0]) for pid, k in r.keys.items()}
    with pytest.raises(SecAggError) as info:
        unmask(total.total, SESSION, keys, members, [], reveals, 3, DEFAULT_PRG)
    assert info.value.code == "secagg_not_enough"


@settings(max_examples=40, deadline=None)
@given(
    samples=st.lists(st.integers(1, 5000), min_size=2, max_size=6),
    scale=st.floats(1e-4, 50.0),
    seed=st.integers(0, 2**31),
)
def test_fixed_point_sum_matches_the_weighted_mean_within_the_documented_bound(samples, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    state = {"w": torch.zeros(7, 3), "b": torch.zeros(3), "steps": torch.zeros((), dtype=torch.int64)}
    enc = Encoding.for_state(state, clip=1e4)  # nothing clipped here: only rounding errs
    deltas = [{"w": torch.randn(7, 3, generator=gen) * scale, "b": torch.randn(3, generator=gen) * scale,
               "steps": torch.tensor(n // 10)} for n in samples]
    metrics = [{"loss": float(i) + 0.5, "acc": 0.25 * i} for i in range(len(samples))]
    total = np.zeros(enc.length, dtype=np.uint64)
    for d, n, m in zip(deltas, samples, metrics):
        vector, names = encode_update(d, n, m, enc, len(samples))
        total += vector
    assert names == ["acc", "loss"]
    mean, n_total, slots = decode_sum(total, enc)
    assert n_total == sum(samples) and len(slots) == METRIC_SLOTS
    bound = len(samples) * 2.0 ** -(enc.frac_bits + 1) / n_total
    for key in ("w", "b", "steps"):
        exact = sum(n * d[key].double() for d, n in zip(deltas, samples)) / n_total
        assert np.max(np.abs(mean[key] - exact.reshape(-1).numpy())) <= bound * (1 + 1e-9) + 1e-12
    exact_loss = sum(n * m["loss"] for n, m in zip(samples, metrics)) / n_total
    assert abs(slots[1] - exact_loss) <= bound * 1.001


def test_values_beyond_the_range_are_refused_not_wrapped():
    state = {"w": torch.zeros(4)}
    enc = Encoding.for_state(state, frac_bits=24, clip=100.0)
    with pytest.raises(SecAggError) as info:
        encode_update({"w": torch.ones(4)}, 10**9, {}, enc, 8)
    assert info.value.code == "secagg_range"
    clipped, _ = encode_update({"w": torch.tensor([1e6, -1e6, 0.5, 0.0])}, 1, {}, enc, 2)
    mean, _, _ = decode_sum(clipped, enc)
    assert mean["w"].tolist() == [100.0, -100.0, 0.5, 0.0]
