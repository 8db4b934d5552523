"""Tests for meshfl.crypto: identities, peer cards, sealed messages, Shamir shares, mask PRG."""

from __future__ import annotations

import base64
import hashlib
import os
import stat

import nacl.bindings
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfl.crypto import (
    CHUNK_BYTES,
    PRG_ALGORITHMS,
    SEAL_OVERHEAD,
    Identity,
    PeerCard,
    derive_seed,
    open_sealed,
    peer_id_of,
    prg_uint32,
    seal,
    shamir_combine,
    shamir_split,
    verify_signature,
    z85_decode,
    z85_encode,
)
from meshfl.crypto import _prg, _shamir
from meshfl.errors import CryptoError


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate("alice")


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate("bob")


@pytest.fixture(scope="module")
def mallory() -> Identity:
    return Identity.generate("mallory")


def _code(excinfo) -> str:
    return excinfo.value.code


# --- identity files ---------------------------------------------------------------------------


def test_create_then_load_round_trip(tmp_path):
    created = Identity.create(tmp_path, "site-a")
    loaded = Identity.load(tmp_path)
    assert loaded.name == "site-a"
    assert loaded.peer_id == created.peer_id
    assert loaded.card == created.card
    assert loaded.link_secret == created.link_secret
    assert bytes(loaded.box_secret) == bytes(created.box_secret)
    card_text = (tmp_path / "keys" / "identity.card").read_text().strip()
    assert PeerCard.from_text(card_text) == created.card


def test_secret_file_and_folder_modes_even_with_open_umask(tmp_path):
    old = os.umask(0)
    try:
        Identity.create(tmp_path, "site-a")
    finally:
        os.umask(old)
    keys = tmp_path / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "identity.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((keys / "identity.card").stat().st_mode) == 0o644
    assert not [p for p in keys.iterdir() if p.name.endswith(".tmp")]


def test_create_refuses_to_overwrite(tmp_path):
    first = Identity.create(tmp_path, "site-a")
    with pytest.raises(CryptoError) as excinfo:
        Identity.create(tmp_path, "site-b")
    assert _code(excinfo) == "exists"
    assert Identity.load(tmp_path).peer_id == first.peer_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_load_refuses_readable_secret(tmp_path, mode):
    Identity.create(tmp_path, "site-a")
    os.chmod(tmp_path / "keys" / "identity.key", mode)
    with pytest.raises(CryptoError) as excinfo:
        Identity.load(tmp_path)
    assert _code(excinfo) == "insecure_key_file"


def test_load_missing_and_malformed(tmp_path):
    with pytest.raises(CryptoError) as excinfo:
        Identity.load(tmp_path)
    assert _code(excinfo) == "no_identity"
    Identity.create(tmp_path, "site-a")
    path = tmp_path / "keys" / "identity.key"
    doc = orjson.loads(path.read_bytes())
    bad_docs = [b"not json", b"{}", orjson.dumps({**doc, "sign_seed": "00"}), orjson.dumps({**doc, "name": ""})]
    for bad in bad_docs:
        path.write_bytes(bad)
        with pytest.raises(CryptoError) as excinfo:
            Identity.load(tmp_path)
        assert _code(excinfo) == "bad_key_file"


def test_load_or_create(tmp_path):
    a = Identity.load_or_create(tmp_path, "site-a")
    b = Identity.load_or_create(tmp_path, "ignored")
    assert a.peer_id == b.peer_id and b.name == "site-a"


@pytest.mark.parametrize("name", ["", "x" * 65, "tab\there", "new\nline", None])
def test_bad_names(name):
    with pytest.raises(CryptoError) as excinfo:
        Identity.generate(name)
    assert _code(excinfo) == "bad_argument"


def test_repr_hides_secrets(alice):
    assert alice.link_secret.hex() not in repr(alice)
    assert alice.peer_id in repr(alice)


# --- keys, z85, peer ids ------------------------------------------------------------------------


def test_link_keys_are_a_curve_pair(alice):
    assert len(alice.link_secret) == len(alice.link_public) == 32
    assert nacl.bindings.crypto_scalarmult_base(alice.link_secret) == alice.link_public
    assert len(alice.link_secret_z85) == len(alice.link_public_z85) == 40
    assert z85_decode(alice.link_public_z85) == alice.link_public
    assert alice.card.link_key_z85 == alice.link_public_z85
    # link, box and identity keys are distinct keys
    assert len({alice.card.sign_key, alice.card.link_key, alice.card.box_key}) == 3
    assert bytes(alice.box_secret.public_key) == alice.card.box_key


@given(st.binary(max_size=64).map(lambda b: b[: len(b) - len(b) % 4]))
def test_z85_round_trip_and_matches_zmq(data):
    text = z85_encode(data)
    assert z85_decode(text) == data
    z85 = pytest.importorskip("zmq.utils.z85")
    assert text == z85.encode(data)


def test_z85_rfc_vector_and_errors():
    assert z85_encode(bytes([0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B])) == b"HelloWorld"
    for bad in (b"abc", b"Hell\x00"):
        with pytest.raises(CryptoError):
            z85_decode(bad)
    with pytest.raises(CryptoError):
        z85_encode(b"abc")


def test_peer_ids_distinct_and_stable():
    idents = [Identity.generate(f"n{i}") for i in range(40)]
    ids = {i.peer_id for i in idents}
    assert len(ids) == 40
    for ident in idents:
        pid = ident.peer_id
        assert pid == peer_id_of(ident.card.sign_key) == ident.card.peer_id
        assert len(pid) == 16 and pid == pid.lower() and pid.isascii()
        assert set(pid) <= set("abcdefghijklmnopqrstuvwxyz234567")
        assert pid.encode()[0] != 0
    expected = base64.b32encode(hashlib.blake2b(bytes(32), digest_size=10).digest()).decode().lower()
    assert peer_id_of(bytes(32)) == expected


# --- peer cards ---------------------------------------------------------------------------------


def test_card_text_and_dict_round_trip(alice):
    text = alice.card.to_text()
    assert text.startswith("meshfl1:") and "\n" not in text and "=" not in text
    assert PeerCard.from_text(text) == alice.card
    assert PeerCard.from_text("  " + text + "\n") == alice.card
    record = orjson.loads(orjson.dumps(alice.card.to_dict()))
    card = PeerCard.from_dict(record)
    assert card == alice.card and card.peer_id == alice.peer_id


def _card_raw(card: PeerCard) -> bytearray:
    body = card.to_text()[len("meshfl1:"):]
    return bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def _text(raw: bytes) -> str:
    return "meshfl1:" + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


# byte offsets inside the binary card: sign_key, link_key, box_key, signature, name
@pytest.mark.parametrize("offset", [1, 20, 33, 50, 65, 96, 97, 130, 160, 161])
def test_altered_card_field_rejected(alice, offset):
    raw = _card_raw(alice.card)
    raw[offset] ^= 0x01
    with pytest.raises(CryptoError) as excinfo:
        PeerCard.from_text(_text(raw))
    assert _code(excinfo) == "bad_signature"


def test_substituted_keys_rejected(alice, mallory):
    for field in ("link_key", "box_key", "signature"):
        record = {**alice.card.to_dict(), field: mallory.card.to_dict()[field]}
        with pytest.raises(CryptoError) as excinfo:
            PeerCard.from_dict(record)
        assert _code(excinfo) == "bad_signature"
    with pytest.raises(CryptoError) as excinfo:
        PeerCard.from_dict({**alice.card.to_dict(), "name": "alicf"})
    assert _code(excinfo) == "bad_signature"
    with pytest.raises(CryptoError) as excinfo:
        PeerCard.from_dict({**alice.card.to_dict(), "peer_id": mallory.peer_id})
    assert _code(excinfo) == "bad_card"


def test_malformed_cards(alice):
    raw = _card_raw(alice.card)
    versioned = bytearray(raw)
    versioned[0] = 2
    bad_texts = [
        "", "ssh-ed25519 AAAA", "meshfl1:", "meshfl1:!!!!", "meshfl2:" + alice.card.to_text()[8:],
        _text(raw[:100]), _text(raw[:161]), _text(versioned), _text(raw[:161] + b"\xff\xfe"), 12,
    ]
    for bad in bad_texts:
        with pytest.raises(CryptoError) as excinfo:
            PeerCard.from_text(bad)
        assert _code(excinfo) == "bad_card", bad
    for record in ({}, {**alice.card.to_dict(), "sign_key": "zz"}, {**alice.card.to_dict(), "box_key": "00"}):
        with pytest.raises(CryptoError) as excinfo:
            PeerCard.from_dict(record)
        assert _code(excinfo) == "bad_card"


# --- signatures ---------------------------------------------------------------------------------


@given(data=st.binary(max_size=256))
@settings(max_examples=30)
def test_sign_verify(alice, bob, data):
    signature = alice.sign(data)
    assert len(signature) == 64
    verify_signature(alice.card.sign_key, data, signature)
    with pytest.raises(CryptoError) as excinfo:
        verify_signature(bob.card.sign_key, data, signature)
    assert _code(excinfo) == "bad_signature"
    with pytest.raises(CryptoError):
        verify_signature(alice.card.sign_key, data + b"x", signature)


def test_verify_rejects_malformed_inputs(alice):
    sig = alice.sign(b"m")
    for key, s in ((b"short", sig), (alice.card.sign_key, sig[:63]), (alice.card.sign_key, b"")):
        with pytest.raises(CryptoError) as excinfo:
            verify_signature(key, b"m", s)
        assert _code(excinfo) == "bad_signature"


# --- sealed messages ----------------------------------------------------------------------------


@given(plaintext=st.binary(max_size=2048), header=st.binary(max_size=64))
@settings(max_examples=40)
def test_seal_round_trip(alice, bob, plaintext, header):
    sealed = seal(alice, bob.card, plaintext, header)
    assert len(sealed) == len(plaintext) + SEAL_OVERHEAD
    assert open_sealed(bob, alice.card, sealed, header) == plaintext


def test_seal_is_randomized_and_hides_plaintext(alice, bob):
    message = b"secret share " * 4
    a, b = seal(alice, bob.card, message), seal(alice, bob.card, message)
    assert a != b and message not in a


def test_tampered_sealed_message_rejected(alice, bob):
    header = b'{"src":"a","dst":"b"}'
    sealed = seal(alice, bob.card, b"pairwise seed share", header)
    for pos in range(0, len(sealed), 7):
        bad = bytearray(sealed)
        bad[pos] ^= 0x80
        with pytest.raises(CryptoError) as excinfo:
            open_sealed(bob, alice.card, bytes(bad), header)
        assert _code(excinfo) == "bad_signature"
    for bad_header in (b"", header + b" ", header.replace(b"b", b"c")):
        with pytest.raises(CryptoError) as excinfo:
            open_sealed(bob, alice.card, sealed, bad_header)
        assert _code(excinfo) == "bad_signature"
    with pytest.raises(CryptoError) as excinfo:
        open_sealed(bob, alice.card, sealed[: SEAL_OVERHEAD - 1], header)
    assert _code(excinfo) == "bad_box"


def test_wrong_recipient_cannot_open(alice, bob, mallory):
    sealed = seal(alice, bob.card, b"for bob only")
    with pytest.raises(CryptoError) as excinfo:
        open_sealed(mallory, alice.card, sealed)
    assert _code(excinfo) == "bad_box"


def test_wrong_sender_card_rejected(alice, bob, mallory):
    sealed = seal(alice, bob.card, b"from alice")
    with pytest.raises(CryptoError) as excinfo:
        open_sealed(bob, mallory.card, sealed)
    assert _code(excinfo) == "bad_signature"


def test_resigned_by_relay_rejected(alice, bob, mallory):
    """A relay that swaps in its own signature still cannot pass the box off as its own."""
    sealed = seal(alice, bob.card, b"from alice")
    from meshfl.crypto._box import _digest

    boxed = sealed[64:]
    forged = mallory.sign(_digest(b"", boxed)) + boxed
    with pytest.raises(CryptoError) as excinfo:
        open_sealed(bob, mallory.card, forged)
    assert _code(excinfo) == "bad_box"


def test_box_cache_reuses_boxes(alice, bob):
    assert alice._box_with(bob.card.box_key) is alice._box_with(bob.card.box_key)


# --- Shamir -------------------------------------------------------------------------------------


@st.composite
def _split_case(draw):
    secret = draw(st.binary(max_size=64))
    n = draw(st.integers(1, 12))
    t = draw(st.integers(1, n))
    subset = draw(st.lists(st.integers(1, n), min_size=t, max_size=n, unique=True))
    return secret, n, t, subset


@given(_split_case())
@settings(max_examples=60, deadline=None)
def test_shamir_any_t_of_n(case):
    secret, n, t, subset = case
    shares = shamir_split(secret, n, t)
    assert [i for i, _ in shares] == list(range(1, n + 1))
    chosen = [shares[i - 1] for i in subset]
    assert shamir_combine(chosen) == secret


@given(_split_case())
@settings(max_examples=40, deadline=None)
def test_shamir_fewer_than_t_shares(case):
    secret, n, t, subset = case
    if t < 2:
        return
    shares = shamir_split(secret, n, t)
    few = [shares[i - 1] for i in subset[: t - 1]]
    with pytest.raises(CryptoError) as excinfo:
        shamir_combine(few)
    assert _code(excinfo) == "not_enough_shares"
    # Interpolating them anyway gives an unrelated value, not the secret.
    value = (len(secret) << 512) | int.from_bytes(secret, "big")
    points = [(i, int.from_bytes(raw[1:], "big")) for i, raw in few]
    assert _shamir._interpolate(points, 0) != value


def test_shamir_keeps_leading_zeros_and_large_n():
    for secret in (b"", b"\x00", b"\x00\x00\x01", bytes(64), b"\xff" * 64, os.urandom(32)):
        assert shamir_combine(shamir_split(secret, 5, 3)[1:4]) == secret
    secret = os.urandom(32)
    shares = shamir_split(secret, 254, 100)
    assert shamir_combine(shares[-100:]) == secret


def test_shamir_detects_bad_shares():
    shares = shamir_split(b"k" * 32, 5, 3)
    x, raw = shares[0]
    corrupt = (x, raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(CryptoError) as excinfo:
        shamir_combine([corrupt] + shares[1:])  # more than t: the extra shares expose it
    assert _code(excinfo) == "bad_shares"
    other = shamir_split(b"k" * 32, 5, 2)
    bad_sets = [
        [shares[0], other[1], shares[2]],  # shares of two different splits
        [(1, b"short")], [(0, raw)], [(255, raw)],
        [(1, raw), (1, shares[1][1])],  # one index, two values
        ["junk"],
    ]
    for bad in bad_sets:
        with pytest.raises(CryptoError) as excinfo:
            shamir_combine(bad)
        assert _code(excinfo) == "bad_shares"
    with pytest.raises(CryptoError) as excinfo:
        shamir_combine([])
    assert _code(excinfo) == "not_enough_shares"
    # the same share twice counts once
    assert shamir_combine([shares[0], shares[0], shares[1], shares[2]]) == b"k" * 32


@pytest.mark.parametrize(
    "secret,n,t", [(b"x", 3, 4), (b"x", 3, 0), (b"x", 255, 2), (b"x" * 65, 3, 2), (b"x", 0, 0)]
)
def test_shamir_bad_arguments(secret, n, t):
    with pytest.raises(CryptoError) as excinfo:
        shamir_split(secret, n, t)
    assert _code(excinfo) == "bad_argument"


# --- mask PRG -----------------------------------------------------------------------------------

_WORDS_PER_CHUNK = CHUNK_BYTES // 4


@pytest.mark.parametrize("algorithm", PRG_ALGORITHMS)
def test_prg_deterministic_distinct_uniform(algorithm):
    seed_a, seed_b = bytes(range(32)), bytes(range(1, 33))
    a = prg_uint32(seed_a, 1_000_000, algorithm=algorithm)
    assert a.dtype == np.uint32 and a.shape == (1_000_000,)
    assert np.array_equal(a, prg_uint32(seed_a, 1_000_000, algorithm=algorithm))
    b = prg_uint32(seed_b, 1_000_000, algorithm=algorithm)
    assert np.mean(a == b) < 1e-4
    assert abs(a.mean(dtype=np.float64) / 2**31 - 1) < 0.01
    bits = np.unpackbits(a.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.002
    counts = np.bincount(a.view(np.uint8), minlength=256)
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 400  # 255 degrees of freedom


@pytest.mark.parametrize(
    "n", [0, 1, 7, _WORDS_PER_CHUNK - 9, _WORDS_PER_CHUNK - 8, _WORDS_PER_CHUNK - 1, _WORDS_PER_CHUNK,
          _WORDS_PER_CHUNK + 1, 2 * _WORDS_PER_CHUNK + 3]
)
def test_prg_prefix_consistent_across_chunk_boundaries(n):
    seed = hashlib.sha256(b"prefix").digest()
    long = prg_uint32(seed, 3 * _WORDS_PER_CHUNK)
    assert np.array_equal(prg_uint32(seed, n), long[:n])


def test_keystream_chunks_are_the_prg_words_chunk_by_chunk():
    from meshfl.crypto import AegisChunks

    seed = hashlib.sha256(b"chunks").digest()
    whole = prg_uint32(seed, 3 * _WORDS_PER_CHUNK + 100).view(np.uint8)
    chunks = AegisChunks()
    for i in range(3):
        assert chunks.chunk(seed, i).tobytes() == whole[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES].tobytes()
    assert chunks.chunk(seed, 3, 400).tobytes() == whole[3 * CHUNK_BYTES :].tobytes()  # a short last chunk
    if "aegis128l" in PRG_ALGORITHMS:  # and each chunk is libsodium's AEGIS-128L of zeros, by its own binding
        for index, n in ((0, CHUNK_BYTES), (3, 400)):
            nonce = _prg._NONCE_PREFIX + index.to_bytes(8, "little")
            expect = nacl.bindings.crypto_aead_aegis128l_encrypt(bytes(n), None, nonce, seed[:16])[:n]
            assert chunks.chunk(seed, index, n).tobytes() == expect


def test_prg_matches_libsodium_directly():
    seed = hashlib.sha256(b"kat").digest()
    if "aegis128l" in PRG_ALGORITHMS:
        nonce = _prg._NONCE_PREFIX + (1).to_bytes(8, "little")
        boxed = nacl.bindings.crypto_aead_aegis128l_encrypt(bytes(CHUNK_BYTES), None, nonce, seed[:16])
        expect = boxed[:CHUNK_BYTES]  # drop the tag
        got = prg_uint32(seed, 2 * _WORDS_PER_CHUNK)[_WORDS_PER_CHUNK:]
        assert got.tobytes() == expect
    chacha = prg_uint32(seed, 1000, algorithm="chacha20")
    assert chacha.tobytes() == nacl.bindings.randombytes_buf_deterministic(4000, seed)


def test_prg_out_buffer_and_errors():
    seed = bytes(32)
    out = np.zeros(5000, np.uint32)
    assert prg_uint32(seed, 5000, out=out) is out
    assert np.array_equal(out, prg_uint32(seed, 5000))
    if len(PRG_ALGORITHMS) > 1:
        assert not np.array_equal(out, prg_uint32(seed, 5000, algorithm="chacha20"))
    bad_calls = [
        {"seed": b"short", "n": 4},
        {"seed": seed, "n": -1},
        {"seed": seed, "n": 4, "out": np.zeros(5, np.uint32)},
        {"seed": seed, "n": 4, "out": np.zeros(4, np.int32)},
        {"seed": seed, "n": 4, "out": np.zeros(8, np.uint32)[::2]},
    ]
    for kwargs in bad_calls:
        with pytest.raises(CryptoError) as excinfo:
            prg_uint32(**kwargs)
        assert _code(excinfo) == "bad_argument"
    with pytest.raises(CryptoError) as excinfo:
        prg_uint32(seed, 4, algorithm="pcg64")
    assert _code(excinfo) == "unsupported"


def test_derive_seed():
    secret = bytes(range(32))
    s = derive_seed(secret, b"round-1|a|b")
    assert len(s) == 32 and s == derive_seed(secret, b"round-1|a|b")
    assert s != derive_seed(secret, b"round-2|a|b")
    assert s != derive_seed(bytes(range(1, 33)), b"round-1|a|b")
    for bad in (b"", b"x" * 15, b"x" * 65):
        with pytest.raises(CryptoError) as excinfo:
            derive_seed(bad, b"ctx")
        assert _code(excinfo) == "bad_argument"
