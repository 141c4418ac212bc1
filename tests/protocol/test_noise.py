"""The in-house Noise core: official vectors, noiseprotocol interop, hostile input.

noiseprotocol (the ``noise`` package) is a test-only oracle (SECURITY.md §1.1).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from protocol.errors import (
    AuthenticationError,
    HandshakeError,
    LocalProtocolError,
    MessageTooLargeError,
)
from protocol.noise import (
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    PATTERNS,
    CipherName,
    CipherState,
    DHName,
    HandshakeState,
    HashName,
    ProtocolName,
    SymmetricState,
    Token,
    parse_protocol_name,
)
from protocol.noise_vectors import Outcome, Summary, run_document

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "data" / "noise" / "cacophony.json"
SUITE = "25519_ChaChaPoly_SHA256"
REQUIRED = frozenset(
    f"Noise_{p}_{SUITE}" for p in ("XX", "XXpsk3", "K", "IK", "NNpsk0", "X")
)
LAST_LINE = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$")

# Low-order X25519 u-coordinates (little-endian): 0, 1, the two order-8 points,
# p - 1, p, p + 1; each also with the ignored top bit set.
_LOW_ORDER_BASE = (
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
)
LOW_ORDER = tuple(bytes.fromhex(h) for h in _LOW_ORDER_BASE) + tuple(
    bytes.fromhex(h)[:31] + bytes([bytes.fromhex(h)[31] | 0x80])
    for h in _LOW_ORDER_BASE
)


def private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


@cache
def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


# --- official vectors and the runner ----------------------------------------


@pytest.fixture(scope="module")
def vector_document() -> object:
    document: object = json.loads(VECTORS.read_text(encoding="utf-8"))
    return document


def test_all_cacophony_vectors_pass_in_process(vector_document: object) -> None:
    summary = run_document(vector_document)
    failures = [r for r in summary.results if r.outcome is Outcome.FAILED]
    assert failures == []
    assert summary.line() == "944 passed, 0 failed, 0 skipped"
    passed = summary.names(Outcome.PASSED)
    assert passed >= REQUIRED
    core = {r.name for r in summary.results if r.name.endswith(SUITE)}
    assert len(core) == 59
    assert core <= passed


def test_runner_cli_prints_summary_last() -> None:
    result = run_cli(VECTORS)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match is not None
    assert match[2] == "0"
    assert sum(int(group) for group in match.groups()) == 944


def test_runner_cli_fails_on_a_corrupted_vector(
    tmp_path: Path, vector_document: object
) -> None:
    assert isinstance(vector_document, dict)
    (vector,) = (
        v
        for v in vector_document["vectors"]
        if v["protocol_name"] == f"Noise_XX_{SUITE}"
    )
    vector = json.loads(json.dumps(vector))
    ciphertext = vector["messages"][1]["ciphertext"]
    flipped = "0" if ciphertext[-1] != "0" else "1"
    vector["messages"][1]["ciphertext"] = ciphertext[:-1] + flipped
    path = tmp_path / "corrupted.json"
    path.write_text(json.dumps({"vectors": [vector]}), encoding="utf-8")

    result = run_cli(path)
    assert result.returncode != 0
    assert result.stdout.strip().splitlines()[-1] == "0 passed, 1 failed, 0 skipped"
    assert "FAIL" in result.stderr


def test_runner_cli_rejects_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "not.json"
    path.write_text("[1, 2", encoding="utf-8")
    assert run_cli(path).returncode == 2


def run_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "protocol.noise_vectors", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def noise_connection(
    name: str,
    *,
    initiator: bool,
    prologue: bytes = b"",
    static_key: bytes | None = None,
    remote_static: bytes | None = None,
    psks: list[bytes] | None = None,
    ephemeral_key: bytes | None = None,
) -> NoiseConnection:
    conn = NoiseConnection.from_name(name.encode("ascii"))
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(prologue)
    if static_key is not None:
        conn.set_keypair_from_private_bytes(Keypair.STATIC, static_key)
    if remote_static is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_static)
    if psks:
        conn.set_psks(psks=psks)
    if ephemeral_key is None:
        conn.start_handshake()
    else:
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral_key)
        with pytest.warns(UserWarning, match="ephemeral"):
            conn.start_handshake()
    return conn


def snow_style_vector(
    name: str, pattern_keys: dict[str, bytes], count: int
) -> dict[str, object]:
    """A vector in snow's dialect ("name", no handshake_hash), made by noiseprotocol."""
    pattern = parse_protocol_name(name).pattern
    init_e, resp_e = private_key(), private_key()
    psks = [os.urandom(32) for _ in range(pattern.psk_count)]
    init = noise_connection(
        name,
        initiator=True,
        prologue=b"snow",
        static_key=pattern_keys.get("init_static"),
        remote_static=pattern_keys.get("init_remote_static"),
        psks=psks,
        ephemeral_key=init_e,
    )
    resp = noise_connection(
        name,
        initiator=False,
        prologue=b"snow",
        static_key=pattern_keys.get("resp_static"),
        remote_static=pattern_keys.get("resp_remote_static"),
        psks=psks,
        ephemeral_key=None if pattern.is_one_way else resp_e,
    )
    messages = []
    for i in range(count):
        payload = os.urandom(i + 3)
        sender, receiver = (
            (init, resp) if pattern.is_one_way or i % 2 == 0 else (resp, init)
        )
        if sender.handshake_finished:
            ciphertext = bytes(sender.encrypt(payload))
            assert bytes(receiver.decrypt(ciphertext)) == payload
        else:
            ciphertext = bytes(sender.write_message(payload))
            assert bytes(receiver.read_message(ciphertext)) == payload
        messages.append({"payload": payload.hex(), "ciphertext": ciphertext.hex()})
    vector: dict[str, object] = {
        "name": name,
        "init_prologue": b"snow".hex(),
        "resp_prologue": b"snow".hex(),
        "init_ephemeral": init_e.hex(),
        "resp_ephemeral": resp_e.hex(),  # snow gives it even in one-way vectors
        "messages": messages,
    }
    vector.update({k: v.hex() for k, v in pattern_keys.items()})
    if psks:
        vector["init_psks"] = vector["resp_psks"] = [p.hex() for p in psks]
    return vector


def test_runner_reads_snow_style_vectors() -> None:
    resp_static = private_key()
    document = {
        "vectors": [
            snow_style_vector(f"Noise_NNpsk0+psk2_{SUITE}", {}, 3),
            snow_style_vector(
                f"Noise_N_{SUITE}",
                {
                    "resp_static": resp_static,
                    "init_remote_static": public_key(resp_static),
                },
                2,
            ),
            snow_style_vector(
                f"Noise_XX_{SUITE}",
                {"init_static": private_key(), "resp_static": private_key()},
                1,
            ),
            {"name": f"Noise_XXfallback_{SUITE}", "messages": []},
            {"protocol_name": "Noise_XX_25519_ChaChaPoly_SHA3", "messages": []},
        ]
    }
    summary = run_document(document)
    assert summary.line() == "3 passed, 0 failed, 2 skipped", summary.results


def test_runner_fails_incomplete_vectors() -> None:
    summary = run_document({"vectors": [{"protocol_name": f"Noise_NN_{SUITE}"}, 7]})
    assert summary.line() == "0 passed, 2 failed, 0 skipped"


# --- interoperability with noiseprotocol --------------------------------------


def handshake_with_oracle(
    name: str, *, ours_initiator: bool
) -> tuple[HandshakeState, NoiseConnection]:
    prologue = os.urandom(12)
    pattern = parse_protocol_name(name).pattern
    statics = {True: private_key(), False: private_key()}
    psks = [os.urandom(32) for _ in range(pattern.psk_count)]

    def static(initiator: bool) -> bytes | None:
        needed = pattern.needs_local_static(initiator=initiator)
        return statics[initiator] if needed else None

    ours = HandshakeState(
        name,
        initiator=ours_initiator,
        prologue=prologue,
        static_key=static(ours_initiator),
        psks=psks,
    )
    theirs = noise_connection(
        name,
        initiator=not ours_initiator,
        prologue=prologue,
        static_key=static(not ours_initiator),
        psks=psks,
    )
    while not ours.is_complete:
        payload = os.urandom(len(name))
        if ours.is_our_turn:
            assert bytes(theirs.read_message(ours.write_message(payload))) == payload
        else:
            assert ours.read_message(bytes(theirs.write_message(payload))) == payload
    assert theirs.handshake_finished
    assert ours.handshake_hash == bytes(theirs.get_handshake_hash())
    their_static = static(not ours_initiator)
    expected = None if their_static is None else public_key(their_static)
    assert ours.remote_static == expected
    return ours, theirs


def exchange_transport(
    send: CipherState, recv: CipherState, theirs: NoiseConnection, rounds: int
) -> None:
    for size in range(rounds):
        plaintext = os.urandom(size * 7)
        assert bytes(theirs.decrypt(send.encrypt_with_ad(b"", plaintext))) == plaintext
        ciphertext = bytes(theirs.encrypt(plaintext))
        assert recv.decrypt_with_ad(b"", ciphertext) == plaintext


@pytest.mark.parametrize("ours_initiator", [True, False])
@pytest.mark.parametrize("pattern", ["XX", "XXpsk3", "IX", "NNpsk0+psk2"])
def test_interop_with_noiseprotocol(pattern: str, *, ours_initiator: bool) -> None:
    name = f"Noise_{pattern}_{SUITE}"
    for _ in range(10):
        ours, theirs = handshake_with_oracle(name, ours_initiator=ours_initiator)
        c1, c2 = ours.split()
        send, recv = (c1, c2) if ours_initiator else (c2, c1)
        exchange_transport(send, recv, theirs, 5)
        assert send.n == recv.n == 5


@pytest.mark.parametrize("ours_initiator", [True, False])
def test_rekey_matches_noiseprotocol(*, ours_initiator: bool) -> None:
    ours, theirs = handshake_with_oracle(
        f"Noise_XX_{SUITE}", ours_initiator=ours_initiator
    )
    c1, c2 = ours.split()
    send, recv = (c1, c2) if ours_initiator else (c2, c1)
    exchange_transport(send, recv, theirs, 3)
    for _ in range(3):
        send.rekey()
        theirs.rekey_inbound_cipher()
        recv.rekey()
        theirs.rekey_outbound_cipher()
        exchange_transport(send, recv, theirs, 3)
    assert send.n == recv.n == 12  # Rekey changes k, never n (§11.3).


def test_rekey_follows_the_spec_formula() -> None:
    key = os.urandom(32)
    state = CipherState(CipherName.CHACHAPOLY, key)
    state.set_nonce(41)
    state.rekey()
    new_key = ChaCha20Poly1305(key).encrypt(bytes(4) + b"\xff" * 8, bytes(32), b"")
    expected = CipherState(CipherName.CHACHAPOLY, new_key[:32])
    expected.set_nonce(41)
    assert state.n == 41
    assert state.encrypt_with_ad(b"ad", b"data") == expected.encrypt_with_ad(
        b"ad", b"data"
    )
    with pytest.raises(LocalProtocolError):
        CipherState().rekey()


# --- hostile input --------------------------------------------------------------

FUZZ_NAMES = tuple(
    f"Noise_{p}_{SUITE}" for p in ("XX", "XXpsk3", "IK", "NN", "KK", "K", "X1X1")
)
_STATIC = {True: bytes(range(32)), False: bytes(range(32, 64))}
_EPHEMERAL = {True: bytes(range(64, 96)), False: bytes(range(96, 128))}
_PSK = bytes(range(128, 160))


def fixed_side(name: str, *, initiator: bool) -> HandshakeState:
    """One side with fixed keys, so that every run gives the same transcript."""
    pattern = parse_protocol_name(name).pattern
    needs_static = pattern.needs_local_static(initiator=initiator)
    knows_remote = pattern.needs_remote_static(initiator=initiator)
    sends_e = pattern.sends_ephemeral(initiator=initiator)
    return HandshakeState(
        name,
        initiator=initiator,
        prologue=b"fuzz",
        static_key=_STATIC[initiator] if needs_static else None,
        remote_static=public_key(_STATIC[not initiator]) if knows_remote else None,
        psks=[_PSK] * pattern.psk_count,
        ephemeral_key=_EPHEMERAL[initiator] if sends_e else None,
    )


def fixed_pair(name: str) -> tuple[HandshakeState, HandshakeState]:
    return fixed_side(name, initiator=True), fixed_side(name, initiator=False)


def reader_of(name: str, stage: int) -> HandshakeState:
    """The side that reads message ``stage``, fed the genuine transcript before it."""
    reader = fixed_side(name, initiator=stage % 2 == 1)
    for genuine in transcript(name)[:stage]:
        if reader.is_our_turn:
            assert reader.write_message(b"payload") == genuine
        else:
            reader.read_message(genuine)
    return reader


def advance(
    pair: tuple[HandshakeState, HandshakeState], count: int
) -> tuple[HandshakeState, HandshakeState]:
    """Run ``count`` genuine messages; return (next writer, next reader)."""
    init, resp = pair
    for _ in range(count):
        writer, reader = (init, resp) if init.is_our_turn else (resp, init)
        reader.read_message(writer.write_message(b"payload"))
    return (init, resp) if init.is_our_turn else (resp, init)


@cache
def transcript(name: str) -> tuple[bytes, ...]:
    init, resp = fixed_pair(name)
    messages = []
    while not init.is_complete:
        writer, reader = (init, resp) if init.is_our_turn else (resp, init)
        message = writer.write_message(b"payload")
        reader.read_message(message)
        messages.append(message)
    return tuple(messages)


MUTATIONS = ("random", "flip", "truncate", "extend", "splice")
FUZZ_CASES = tuple(
    (name, stage, kind)
    for name in FUZZ_NAMES
    for stage in range(len(parse_protocol_name(name).pattern.messages))
    for kind in MUTATIONS
)


def mutate(genuine: bytes, kind: str, position: int, blob: bytes) -> bytes:
    cut = position % (len(genuine) + 1)
    if kind == "random":
        return blob
    if kind == "flip":
        mutable = bytearray(genuine)
        mutable[position % len(genuine)] ^= blob[0] if blob and blob[0] else 0x01
        return bytes(mutable)
    if kind == "truncate":
        return genuine[:cut]
    if kind == "extend":
        return genuine + (blob or b"\0")
    return genuine[:cut] + blob


@settings(
    max_examples=3000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.sampled_from(FUZZ_CASES),
    st.integers(0, 2**16),
    st.binary(max_size=200),
)
def test_read_message_raises_only_remote_errors(
    case: tuple[str, int, str], position: int, blob: bytes
) -> None:
    name, stage, kind = case
    genuine = transcript(name)[stage]
    data = mutate(genuine, kind, position, blob)
    reader = reader_of(name, stage)
    try:
        reader.read_message(data)
    except (HandshakeError, AuthenticationError):
        # A failed handshake stays failed, for reading and writing alike.
        with pytest.raises(HandshakeError):
            reader.read_message(genuine)
        with pytest.raises(LocalProtocolError):
            reader.write_message(b"")
    else:
        assert data == genuine or not reader_has_key(name, stage)


def reader_has_key(name: str, stage: int) -> bool:
    """Whether message ``stage`` ends with an AEAD tag (covering all its bytes)."""
    pattern = parse_protocol_name(name).pattern
    seen = [token for message in pattern.messages[: stage + 1] for token in message]
    return pattern.psk_count > 0 or any(t not in (Token.E, Token.S) for t in seen)


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=200), st.integers(0, MAX_NONCE - 1))
def test_transport_decrypt_raises_only_authentication_error(
    data: bytes, nonce: int
) -> None:
    state = CipherState(CipherName.CHACHAPOLY, bytes(32))
    state.set_nonce(nonce)
    with pytest.raises(AuthenticationError):
        state.decrypt_with_ad(b"", data)
    assert state.n == nonce


@pytest.mark.parametrize("point", LOW_ORDER, ids=lambda p: p.hex()[:8] + p.hex()[-2:])
def test_low_order_public_keys_are_rejected(point: bytes) -> None:
    # Message 1 of NN is only "e": checked on arrival, not at the next write.
    _, responder = fixed_pair(f"Noise_NN_{SUITE}")
    with pytest.raises(HandshakeError):
        responder.read_message(point)
    # Message 2 of XX starts "e, ee": the DH itself fails.
    writer, initiator = advance(fixed_pair(f"Noise_XX_{SUITE}"), 1)
    genuine = writer.write_message(b"")
    with pytest.raises(HandshakeError):
        initiator.read_message(point + genuine[32:])
    # A pinned remote static key is the caller's: refused at construction.
    with pytest.raises(LocalProtocolError):
        HandshakeState(f"Noise_NK_{SUITE}", initiator=True, remote_static=point)


def test_nonce_exhaustion() -> None:
    key = os.urandom(32)
    sender, receiver = CipherState(key=key), CipherState(key=key)
    sender.set_nonce(MAX_NONCE - 1)
    receiver.set_nonce(MAX_NONCE - 1)
    last = sender.encrypt_with_ad(b"", b"last")
    assert sender.n == MAX_NONCE
    with pytest.raises(LocalProtocolError):
        sender.encrypt_with_ad(b"", b"one too many")
    assert receiver.decrypt_with_ad(b"", last) == b"last"
    with pytest.raises(AuthenticationError):
        receiver.decrypt_with_ad(b"", last)
    for bad in (-1, MAX_NONCE + 1):
        with pytest.raises(LocalProtocolError):
            sender.set_nonce(bad)
    sender.rekey()  # uses nonce 2**64 - 1 internally, allowed at any n


def test_failed_transport_decrypt_keeps_the_nonce() -> None:
    key = os.urandom(32)
    sender, receiver = CipherState(key=key), CipherState(key=key)
    ciphertext = sender.encrypt_with_ad(b"hdr", b"hello")
    tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    for data, ad in ((tampered, b"hdr"), (ciphertext, b"HDR"), (ciphertext[:15], b"")):
        with pytest.raises(AuthenticationError):
            receiver.decrypt_with_ad(ad, data)
        assert receiver.n == 0
    assert receiver.decrypt_with_ad(b"hdr", ciphertext) == b"hello"
    assert receiver.n == 1


def test_wrong_psk_fails_authentication() -> None:
    name = f"Noise_XXpsk3_{SUITE}"
    init = HandshakeState(
        name,
        initiator=True,
        prologue=b"fuzz",
        static_key=_STATIC[True],
        psks=[bytes(32)],
    )
    _, resp = fixed_pair(name)
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    with pytest.raises(AuthenticationError):
        resp.read_message(init.write_message(b""))


def test_wrong_prologue_fails_authentication() -> None:
    name = f"Noise_XX_{SUITE}"
    init = HandshakeState(
        name, initiator=True, prologue=b"v2", static_key=_STATIC[True]
    )
    _, resp = fixed_pair(name)
    resp.read_message(init.write_message(b""))
    with pytest.raises(AuthenticationError):
        init.read_message(resp.write_message(b""))


# --- API contract ------------------------------------------------------------------


def test_parse_protocol_name_returns_a_typed_value() -> None:
    parsed = parse_protocol_name("Noise_XXpsk0+psk3_448_AESGCM_BLAKE2b")
    assert isinstance(parsed, ProtocolName)
    assert (parsed.dh, parsed.cipher, parsed.hash) == (
        DHName.X448,
        CipherName.AESGCM,
        HashName.BLAKE2B,
    )
    assert parsed.pattern.name == "XXpsk0+psk3"
    assert parsed.pattern.psk_count == 2
    assert parsed.pattern.messages[0] == (Token.PSK, Token.E)
    assert parsed.pattern.messages[2] == (Token.S, Token.SE, Token.PSK)
    assert PATTERNS["IK"].messages == (
        (Token.E, Token.ES, Token.S, Token.SS),
        (Token.E, Token.EE, Token.SE),
    )


@pytest.mark.parametrize(
    ("name", "piece"),
    [
        ("Noise_XXfallback_25519_ChaChaPoly_SHA256", "fallback"),
        ("Noise_XXhfs_25519+Kyber1024_ChaChaPoly_SHA256", "hfs"),
        ("Noise_ZZ_25519_ChaChaPoly_SHA256", "ZZ"),
        ("Noise_XXpsk4_25519_ChaChaPoly_SHA256", "psk4"),
        ("Noise_XXpsk0+psk0_25519_ChaChaPoly_SHA256", "repeated"),
        ("Noise_XX_25519+Kyber1024_ChaChaPoly_SHA256", "25519+Kyber1024"),
        ("Noise_XX_P256_ChaChaPoly_SHA256", "P256"),
        ("Noise_XX_25519_AESGCMSIV_SHA256", "AESGCMSIV"),
        ("Noise_XX_25519_ChaChaPoly_SHA3", "SHA3"),
        ("NoisePSK_XX_25519_ChaChaPoly_SHA256", "Noise_"),
        ("Noise_XX_25519_ChaChaPoly", "Noise_"),
        ("Noise_xx_25519_ChaChaPoly_SHA256", "xx"),
    ],
)
def test_parse_protocol_name_rejects_unsupported_pieces(name: str, piece: str) -> None:
    with pytest.raises(LocalProtocolError, match=re.escape(piece)):
        parse_protocol_name(name)


def test_caller_misuse_raises_local_protocol_error() -> None:
    name = f"Noise_XX_{SUITE}"
    init, resp = fixed_pair(name)
    cases: list[Callable[[], object]] = [
        lambda: resp.write_message(b""),  # not the responder's turn
        init.split,  # handshake not complete
        lambda: init.handshake_hash,
        lambda: HandshakeState(name, initiator=True),  # static key missing
        lambda: HandshakeState(
            name,
            initiator=True,
            static_key=_STATIC[True],
            remote_static=public_key(_STATIC[False]),  # XX transmits it: no pin here
        ),
        lambda: HandshakeState(name, initiator=True, static_key=b"short"),
        lambda: HandshakeState(f"Noise_NN_{SUITE}", initiator=True, psks=[_PSK]),
        lambda: HandshakeState(f"Noise_NNpsk0_{SUITE}", initiator=True, psks=[b"x"]),
        lambda: HandshakeState(f"Noise_N_{SUITE}", initiator=False, ephemeral_key=_PSK),
        lambda: CipherState(key=b"short"),
    ]
    for case in cases:
        with pytest.raises(LocalProtocolError):
            case()
    with pytest.raises(MessageTooLargeError) as too_large:
        init.write_message(bytes(MAX_MESSAGE_LEN - 31))
    assert too_large.value.size == MAX_MESSAGE_LEN + 1
    init.write_message(bytes(MAX_MESSAGE_LEN - 32))  # exactly the limit


def test_split_once_and_out_of_turn_messages() -> None:
    init, resp = fixed_pair(f"Noise_NN_{SUITE}")
    message1 = init.write_message(b"")
    with pytest.raises(HandshakeError):
        init.read_message(message1)  # the initiator must not read now
    init, resp = fixed_pair(f"Noise_NN_{SUITE}")
    advance((init, resp), 2)
    assert init.is_complete
    assert resp.is_complete
    resp_c1, resp_c2 = resp.split()
    with pytest.raises(HandshakeError):
        resp.read_message(message1)  # after completion
    with pytest.raises(LocalProtocolError):
        init.write_message(b"")
    init_c1, init_c2 = init.split()
    assert resp_c1.decrypt_with_ad(b"", init_c1.encrypt_with_ad(b"", b"a")) == b"a"
    assert init_c2.decrypt_with_ad(b"", resp_c2.encrypt_with_ad(b"", b"b")) == b"b"
    with pytest.raises(LocalProtocolError):
        init.split()


def test_ephemeral_keys_come_from_the_injected_source() -> None:
    name = f"Noise_NN_{SUITE}"
    calls: list[int] = []

    def randbytes(size: int) -> bytes:
        calls.append(size)
        return bytes([7]) * size

    first = HandshakeState(name, initiator=True, randbytes=randbytes)
    second = HandshakeState(name, initiator=True, randbytes=randbytes)
    assert first.write_message(b"") == second.write_message(b"")
    assert calls == [32, 32]
    default = HandshakeState(name, initiator=True).write_message(b"")
    assert default != HandshakeState(name, initiator=True).write_message(b"")


def test_oversized_handshake_message_is_rejected() -> None:
    _, resp = fixed_pair(f"Noise_NN_{SUITE}")
    with pytest.raises(HandshakeError):
        resp.read_message(bytes(MAX_MESSAGE_LEN + 1))


def test_symmetric_state_initialisation_pads_or_hashes_the_name() -> None:
    short = SymmetricState(b"Noise_NN_25519_AESGCM_SHA256")
    assert short.handshake_hash == b"Noise_NN_25519_AESGCM_SHA256".ljust(32, b"\0")
    assert not short.has_key


def test_error_text_carries_no_key_material() -> None:
    name = f"Noise_XX_{SUITE}"
    writer, reader = advance(fixed_pair(name), 1)
    genuine = writer.write_message(b"secret payload")
    secrets = [_STATIC[True].hex(), _EPHEMERAL[True].hex(), genuine.hex()]
    for data in (genuine[:-1] + b"\0", genuine[:40], LOW_ORDER[0] + genuine[32:]):
        _, reader = advance(fixed_pair(name), 1)
        with pytest.raises((HandshakeError, AuthenticationError)) as info:
            reader.read_message(data)
        text = str(info.value) + repr(info.value)
        assert not re.search(r"[0-9a-f]{16}", text)
        assert "secret" not in text
        assert all(s not in text for s in secrets)


def test_noise_modules_are_sans_io() -> None:
    forbidden = {"asyncio", "socket", "logging", "threading", "bleak", "aiomqtt"}
    for module in ("noise.py", "noise_vectors.py"):
        tree = ast.parse((REPO / "protocol" / module).read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & forbidden, module


def test_summary_counts() -> None:
    assert Summary(()).line() == "0 passed, 0 failed, 0 skipped"
