"""Aggregators: exact weighted means, streaming through TensorMap pieces, server optimizers, robustness."""

from __future__ import annotations

import gc
import json
import math
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfl.aggregate import (
    AGGREGATORS,
    Aggregator,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedOpt,
    FedProx,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    Scaffold,
    TrimmedMean,
    make_aggregator,
)
from meshfl.errors import ConfigError, MeshflError
from meshfl.wire import Message, TensorMap, declare, decode, encode

declare("test.aggregate", tensors=True)

SHAPES = {"conv": (3, 4, 5), "bias": (7,), "scalar": (), "empty": (0, 3)}
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_state(seed: int, dtypes=FLOAT_DTYPES, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for dtype in dtypes:
        for key, shape in SHAPES.items():
            state[f"{key}.{str(dtype)[6:]}"] = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    state["bn.num_batches_tracked"] = torch.randint(0, 1000, (), generator=g)
    state["mask"] = torch.rand((5,), generator=g) > 0.5
    return state


def naive_mean(updates, weights):
    out = {}
    for name, t in updates[0].items():
        if t.is_floating_point():
            stacked = torch.stack([u[name].to(torch.float64) for u in updates])
            w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * t.dim())
            out[name] = (stacked * w).sum(0) / sum(weights)
        else:
            out[name] = updates[max(range(len(weights)), key=lambda i: weights[i])][name]
    return out


def run(agg: Aggregator, glob, updates, weights, nodes=None):
    """One round; each update also carries the round's own tensors back (SCAFFOLD's), unchanged."""
    agg.begin(glob)
    extra = agg.round_tensors()
    for i, (u, w) in enumerate(zip(updates, weights)):
        agg.add({**u, **extra} if extra and not isinstance(u, TensorMap) else u, w, nodes[i] if nodes else f"n{i}")
    return agg.finish()


def _sized(name: str) -> Aggregator:
    """``name``'s aggregator, set to tolerate no Byzantine update (Krum then works from 3 updates)."""
    return make_aggregator({"name": name, "f": 0} if name in ("krum", "multi_krum") else name)


def assert_close(result, reference, glob):
    assert list(result) == list(glob)
    for name, g in glob.items():
        r = result[name]
        assert r.dtype == g.dtype and r.shape == g.shape, name
        if g.is_floating_point():
            tol = TOL[g.dtype]
            assert torch.allclose(r.to(torch.float64), reference[name], rtol=tol, atol=tol), name
        else:
            assert torch.equal(r, reference[name]), name


def to_tensormap(state, frame_bytes) -> TensorMap:
    frames = encode(Message("test.aggregate", {}, state), frame_bytes=frame_bytes)
    frames = [bytearray(f) for f in frames]  # as received: fresh buffers, not views of the sender's tensors
    tensors = decode(frames).tensors
    assert isinstance(tensors, TensorMap)
    return tensors


# ----------------------------------------------------------------------------- FedAvg


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=6, unique=True), seed=st.integers(0, 2**16))
def test_fedavg_equals_naive_weighted_mean(weights, seed):
    glob = make_state(seed)
    updates = [make_state(seed + 1 + i) for i in range(len(weights))]
    result = run(FedAvg(), glob, updates, weights)
    assert_close(result, naive_mean(updates, weights), glob)


@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.floats(1e-3, 1e6), min_size=2, max_size=5), seed=st.integers(0, 2**16), data=st.data())
def test_fedavg_is_order_independent(weights, seed, data):
    glob = make_state(seed, dtypes=[torch.float32, torch.float64])
    updates = [make_state(seed + 1 + i, dtypes=[torch.float32, torch.float64]) for i in range(len(weights))]
    nodes = [f"node{i}" for i in range(len(weights))]
    base = run(FedAvg(), glob, updates, weights, nodes)
    order = data.draw(st.permutations(range(len(weights))))
    other = run(FedAvg(), glob, [updates[i] for i in order], [weights[i] for i in order], [nodes[i] for i in order])
    for name, t in base.items():
        if t.is_floating_point():
            assert torch.allclose(t, other[name], rtol=1e-5, atol=1e-6), name
        else:  # ties in weight go to the smallest node name, whatever the order
            assert torch.equal(t, other[name]), name


def test_integer_buffers_come_from_heaviest_update_ties_to_smallest_name():
    glob = {"w": torch.zeros(2), "n": torch.tensor(0)}
    ups = [{"w": torch.ones(2), "n": torch.tensor(v)} for v in (10, 20, 30)]
    assert run(FedAvg(), glob, ups, [5, 9, 2])["n"].item() == 20
    assert run(FedAvg(), glob, ups, [9, 9, 2], ["b", "a", "c"])["n"].item() == 20
    assert run(FedAvg(), glob, ups[::-1], [2, 9, 9], ["c", "a", "b"])["n"].item() == 20


@pytest.mark.parametrize("frame_bytes", [64, 8, 24])
def test_tensormap_pieces_match_plain_dicts(frame_bytes):
    glob = make_state(0)
    glob["big"] = torch.randn(1000)
    updates = [make_state(i + 1) for i in range(3)]
    for i, u in enumerate(updates):
        u["big"] = torch.randn(1000) + i
    weights = [3, 100, 17]
    plain = run(FedAvg(), glob, updates, weights)
    maps = [to_tensormap(u, frame_bytes) for u in updates]
    assert maps[0].spec("big")[2] > frame_bytes  # multi-frame
    streamed = run(FedAvg(), glob, maps, weights)
    for name in glob:
        assert torch.equal(plain[name], streamed[name]), name
    for m in maps:  # multi-frame float tensors are read in place, never gathered
        multi = [n for n in m if m.spec(n)[0].is_floating_point and m.spec(n)[2] > frame_bytes]
        assert "big" in multi and not any(n in m._cache for n in multi)


def test_streaming_keeps_no_reference_to_updates():
    glob = {"w": torch.zeros(10_000), "n": torch.tensor(1)}
    agg = FedAvg()
    agg.begin(glob)
    refs = []
    for i in range(4):
        t = torch.full((10_000,), float(i))
        refs.append(weakref.ref(t))
        agg.add({"w": t, "n": torch.tensor(i)}, 1.0, f"n{i}")
        del t
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(agg._acc) == 1 and FedAvg.streaming and not Median.streaming
    assert torch.allclose(agg.finish()["w"], torch.full((10_000,), 1.5))


def test_requires_grad_inputs_and_fedopt_lr1_match_fedavg():
    glob = {"w": torch.randn(4, 3, requires_grad=True)}
    updates = [{"w": torch.randn(4, 3, requires_grad=True)} for _ in range(3)]
    ref = run(FedAvg(), glob, updates, [1, 2, 3])["w"]
    assert not ref.requires_grad
    for agg in (FedOpt(server_lr=1.0), FedAvgM(momentum=0.0), FedProx(mu=0.5)):
        assert torch.allclose(run(agg, glob, updates, [1, 2, 3])["w"], ref, atol=1e-6)


# ----------------------------------------------------------------------------- server optimizers


def _two_rounds(agg):
    glob = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), "n": torch.tensor(3)}
    r1 = [{"w": torch.tensor([2.0, -2.0, 0.0], dtype=torch.float64), "n": torch.tensor(4)},
          {"w": torch.tensor([0.5, -1.0, 0.5], dtype=torch.float64), "n": torch.tensor(5)}]
    out1 = run(agg, glob, r1, [1, 3])
    assert out1["n"].item() == 5
    r2 = [{"w": out1["w"] + torch.tensor([0.1, -0.3, 2.0], dtype=torch.float64), "n": torch.tensor(6)}]
    out2 = run(agg, out1, r2, [2])
    return glob["w"].tolist(), [[2.0, -2.0, 0.0], [0.5, -1.0, 0.5]], [0.1, -0.3, 2.0], out1["w"].tolist(), out2["w"].tolist()


def _reference(kind, lr, b1, b2, tau, momentum=0.0):
    x = [1.0, -2.0, 0.5]
    m = [0.0] * 3
    v = [tau * tau] * 3
    outs = []
    deltas = [[(1 * a + 3 * b) / 4 - xi for a, b, xi in zip([2.0, -2.0, 0.0], [0.5, -1.0, 0.5], x)]]
    for r in range(2):
        d = deltas[0] if r == 0 else [0.1, -0.3, 2.0]
        for i in range(3):
            if kind == "avgm":
                m[i] = d[i] if r == 0 else momentum * m[i] + d[i]
                x[i] = x[i] + lr * m[i]
                continue
            m[i] = b1 * m[i] + (1 - b1) * d[i]
            if kind == "adagrad":
                v[i] = v[i] + d[i] ** 2
            elif kind == "adam":
                v[i] = b2 * v[i] + (1 - b2) * d[i] ** 2
            else:  # yogi
                v[i] = v[i] - (1 - b2) * d[i] ** 2 * math.copysign(1.0, v[i] - d[i] ** 2) * (v[i] != d[i] ** 2)
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        outs.append(list(x))
    return outs


@pytest.mark.parametrize(
    "agg, kind",
    [
        (FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3), "adam"),
        (FedYogi(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3), "yogi"),
        (FedYogi(server_lr=0.3, beta1=0.5, beta2=0.5, tau=0.5), "yogi"),  # v > delta^2 on some coords
        (FedAdagrad(server_lr=0.1, beta1=0.9, tau=1e-3), "adagrad"),
        (FedAdagrad(server_lr=0.1, beta1=0.0, tau=1e-2), "adagrad"),
        (FedAvgM(server_lr=0.7, momentum=0.9), "avgm"),
    ],
)
def test_server_optimizer_steps_match_hand_computation(agg, kind):
    _, _, _, out1, out2 = _two_rounds(agg)
    ref1, ref2 = _reference(kind, agg.server_lr, getattr(agg, "beta1", 0), getattr(agg, "beta2", 0), getattr(agg, "tau", 0),
                            getattr(agg, "momentum", 0))
    assert out1 == pytest.approx(ref1, rel=1e-12, abs=1e-12)
    # round 2's delta is relative to round 1's output, which both sides computed identically
    assert out2 == pytest.approx(ref2, rel=1e-9, abs=1e-12)


def test_fedadam_one_step_literal_values():
    # global 0, one node at 1: delta = 1; m = 0.1; v = 0.99 * 1e-6 + 0.01; x = 0.01 * 0.1 / (sqrt(v) + 1e-3)
    out = run(FedAdam(), {"w": torch.zeros(2, dtype=torch.float64)}, [{"w": torch.ones(2, dtype=torch.float64)}], [1])
    expected = 0.01 * 0.1 / (math.sqrt(0.99e-6 + 0.01) + 1e-3)
    assert out["w"].tolist() == pytest.approx([expected] * 2, rel=1e-14)


def test_defaults_and_training_args():
    assert FedAdam().config() == {"name": "fedadam", "server_lr": 0.01, "beta1": 0.9, "tau": 0.001, "beta2": 0.99}
    assert FedAvgM().config() == {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.9}
    assert FedProx().training_args() == {"fedprox_mu": 0.01}
    assert FedProx(mu=0.5).training_args() == {"fedprox_mu": 0.5}
    assert Scaffold().training_args() == {"scaffold": True}
    assert all(make_aggregator(n).training_args() == {} for n in AGGREGATORS if n not in ("fedprox", "scaffold"))


# ----------------------------------------------------------------------------- checkpoint / config


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_state_dict_round_trip_gives_identical_next_rounds(name):
    a = _sized(name)
    glob = make_state(0, dtypes=[torch.float32, torch.bfloat16])
    for r in range(2):
        glob = run(a, glob, [make_state(10 * r + i, dtypes=[torch.float32, torch.bfloat16]) for i in range(3)], [1, 2, 3])
    state = a.state_dict()
    json.dumps(state["meta"])
    assert state["meta"]["rounds"] == 2
    b = make_aggregator(json.loads(json.dumps(a.config())))
    b.load_state_dict(state)
    assert b.round_tensors.__func__ is a.round_tensors.__func__
    assert b.rounds == 2
    for r in range(2, 4):
        ups = [make_state(10 * r + i, dtypes=[torch.float32, torch.bfloat16]) for i in range(3)]
        out_a, out_b = run(a, glob, ups, [1, 2, 3]), run(b, glob, ups, [1, 2, 3])
        for k in out_a:
            assert torch.equal(out_a[k], out_b[k]), (name, k)
        glob = out_a
    if isinstance(a, FedOpt) and not type(a) is FedOpt:
        assert state["tensors"]  # moments (SCAFFOLD: its control variate) are carried


def test_load_state_dict_refuses_foreign_state():
    with pytest.raises(MeshflError) as e:
        FedAdam().load_state_dict(FedYogi().state_dict())
    assert e.value.code == "bad_state"
    a = FedAdam()
    run(a, {"w": torch.zeros(3)}, [{"w": torch.ones(3)}], [1])
    with pytest.raises(MeshflError) as e:  # moments no longer fit the model
        a.begin({"w": torch.zeros(4)})
    assert e.value.code == "bad_state"


@pytest.mark.parametrize("agg", [
    FedAvg(), FedProx(mu=0.3), FedOpt(server_lr=0.5), FedAvgM(server_lr=0.9, momentum=0.5),
    FedAdagrad(server_lr=0.2, beta1=0.1, tau=1e-4), FedAdam(server_lr=0.2, beta1=0.8, beta2=0.9, tau=1e-5),
    FedYogi(server_lr=0.3, beta1=0.7, beta2=0.95, tau=1e-2), TrimmedMean(trim=0.25), Median(),
    Scaffold(server_lr=0.5), Krum(f=2), MultiKrum(f=1, m=3), MultiKrum(),
])
def test_make_aggregator_rebuilds_from_config(agg):
    config = json.loads(json.dumps(agg.config()))
    again = make_aggregator(config)
    assert type(again) is type(agg) and again.config() == agg.config() and again.name == agg.name


def test_make_aggregator_rejects_bad_configs():
    for bad in ({"name": "nope"}, {}, {"name": "fedadam", "lr": 1}, {"name": "fedadam", "beta1": 1.0},
                {"name": "trimmed_mean", "trim": 0.5}, {"name": "fedprox", "mu": -1}, {"name": "fedopt", "server_lr": 0},
                {"name": "fedyogi", "tau": float("nan")}, {"name": "fedavgm", "momentum": True}, 42,
                {"name": "krum", "f": -1}, {"name": "krum", "f": 1.5}, {"name": "multi_krum", "m": 0},
                {"name": "krum", "m": 2}):
        with pytest.raises(ConfigError):
            make_aggregator(bad)


# ----------------------------------------------------------------------------- robust


def test_robust_aggregators_resist_one_outlier():
    glob = {"w": torch.zeros(50), "n": torch.tensor(0), "flag": torch.tensor([False, True])}
    honest = [{"w": torch.ones(50) + 0.01 * i, "n": torch.tensor(i), "flag": torch.tensor([False, True])} for i in range(9)]
    evil = {"w": torch.full((50,), 1e6), "n": torch.tensor(10**9), "flag": torch.tensor([True, False])}
    ups, weights = honest + [evil], [10] * 9 + [10**6]
    avg = run(FedAvg(), glob, ups, weights)
    assert avg["w"].min() > 1e5 and avg["n"].item() == 10**9  # FedAvg is pulled away
    for agg in (TrimmedMean(trim=0.1), Median()):
        out = run(agg, glob, ups, weights)
        assert torch.all((out["w"] >= 1.0) & (out["w"] <= 1.09)), agg
        assert out["n"].item() in range(9) and out["flag"].tolist() == [False, True]
    # trim 0.1 of 10 drops 1 from each end: mean of honest 1.01..1.08
    assert torch.allclose(run(TrimmedMean(0.1), glob, ups, weights)["w"], torch.full((50,), 1.045))
    assert torch.allclose(run(Median(), glob, ups, weights)["w"], torch.full((50,), 1.045))


def test_median_odd_even_and_multiframe():
    glob = {"w": torch.zeros(300, dtype=torch.float16)}
    ups = [{"w": torch.full((300,), float(v), dtype=torch.float16)} for v in (5, 1, 3)]
    assert run(Median(), glob, ups, [1, 1, 1])["w"].unique().tolist() == [3.0]
    ups.append({"w": torch.full((300,), 4.0, dtype=torch.float16)})
    maps = [to_tensormap(u, 64) for u in ups]
    out = run(Median(), glob, maps, [1, 2, 3, 4])["w"]
    assert out.dtype == torch.float16 and out.unique().tolist() == [3.5]
    assert run(TrimmedMean(0.25), glob, maps, [1, 1, 1, 1])["w"].unique().tolist() == [3.5]


# ----------------------------------------------------------------------------- validation


def _code(fn):
    with pytest.raises(MeshflError) as e:
        fn()
    return e.value


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_bad_updates_are_rejected_and_leave_the_round_intact(name):
    glob = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(3), "n": torch.tensor(0)}
    good = {"a.weight": torch.ones(2, 3), "b.bias": torch.ones(3), "n": torch.tensor(7)}
    agg = _sized(name)
    assert _code(lambda: agg.add(good, 1)).code == "bad_state"  # no round begun
    agg.begin(glob)
    good = {**good, **agg.round_tensors()}
    assert _code(agg.finish).code == "no_updates"
    bad_updates = {
        "a.weight": {"b.bias": torch.ones(3), "n": torch.tensor(1)},  # missing
        "extra": {**good, "extra": torch.ones(1)},  # extra
        "b.bias": {**good, "b.bias": torch.ones(4)},  # wrong shape
        "n": {**good, "n": torch.tensor(1.0)},  # float where the model has an integer buffer
    }
    for tensor, upd in bad_updates.items():
        err = _code(lambda: agg.add(upd, 5, "x"))
        assert err.code == "bad_update" and tensor in str(err) and err.details["tensor"] == tensor
    err = _code(lambda: agg.add({**good, "a.weight": torch.ones(2, 3, dtype=torch.int64)}, 1, "x"))
    assert err.code == "bad_update" and "a.weight" in str(err)
    err = _code(lambda: agg.add(to_tensormap({**good, "b.bias": torch.ones(1, 3)}, 64), 1, "x"))
    assert err.code == "bad_update" and "b.bias" in str(err)
    for w in (0, -1, float("nan"), float("inf"), True, "3", None):
        assert _code(lambda: agg.add(good, w, "x")).code == "bad_update"
    agg.add(good, 2, "ok")
    assert _code(lambda: agg.add(good, 2, "ok")).code == "bad_update"  # same node twice
    assert agg.count == 1 and agg.total_weight == 2.0 and agg.nodes == {"ok"}
    if isinstance(agg, Krum):  # one update: no neighbour to score it by
        assert _code(agg.finish).code == "too_few_updates"
        agg.add(good, 2, "ok2")
        agg.add(good, 2, "ok3")
    out = agg.finish()
    if isinstance(agg, FedOpt) and agg.name != "fedopt":
        return
    assert torch.allclose(out["a.weight"], torch.ones(2, 3)) and out["n"].item() == 7


def test_server_optimizers_average_buffers_instead_of_stepping_them():
    from meshfl.aggregate import FedAdam, FedAvgM

    bn = torch.nn.BatchNorm1d(2)
    params = [name for name, _ in bn.named_parameters()]
    for agg in (FedAvgM(), FedAdam()):
        glob = {k: v.clone() for k, v in bn.state_dict().items()}
        for _ in range(3):
            update = {k: v.clone() for k, v in glob.items()}
            update["running_var"] = torch.full((2,), 0.01)
            update["running_mean"] = torch.full((2,), 6.5)
            agg.begin(glob, params)
            agg.add(update, 10.0, "n0")
            glob = agg.finish()
        assert torch.allclose(glob["running_var"], torch.full((2,), 0.01)), type(agg).__name__
        assert torch.allclose(glob["running_mean"], torch.full((2,), 6.5)), type(agg).__name__


# ----------------------------------------------------------------------------- Krum


def test_krum_and_multi_krum_ignore_byzantine_updates_whatever_their_order():
    gen = torch.Generator().manual_seed(3)
    glob = {"w": torch.zeros(40), "b": torch.zeros(3), "n": torch.tensor(0)}
    honest = [{"w": torch.ones(40) + 0.05 * torch.randn(40, generator=gen), "b": torch.ones(3) * (1 + 0.01 * i),
               "n": torch.tensor(i)} for i in range(5)]
    flipped = {"w": -10 * torch.ones(40), "b": -10 * torch.ones(3), "n": torch.tensor(99)}  # sign-flipped, scaled
    scaled = {"w": 50 * torch.ones(40), "b": 50 * torch.ones(3), "n": torch.tensor(98)}
    ups = honest + [flipped, scaled]
    names = [f"h{i}" for i in range(5)] + ["evil-a", "evil-b"]
    assert run(FedAvg(), glob, ups, [1] * 7, names)["w"].mean() > 5  # the mean is wrecked

    krum = Krum(f=2)
    out = run(krum, glob, ups, [1] * 7, names)
    chosen = krum.summary()["selected"]
    assert len(chosen) == 1 and chosen[0].startswith("h")
    assert torch.equal(out["w"], honest[int(chosen[0][1:])]["w"])  # one of the updates, exactly
    multi = MultiKrum(f=2)  # keeps K - f = 5: exactly the honest ones
    out = run(multi, glob, ups, [1] * 7, names)
    assert multi.summary() == {"selected": [f"h{i}" for i in range(5)]}
    assert torch.allclose(out["w"], torch.stack([u["w"] for u in honest]).mean(0))
    assert out["n"].item() in range(5)
    order = [6, 2, 0, 5, 4, 1, 3]
    again = run(MultiKrum(f=2), glob, [ups[i] for i in order], [1] * 7, [names[i] for i in order])
    assert torch.equal(again["w"], out["w"])  # summed in node-name order, whatever the arrival order
    assert run(MultiKrum(f=2, m=2), glob, ups, [1] * 7, names)["b"].max() < 1.1


def test_krum_needs_2f_plus_3_updates():
    glob = {"w": torch.zeros(2)}
    krum = Krum(f=1)
    krum.begin(glob)
    for i in range(4):
        krum.add({"w": torch.full((2,), float(i))}, 1, f"n{i}")
    err = _code(krum.finish)
    assert err.code == "too_few_updates" and "at least 5" in err.message
    points = [{"w": torch.full((2,), v)} for v in (0.0, 1.5, 2.0, 2.5, 4.0)]
    assert run(Krum(f=1), glob, points, [1] * 5)["w"].tolist() == [2.0, 2.0]  # 2 nearest: 0.5 away in all
    evenly = [{"w": torch.full((2,), float(i))} for i in range(5)]  # 1, 2 and 3 score alike: n1 wins the tie
    assert run(Krum(f=1), glob, evenly, [1] * 5, [f"n{i}" for i in (4, 3, 2, 1, 0)])["w"].tolist() == [3.0, 3.0]


# ----------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_carries_control_variates_as_the_paper_does():
    """x <- mean(y_i); c <- c + |S|/N * mean(slot_i - c), with sample weights, checked by hand."""
    glob = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64), "bn.mean": torch.zeros(2, dtype=torch.float64)}
    agg = Scaffold()
    agg.begin(glob, ["w"], population=4)
    sent = agg.round_tensors()
    assert list(sent) == ["scaffold.c/w"] and sent["scaffold.c/w"].tolist() == [0.0, 0.0]  # no c for buffers
    ups = [{"w": torch.tensor([0.0, 2.0], dtype=torch.float64), "bn.mean": torch.ones(2, dtype=torch.float64),
            "scaffold.c/w": torch.tensor([1.0, 0.0], dtype=torch.float64)},
           {"w": torch.tensor([3.0, 5.0], dtype=torch.float64), "bn.mean": torch.ones(2, dtype=torch.float64),
            "scaffold.c/w": torch.tensor([-3.0, 3.0], dtype=torch.float64)}]
    agg.add(ups[0], 1, "a")
    agg.add(ups[1], 3, "b")
    out = agg.finish()
    assert list(out) == ["w", "bn.mean"]  # the control variate never enters the model
    assert out["w"].tolist() == [2.25, 4.25] and out["bn.mean"].tolist() == [1.0, 1.0]
    c = (1 * torch.tensor([1.0, 0.0]) + 3 * torch.tensor([-3.0, 3.0])) / 4 * (2 / 4)  # 2 of 4 nodes took part
    agg.begin(out, ["w"], population=4)
    assert torch.allclose(agg.round_tensors()["scaffold.c/w"], c.double())
    # A secure-aggregation mean stands for all its survivors: count=2 scales c the same way.
    same = Scaffold()
    same.begin(glob, ["w"], population=4)
    mean = {k: (ups[0][k] + 3 * ups[1][k]) / 4 for k in ups[0]}
    same.add(mean, 4, "secure-sum", count=2)
    assert torch.allclose(same.finish()["w"], out["w"])
    same.begin(out, ["w"], population=4)
    assert torch.allclose(same.round_tensors()["scaffold.c/w"], c.double())
    # Updates must bring the slots back; model names may not collide with them.
    agg.begin(out, ["w"])
    assert _code(lambda: agg.add({"w": out["w"], "bn.mean": out["bn.mean"]}, 1, "a")).details["tensor"] == "scaffold.c/w"
    assert _code(lambda: Scaffold().begin({"scaffold.c/w": torch.zeros(1)})).code == "bad_state"
