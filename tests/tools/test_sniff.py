"""``glasses-relay sniff``: the daemon's link recorded, read back by tshark.

One short ``--sim --plaintext`` recording (emulated glasses, the real
daemon, handshake included) is shared by the tests of this module: tshark
decodes every ATT PDU with no expert item, ``replay --summary --json``
agrees with tshark's counts, the Lua dissector reassembles every value, and
the comments carry the decrypted messages. A second, redacted recording
holds no original address, no comment and values cut short. The redaction
rules themselves are checked on handmade HCI packets.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from protocol.capture import (
    CaptureError,
    CaptureWriter,
    glasses_services,
    messages_in_comment,
    read_capture,
    read_packets,
)
from protocol.capture.containers import (
    encode_pcapng_epb,
    encode_pcapng_idb,
    encode_pcapng_shb,
)
from protocol.capture.rewrite import Pseudonyms, pcapng_to_btsnoop, redact_with_stats
from protocol.constants import MessageKind
from protocol.gatt import RX_CHAR_UUID, TX_CHAR_UUID
from relay.sim.peripheral import GLASSES_DEFAULT_ADDRESS
from tools.cli import main
from tools.replay import main as replay_main

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "tools" / "wireshark" / "glasses_relay.lua"
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(
    TSHARK is None, reason="tshark is the oracle (make system-tools)"
)
NAMES = {0x1B: "notify", 0x1D: "indicate", 0x12: "write_req", 0x52: "write_cmd"}
NAMES[0x0B] = "read_rsp"
GLASSES = bytes(int(p, 16) for p in reversed(GLASSES_DEFAULT_ADDRESS.split(":")))


@dataclass
class Recording:
    path: Path
    summary: dict[str, Any]
    err: str


def sniff(path: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> Recording:
    assert main(["sniff", "--sim", "--out", str(path), "--json", *args]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert isinstance(summary, dict)
    return Recording(path, summary, err)


@pytest.fixture(scope="module")
def plaintext(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    path = tmp_path_factory.mktemp("sniff") / "day.pcapng"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(
            ["sniff", "--sim", "--duration", "4", "--plaintext", "--json",
             "--out", str(path)]
        )  # fmt: skip
    assert code == 0, err.getvalue()
    assert "packets" in err.getvalue()  # the progress line
    return Recording(path, json.loads(out.getvalue()), err.getvalue())


def tshark(path: Path, *args: str) -> str:
    assert TSHARK is not None
    return subprocess.run(
        [TSHARK, "-r", str(path), *args],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip


def expert_sections(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        if line.endswith(")") and " (" in line and not line.startswith(" "):
            name, _, count = line.partition(" (")
            out[name] = int(count.rstrip(")"))
    return out


@needs_tshark
def test_tshark_decodes_every_att_pdu_with_no_expert_item(plaintext: Recording) -> None:
    expert = expert_sections(tshark(plaintext.path, "-q", "-z", "expert"))
    assert set(expert) <= {"Comments"}, expert  # no errors, warnings or notes
    assert expert["Comments"] == plaintext.summary["plaintext_comments"] > 0
    opcodes = tshark(plaintext.path, "-T", "fields", "-e", "btatt.opcode").split()
    capture = read_capture(plaintext.path.read_bytes())
    assert len(opcodes) == len(capture.att) == plaintext.summary["att_pdus"]
    assert [int(o, 16) for o in opcodes] == [op.opcode for op in capture.att]
    # What the run was about: writes from the phone, notifications from the glasses.
    assert plaintext.summary["att"]["notify"] > 5
    assert plaintext.summary["att"]["write_cmd"] > 5


@needs_tshark
def test_replay_summary_agrees_with_tshark(
    plaintext: Recording, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tshark(plaintext.path, "-T", "fields", "-e", "btatt.opcode")
    by_opcode = Counter(int(v, 16) for v in out.split())
    theirs = {name: by_opcode[opcode] for opcode, name in NAMES.items()}
    assert replay_main([str(plaintext.path), "--summary", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["att"] == theirs == plaintext.summary["att"]
    assert doc["packets"] == plaintext.summary["packets"]
    assert doc["format"] == "pcapng"
    assert doc["linktype"] == 201
    assert doc["connections"] == 1


@needs_tshark
def test_every_value_is_a_fragment_and_records_reassemble(plaintext: Recording) -> None:
    args = ["-X", f"lua_script:{LUA}", "-T", "fields", "-E", "occurrence=f"]
    fields = ["btatt.opcode", "glasses_relay.frag.seq", "glasses_relay.record.type"]
    for name in fields:
        args += ["-e", name]
    rows = [line.split("\t") for line in tshark(plaintext.path, *args).splitlines()]
    values = [r for r in rows if r[0] in ("0x1b", "0x52")]
    assert values
    assert all(r[1] for r in values)  # each one dissected as a fragment
    records = Counter(r[2] for r in values if r[2])
    assert records["0x01"] == 3  # Noise_XXpsk3 (pairing): three messages
    assert records["0x02"] > 5


def test_plaintext_comments_carry_the_decrypted_messages(plaintext: Recording) -> None:
    capture = read_capture(plaintext.path.read_bytes())
    up: list[MessageKind] = []
    down: list[MessageKind] = []
    for op in capture.att:
        messages = messages_in_comment(op.comment)
        if op.opcode == 0x1B:
            up += [m.kind for m in messages]
        elif op.opcode == 0x52:
            down += [m.kind for m in messages]
        else:
            assert not messages
    assert MessageKind.REQUEST in up
    assert MessageKind.MODE in down  # sent right after every handshake
    assert MessageKind.CLOCK_SYNC in down
    commented = sum(1 for op in capture.att if op.comment)
    assert commented == plaintext.summary["plaintext_comments"]


@needs_tshark
def test_redacted_btsnoop_has_no_address_comment_or_whole_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "shared.btsnoop"
    rec = sniff(path, "--duration", "2", "--redact", "--truncate", "4", capsys=capsys)
    data = path.read_bytes()
    assert data.startswith(b"btsnoop\x00")
    assert rec.summary["format"] == "btsnoop"
    assert rec.summary["redacted"] is True
    assert GLASSES not in data
    capture = read_capture(data)
    (conn,) = capture.connections
    assert conn.peer is not None
    assert conn.peer != GLASSES_DEFAULT_ADDRESS
    values = [op for op in capture.att if op.opcode in (0x1B, 0x52)]
    assert values
    assert all(len(op.value) <= 4 for op in values)
    assert sum(op.truncated for op in values) > len(values) // 2
    assert not any(op.comment for op in capture.att)
    expert = expert_sections(tshark(path, "-q", "-z", "expert"))
    assert not expert, expert
    opcodes = tshark(path, "-T", "fields", "-e", "btatt.opcode").split()
    assert len(opcodes) == len(capture.att)


def test_user_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["--sim", "--out", str(tmp_path / "x.txt")], "must end in .pcapng or"),
        (["--sim", "--out", str(tmp_path / "no" / "x.pcapng")], "no directory"),
        (["--sim", "--out", str(tmp_path)], "must end in"),
        (["--sim", "--plaintext", "--redact", "--out", str(tmp_path / "a.pcapng")],
         "exclude each other"),
        (["--sim", "--truncate", "3", "--out", str(tmp_path / "a.pcapng")],
         "needs --redact"),
        (["--sim", "--duration", "0", "--out", str(tmp_path / "a.pcapng")],
         "--duration"),
        (["--address", "nope", "--out", str(tmp_path / "a.pcapng")], "--address"),
        (["--sim", "--profile", "nope", "--out", str(tmp_path / "a.pcapng")],
         "--profile"),
    ]  # fmt: skip
    for args, words in cases:
        assert main(["sniff", *args]) == 2, args
        out, err = capsys.readouterr()
        assert out == ""
        assert len(err.strip().splitlines()) == 1, err
        assert words in err, err
        assert "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_no_adapter_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No D-Bus here, as on a machine without BlueZ: bleak cannot scan.
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    monkeypatch.setenv("GLASSES_RELAY_STATE_DIR", str(tmp_path / "state"))
    out_file = tmp_path / "a.pcapng"
    code = main(["sniff", "--address", "AA:BB:CC:DD:EE:FF", "--out", str(out_file)])
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Bluetooth adapter" in err
    assert not out_file.exists()
    assert not out_file.with_name("a.pcapng.part").exists()


# --- the redaction rules on handmade packets ------------------------------------

LTK = bytes(range(0xA0, 0xB0))
IRK = bytes(range(0xC0, 0xD0))
PEER = bytes.fromhex("665544332211")  # 11:22:33:44:55:66 in HCI order


def h4_file(packets: list[tuple[int, bytes]]) -> bytes:
    out = encode_pcapng_shb(comment="test") + encode_pcapng_idb(201)
    for i, (direction, h4) in enumerate(packets):
        out += encode_pcapng_epb(
            i, direction.to_bytes(4, "big") + h4, comment="secret comment"
        )
    return out


def command(opcode: int, params: bytes) -> bytes:
    return b"\x01" + opcode.to_bytes(2, "little") + bytes([len(params)]) + params


def event(code: int, params: bytes) -> bytes:
    return b"\x04" + bytes([code, len(params)]) + params


def acl(handle: int, l2cap: bytes, cid: int) -> bytes:
    pdu = len(l2cap).to_bytes(2, "little") + cid.to_bytes(2, "little") + l2cap
    return b"\x02" + handle.to_bytes(2, "little") + len(pdu).to_bytes(2, "little") + pdu


def test_keys_are_cut_and_addresses_pseudonymised_consistently() -> None:
    create = command(0x200D, bytes(6) + PEER + bytes(13))  # LE Create Connection
    complete = event(0x3E, b"\x01\x00\x40\x00\x00\x01" + PEER + bytes(7))
    encrypt = command(0x2019, b"\x40\x00" + bytes(10) + LTK)  # LE Enable Encryption
    ltk_reply = command(0x201A, b"\x40\x00" + LTK)
    smp_ltk = acl(0x40, b"\x06" + LTK, 0x0006)  # SMP Encryption Information
    smp_irk = acl(0x40, b"\x08" + IRK, 0x0006)  # SMP Identity Information
    smp_addr = acl(0x40, b"\x09\x01" + PEER, 0x0006)  # Identity Address Information
    name = b"\x0b\x09Bob's specs"  # AD: Complete Local Name
    adv = event(0x3E, b"\x02\x01\x00\x01" + PEER + bytes([len(name)]) + name + b"\xc0")
    notify = acl(0x40, b"\x1b\x12\x00" + b"payload!", 0x0004)
    data = h4_file(
        [(0, create), (1, complete), (0, encrypt), (0, ltk_reply), (1, smp_ltk),
         (1, smp_irk), (1, smp_addr), (1, adv), (1, notify)]
    )  # fmt: skip
    out, stats = redact_with_stats(data, key=b"k" * 32, truncate=3)
    assert LTK not in out
    assert IRK not in out
    assert PEER not in out
    assert b"Bob's" not in out
    assert b"secret comment" not in out
    assert b"payload!" not in out
    assert stats.keys_removed == 4
    assert stats.addresses == 1
    assert stats.values_truncated == 1
    pseudonym = Pseudonyms(b"k" * 32).address(PEER)
    assert out.count(pseudonym) == 4  # create, complete, identity, advertising
    assert pseudonym[5] & 0xC0 == 0xC0  # a random static address
    packets = read_packets(out).packets
    assert [len(p.data) < p.orig_len for p in packets] == [
        False, False, True, True, True, True, False, False, True,
    ]  # fmt: skip
    # The same key gives the same pseudonyms: one file's runs line up.
    again, _ = redact_with_stats(data, key=b"k" * 32, truncate=3)
    assert again == out
    other, _ = redact_with_stats(data, key=b"j" * 32, truncate=3)
    assert pseudonym not in other


def test_redacting_a_written_capture_keeps_it_readable() -> None:
    w = CaptureWriter(glasses_services())
    w.connect(0x40, "C0:11:22:33:44:55", 1.0)
    w.discover(0x40, 1.01)
    w.att_notify(0x40, TX_CHAR_UUID, bytes(range(40)), 1.1, comment="x")
    w.att_write_cmd(0x40, RX_CHAR_UUID, bytes(30), 1.2)
    w.disconnect(0x40, 2.0)
    out, stats = redact_with_stats(w.getvalue(), key=b"k" * 32, truncate=None)
    capture = read_capture(out)
    assert capture.connections[0].peer != "C0:11:22:33:44:55"
    assert [op.value for op in capture.att if op.opcode in (0x1B, 0x52)] == [
        bytes(range(40)), bytes(30),
    ]  # fmt: skip
    assert stats.comments_dropped == 1
    # And the btsnoop export of a pcapng is the writer's own.
    assert pcapng_to_btsnoop(w.getvalue()) == w.to_btsnoop()


def test_rewriting_any_bytes_returns_a_capture_or_raises_capture_error() -> None:
    # The rewriters sit on the readers (fuzzed in tests/protocol/test_capture.py)
    # and must keep their contract: a value or CaptureError, nothing else.
    rng = random.Random(20260511)
    w = CaptureWriter(glasses_services())
    w.connect(0x40, "C0:11:22:33:44:55", 1.0)
    w.discover(0x40, 1.01)
    w.att_notify(0x40, TX_CHAR_UUID, bytes(range(60)), 1.1, comment="x")
    w.disconnect(0x40, 2.0)
    smp = h4_file([(1, acl(0x40, b"\x06" + LTK, 0x0006)), (0, command(0x201A, LTK))])
    seeds = [w.getvalue(), w.to_btsnoop(), smp]
    refused = 0
    for i in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(data))
            if i % 3 == 0:
                data[pos] ^= 1 << rng.randrange(8)
            elif i % 3 == 1:
                del data[pos : pos + rng.randrange(1, 16)]
            else:
                data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
        try:
            out = redact_with_stats(bytes(data), key=b"k" * 32, truncate=2)[0]
            read_packets(out)
            pcapng_to_btsnoop(bytes(data))
        except CaptureError:
            refused += 1
    assert 0 < refused < 3000
