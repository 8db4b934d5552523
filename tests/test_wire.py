"""The wire codec: round trips for every dtype and shape, zero copy, and every malformed input."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfl.errors import WireError
from meshfl.wire import DTYPES, Limits, Message, declare, decode, encode

declare("test.tensors", required={"round": "int"}, optional={"note": "str", "lr": "float", "tags": "list"}, tensors=True)
declare("test.plain", required={"name": "str"})


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.rand(n, generator=g) > 0.5).reshape(shape)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 100).to(dtype).reshape(shape)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype).reshape(shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bitwise equality (NaN-safe): compare the raw bytes.
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8).numpy()
    )


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(st.tuples(st.sampled_from(sorted(DTYPES)), shapes, st.integers(0, 2**16)), max_size=5),
    frame_bytes=st.sampled_from([8, 64, 1 << 20]),
    transpose=st.booleans(),
)
def test_round_trip_every_dtype_and_shape(specs, frame_bytes, transpose):
    tensors = {}
    for i, (dtype_name, shape, seed) in enumerate(specs):
        t = _tensor(DTYPES[dtype_name], shape, seed)
        if transpose and t.dim() >= 2:
            t = t.transpose(0, 1)  # non-contiguous input
        tensors[f"t{i}"] = t
    msg = Message("test.tensors", {"round": 3, "note": "héllo"}, tensors)
    out = decode(encode(msg, frame_bytes=frame_bytes))
    assert out.type == msg.type and out.id == msg.id and out.fields == msg.fields
    assert list(out.tensors) == list(tensors)
    for name, t in tensors.items():
        assert _same(out.tensors[name], t.contiguous()), name


def test_empty_tensors_from_numpy_round_trip():
    # numpy's empty arrays become stride-0 tensors, which torch cannot view as bytes.
    empty = torch.from_numpy(np.asarray([], dtype=np.float64))
    out = decode(encode(Message("test.tensors", {"round": 0}, {"values": empty})))
    assert out.tensors["values"].dtype == torch.float64 and out.tensors["values"].shape == (0,)


def test_state_dict_round_trip_and_reply_link():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    sd = model.state_dict()  # includes an int64 0-d tensor (num_batches_tracked)
    msg = Message("test.tensors", {"round": 1}, dict(sd))
    out = decode(encode(msg))
    assert set(out.tensors) == set(sd)
    for k in sd:
        assert _same(out.tensors[k], sd[k])
    model.load_state_dict(out.tensors)
    reply = out.reply("test.plain", {"name": "x"})
    assert reply.reply_to == msg.id


def test_sending_does_not_copy_tensor_bytes():
    t = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB, cut into 1 MiB frames
    frames = encode(Message("test.tensors", {"round": 0}, {"w": t}), frame_bytes=1 << 20)
    base = t.data_ptr()
    for i, frame in enumerate(frames[1:]):
        assert np.frombuffer(frame, dtype=np.uint8).ctypes.data == base + i * (1 << 20)


def test_receiving_views_single_frame_tensors():
    t = torch.arange(1000, dtype=torch.float64)
    frames = [bytearray(f) for f in encode(Message("test.tensors", {"round": 0}, {"w": t}))]
    out = decode(frames)
    frames[1][0:8] = np.float64(42.0).tobytes()  # mutate the received frame in place...
    assert out.tensors["w"][0].item() == 42.0  # ...and the tensor sees it: it is a view, no copy


def _frames(fields=None, tensors=None, mtype="test.tensors"):
    return encode(Message(mtype, fields if fields is not None else {"round": 1}, tensors or {}))


def _with_envelope(frames, **changes):
    env = orjson.loads(frames[0])
    env.update(changes)
    return [orjson.dumps(env), *frames[1:]]


def _code(frames, limits=Limits()):
    with pytest.raises(WireError) as info:
        decode(frames, limits)
    assert str(info.value)  # readable message
    return info.value.code


def test_malformed_envelopes_have_codes():
    assert _code([]) == "bad_envelope"
    assert _code([b"not json"]) == "bad_envelope"
    assert _code([b"[1,2]"]) == "bad_envelope"
    assert _code(_with_envelope(_frames(), v=99)) == "bad_version"
    assert _code(_with_envelope(_frames(), id=None)) == "bad_envelope"
    assert _code(_with_envelope(_frames(), id="x" * 65)) == "bad_envelope"


def test_unknown_type_and_bad_fields_have_codes():
    assert _code(_with_envelope(_frames(), type="no.such.type")) == "unknown_type"
    assert _code(_frames(fields={})) == "missing_field"
    assert _code(_frames(fields={"round": "one"})) == "bad_field"
    assert _code(_frames(fields={"round": True})) == "bad_field"  # bool is not an int here
    assert _code(_frames(fields={"round": 1, "intruder": 1})) == "bad_field"
    assert _code(_frames(fields={"name": "x"}, tensors={"w": torch.ones(2)}, mtype="test.plain")) == "too_many_frames"
    ok = decode(_frames(fields={"round": 1, "lr": 1}))  # an int is a valid float
    assert ok.fields["lr"] == 1


def test_bad_tensor_descriptors_have_codes():
    frames = _frames(tensors={"w": torch.ones(4, 4)})
    assert _code(_with_envelope(frames, b=[["w", "complex128", [4, 4], 128]])) == "bad_dtype"
    assert _code(_with_envelope(frames, b=[["w", "float32", [4, -4], 64]])) == "bad_shape"
    assert _code(_with_envelope(frames, b=[["w", "float32", [4, 4], 60]])) == "bad_length"
    assert _code(_with_envelope(frames, b=[["w", "float32"]])) == "bad_envelope"
    assert _code(_with_envelope(frames, b=[["w", "float32", [4, 5], 80]])) == "bad_length"
    assert _code(frames[:1]) == "too_many_frames"  # a frame is missing
    assert _code([*frames, b"extra"]) == "too_many_frames"
    truncated = [frames[0], bytes(frames[1])[:-4]]
    assert _code(truncated) == "bad_length"


def test_huge_declared_shape_is_refused_before_allocating():
    frames = _frames(tensors={"w": torch.ones(1)})
    huge = [["w", "float32", [2**40, 2**20], 4 * 2**60]]
    assert _code(_with_envelope(frames, b=huge)) == "oversize"


def test_limits_bound_envelope_frames_and_size():
    frames = _frames(tensors={"a": torch.ones(100), "b": torch.ones(100)})
    assert _code(frames, Limits(max_envelope_bytes=10)) == "oversize"
    assert _code(frames, Limits(max_frames=1)) == "too_many_frames"
    assert _code(frames, Limits(max_tensors=1)) == "too_many_frames"
    assert _code(frames, Limits(max_message_bytes=100)) == "oversize"
    assert _code(_with_envelope(frames, fb=0)) == "bad_envelope"


def test_unsupported_dtype_refused_when_sending():
    with pytest.raises(WireError) as info:
        encode(Message("test.tensors", {"round": 1}, {"c": torch.ones(2, dtype=torch.complex64)}))
    assert info.value.code == "bad_dtype"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), extra=st.lists(st.binary(max_size=64), max_size=3))
def test_random_bytes_never_crash_the_decoder(data, extra):
    try:
        decode([data, *extra])
    except WireError as exc:
        assert exc.code


def test_multi_frame_tensors_are_read_piecewise_and_relayed_without_copy():
    t = torch.arange(10_000, dtype=torch.float32)
    received = decode(encode(Message("test.tensors", {"round": 0}, {"w": t}), frame_bytes=4096))
    pieces = list(received.tensors.pieces("w"))
    assert len(pieces) == 10 and [start for start, _ in pieces] == list(range(0, 10_000, 1024))
    assert torch.equal(torch.cat([p for _, p in pieces]), t)
    # Relaying the received message re-sends the very same frames.
    relayed = encode(Message("test.tensors", {"round": 1}, received.tensors), frame_bytes=4096)
    originals = received.tensors.frames_of("w", 4096)
    assert all(np.frombuffer(a, np.uint8).ctypes.data == np.frombuffer(b, np.uint8).ctypes.data
               for a, b in zip(relayed[1:], originals))
    assert torch.equal(received.tensors["w"], t)  # gathered on demand


def test_tensor_packs_round_trip_and_reject_corruption(tmp_path):
    from meshfl.errors import StoreError
    from meshfl.store.blobs import BlobStore

    blobs = BlobStore(tmp_path)
    state = {"a": torch.randn(3, 5), "n": torch.tensor(7), "e": torch.empty(0, 2), "h": torch.randn(9).half()}
    blobs.write("m", state)
    back = blobs.read("m")
    assert all(_same(back[k], state[k]) for k in state)
    received = decode(encode(Message("test.tensors", {"round": 0}, state), frame_bytes=8))
    blobs.write("r", received.tensors)  # written frame by frame
    assert all(_same(blobs.read("r")[k], state[k]) for k in state)
    with open(blobs.path("m"), "r+b") as f:
        f.truncate(40)
    with pytest.raises(StoreError):
        blobs.read("m")
    with pytest.raises(StoreError):
        blobs.read("missing")


def test_a_pack_is_updated_in_place_and_replaced_files_are_recycled(tmp_path):
    import os

    from meshfl.errors import StoreError
    from meshfl.store.blobs import BlobStore, update_pack

    blobs = BlobStore(tmp_path)
    blobs.write("task", {"w": torch.ones(1000), "n": torch.tensor(3)})
    reader = blobs.read("task")  # a private mapping: what the worker reads the model from
    reader["w"].add_(5)  # writable, and the file stays intact
    assert torch.equal(blobs.read("task")["w"], torch.ones(1000))
    # The worker's result goes over the model, in the same file: same names, dtypes and shapes only.
    update_pack(blobs.path("task"), {"w": torch.arange(1000.0), "n": torch.tensor(4)})
    back = blobs.read("task")
    assert torch.equal(back["w"], torch.arange(1000.0)) and int(back["n"]) == 4
    for wrong in ({"w": torch.zeros(999), "n": torch.tensor(4)}, {"w": torch.zeros(1000)},
                  {"w": torch.zeros(1000, dtype=torch.float64), "n": torch.tensor(4)}):
        with pytest.raises(StoreError) as info:
            update_pack(blobs.path("task"), wrong)
        assert info.value.code == "bad_value"
    assert torch.equal(blobs.read("task")["w"], torch.arange(1000.0))  # a refused update wrote nothing
    # A replaced pack's file is kept as a spare and the next write reuses it (no fresh file).
    old_inode = os.stat(blobs.path("task")).st_ino
    del reader, back
    blobs.write("task", {"v": torch.arange(10, dtype=torch.int32)})
    assert torch.equal(blobs.read("task")["v"], torch.arange(10, dtype=torch.int32))
    blobs.write("next", {"x": torch.zeros(5)})
    assert os.stat(blobs.path("next")).st_ino == old_inode
    assert sorted(os.listdir(tmp_path)) == ["next.pack", "task.pack"]  # no temporary left behind
    open(blobs.path("failed") + ".new", "wb").close()  # a write a crash cut short, never installed
    open(blobs.path("failed") + ".new.tmp", "wb").close()  # and one cut short earlier still
    blobs.delete("failed")
    assert sorted(os.listdir(tmp_path)) == ["next.pack", "task.pack"]


def test_pack_stores_sharing_a_folder_never_trip_over_each_others_spares(tmp_path):
    from meshfl.store.blobs import BlobStore

    a, b = BlobStore(tmp_path), BlobStore(tmp_path)  # e.g. two experiments of one researcher
    for i in range(6):
        for store, name in ((a, "x"), (b, "y")):
            store.write(name, {"w": torch.full((100,), float(i))})
            store.write(name, {"w": torch.full((100,), float(i) + 0.5)})  # replaces: old file -> spare
        a.delete("x")
        assert torch.equal(b.read("y")["w"], torch.full((100,), i + 0.5))
    assert not a.exists("x") and b.exists("y")
