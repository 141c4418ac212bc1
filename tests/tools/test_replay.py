"""``glasses-relay replay FILE``: summary, JSON, decode, and one-line errors.

The handler is called through ``tools.replay.main`` (the subcommand without
the dispatcher) and, once, as ``python -m tools.replay``. tshark is the
oracle for the counts: on written captures, on a capture made by a real host
stack (bumble on a virtual controller) and on the two real captures.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from bumble.controller import Controller
from bumble.device import Device, Peer
from bumble.gatt import Characteristic, CharacteristicValue, Service
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.snoop import BtSnooper
from bumble.transport.common import AsyncPipeSink

from protocol.capture import CaptureWriter, glasses_services, read_packets
from protocol.constants import Channel, RecordType
from protocol.gatt import RX_CHAR_UUID, SERVICE_UUID, TX_CHAR_UUID
from protocol.link import fragment_record
from protocol.record import Record, RecordHeader
from tools.replay import main

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "captures"
REAL = sorted(p.name for p in DATA.iterdir() if not p.name.endswith(".md"))
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(
    TSHARK is None, reason="tshark is the oracle (make system-tools)"
)
NAMES = {0x1B: "notify", 0x1D: "indicate", 0x12: "write_req", 0x52: "write_cmd"}
NAMES[0x0B] = "read_rsp"
ARM = 0x0040
SESSION = 0x0BADCAFE


def tshark_counts(path: Path) -> dict[str, int]:
    assert TSHARK is not None
    out = subprocess.run(
        [TSHARK, "-r", str(path), "-T", "fields", "-e", "btatt.opcode"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    by_opcode = Counter(int(v, 16) for v in out.split() if v)
    return {name: by_opcode[opcode] for opcode, name in NAMES.items()}


def run_json(
    path: Path, *args: str, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, Any], str]:
    assert main([str(path), *args, "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc, err


def records(count: int, size: int, channel: Channel) -> list[bytes]:
    """Fragments of ``count`` DATA records, numbered from sequence 0."""
    out: list[bytes] = []
    for counter in range(count):
        record = Record(RecordHeader(RecordType.DATA, SESSION, counter), bytes(size))
        out += fragment_record(
            record.encode(), 100, channel=channel, first_seq=len(out)
        )
    return out


def glasses_capture(*, lose: int | None = None) -> CaptureWriter:
    """One arm: discovery, 3 photo records up (4 fragments each), 2 down."""
    w = CaptureWriter(glasses_services())
    w.connect(ARM, "C0:11:22:33:44:55", 10.0)
    w.mtu(ARM, 247, 10.01)
    w.discover(ARM, 10.02)
    w.subscribe(ARM, TX_CHAR_UUID, 10.03)
    for i, value in enumerate(records(3, 350, Channel.BULK)):
        if i != lose:
            w.att_notify(ARM, TX_CHAR_UUID, value, 10.1 + i / 100)
    for value in records(2, 60, Channel.CONTROL):
        w.att_write_cmd(ARM, RX_CHAR_UUID, value, 10.5)
    w.att_notify(ARM, TX_CHAR_UUID, b"\x01", 10.6)  # not a fragment
    w.disconnect(ARM, 11.0)
    return w


# --- summary ---------------------------------------------------------------


def test_summary_json_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "glasses.pcapng"
    path.write_bytes(glasses_capture().getvalue())
    doc, err = run_json(path, "--summary", capsys=capsys)
    assert doc["format"] == "pcapng"
    assert doc["linktype"] == 201
    assert doc["packets"] == len(read_packets(path.read_bytes()).packets)
    assert doc["connections"] == 1
    assert doc["att"] == {
        "notify": 13, "indicate": 0, "write_req": 1, "write_cmd": 2, "read_rsp": 0,
    }  # fmt: skip
    (conn,) = doc["per_connection"]
    assert conn["peer"] == "**:**:**:**:44:55"
    ops = {(o["name"], o["uuid"]): o["count"] for o in conn["operations"]}
    assert ops[("notify", TX_CHAR_UUID)] == 13
    assert ops[("write_cmd", RX_CHAR_UUID)] == 2
    # The table for people goes to standard error.
    assert "ATT: notify 13, indicate 0, write_req 1, write_cmd 2, read_rsp 0" in err
    assert TX_CHAR_UUID in err
    assert "C0:11" not in err


def test_summary_is_the_default_and_prints_no_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "glasses"
    path.write_bytes(glasses_capture().to_btsnoop())
    assert main([str(path), "--addresses"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "btsnoop" in err
    assert "C0:11:22:33:44:55" in err


@needs_tshark
@pytest.mark.parametrize("variant", ["pcapng", "btsnoop", "fragmented-btsnoop"])
def test_summary_agrees_with_tshark_on_written_captures(
    tmp_path: Path, variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    w = glasses_capture()
    if variant == "fragmented-btsnoop":
        w = CaptureWriter(glasses_services(), max_acl_payload=27)
        w.connect(ARM, "C0:11:22:33:44:55", 0.0)
        w.discover(ARM, 0.1)
        for value in records(2, 300, Channel.STREAM):
            w.att_notify(ARM, TX_CHAR_UUID, value, 0.2)
            w.att_write_req(ARM, RX_CHAR_UUID, value[:20], 0.3)
        w.att_read(ARM, TX_CHAR_UUID, b"\x00\x01", 0.4)
    data = w.getvalue() if variant == "pcapng" else w.to_btsnoop()
    path = tmp_path / "capture.cfa"  # Android names logs oddly: magic bytes decide
    path.write_bytes(data)
    doc, _ = run_json(path, "--summary", capsys=capsys)
    assert doc["att"] == tshark_counts(path)


@needs_tshark
@pytest.mark.parametrize("name", REAL)
def test_summary_agrees_with_tshark_on_the_real_captures(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = DATA / name
    doc, err = run_json(path, "--summary", capsys=capsys)
    assert doc["att"] == tshark_counts(path)
    assert doc["packets"] == {"pcapng": 2615, "btsnoop": 2981}[str(doc["format"])]
    assert doc["linktype"] == {"pcapng": 272, "btsnoop": 1002}[str(doc["format"])]
    assert doc["warnings"] == []
    assert "Traceback" not in err


def test_python_dash_m_prints_one_json_object() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tools.replay", str(DATA / REAL[1]), "--json"],
        capture_output=True, text=True, check=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    doc = json.loads(out.stdout)
    assert doc["format"] == "btsnoop"
    assert doc["connections"] == 2
    assert "ATT: notify 0" in out.stderr


# --- decode ----------------------------------------------------------------


def test_decode_prints_one_line_per_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "glasses.pcapng"
    path.write_bytes(glasses_capture().getvalue())
    assert main([str(path), "--decode"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    up = [line for line in lines if "glasses>phone BULK DATA" in line]
    down = [line for line in lines if "phone>glasses CONTROL DATA" in line]
    assert len(up) == 3
    assert len(down) == 2
    assert f"session=0x{SESSION:08x} counter=2 size={14 + 350} fragments=4" in up[2]
    assert up[0].startswith("+0.1")  # seconds from the start of the capture
    assert lines[-1].endswith("! bad_fragment: fragment shorter than its 2-byte header")
    assert err == ""  # --decode alone: no table


def test_decode_json_reports_lost_fragments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "lossy.pcapng"
    path.write_bytes(glasses_capture(lose=5).getvalue())
    doc, _ = run_json(path, "--decode", capsys=capsys)
    events = [r["event"] for r in doc["records"]]
    assert events == [
        "record", "lost", "dropped", "dropped", "dropped", "record", "record",
        "record", "bad_fragment",
    ]  # fmt: skip
    lost = doc["records"][1]
    assert lost["note"] == "1 fragments lost (expected 5, got 6)"
    counters = [(r["direction"], r.get("counter")) for r in doc["records"]]
    assert [c for c in counters if c[1] is not None] == [
        ("glasses>phone", 0), ("glasses>phone", 2),
        ("phone>glasses", 0), ("phone>glasses", 1),
    ]  # fmt: skip
    assert doc["att"]["notify"] == 12


def test_decode_without_discovery_needs_the_handles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = CaptureWriter(glasses_services())
    w.connect(ARM, "C0:11:22:33:44:55", 0.0)  # no discovery in this capture
    for value in records(2, 40, Channel.INTERACTIVE):
        w.att_notify(ARM, TX_CHAR_UUID, value, 0.1)
    path = tmp_path / "nodiscovery.pcapng"
    path.write_bytes(w.getvalue())
    assert main([str(path), "--decode"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "--tx-handle" in err
    tx = w.handles.value_handle(TX_CHAR_UUID)
    assert main([str(path), "--decode", "--tx-handle", hex(tx)]) == 0
    out, _ = capsys.readouterr()
    assert out.count("glasses>phone INTERACTIVE DATA") == 2


def test_decode_a_capture_that_starts_mid_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No Connection Complete: the first fragment seen sets the sequence."""
    w = glasses_capture()
    packets = read_packets(w.getvalue()).packets[15:]  # mid-record
    pcap = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 201)]
    for p in packets:
        sec, ns = divmod(p.timestamp_ns, 10**9)
        pcap.append(struct.pack("<IIII", sec, ns // 1000, len(p.data), len(p.data)))
        pcap.append(p.data)
    path = tmp_path / "mid.pcap"
    path.write_bytes(b"".join(pcap))
    tx = w.handles.value_handle(TX_CHAR_UUID)
    rx = w.handles.value_handle(RX_CHAR_UUID)
    args = ["--decode", "--tx-handle", str(tx), "--rx-handle", str(rx)]
    doc, _ = run_json(path, *args, capsys=capsys)
    events = [r["event"] for r in doc["records"]]
    assert events == [
        "dropped", "dropped", "record", "record", "record", "record", "bad_fragment",
    ]  # fmt: skip


# --- bad input: one line, no traceback ------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"just some text\n", "unknown magic"),
        (b"", "unknown magic"),
        (b"btsnoop\x00\x00\x00\x00\x02\x00\x00\x03\xea", "version 2"),
        (b"btsnoop\x00\x00\x00\x00\x01\x00\x00\x03\xeb", "datalink 1003"),
        (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1), "not a Bluetooth"),
        (b"\x1f\x8b\x08\x00", "gzip"),
        (None, "No such file"),
        ("dir", "directory"),
    ],
    ids=["text", "empty", "btsnoop-v2", "bcsp", "ethernet", "gzip", "missing", "dir"],
)
def test_a_bad_file_is_one_line_and_exit_2(
    tmp_path: Path, content: bytes | str | None, reason: str
) -> None:
    path = tmp_path / "input.log"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "dir":
        path.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "tools.replay", str(path), "--summary"],
        capture_output=True, text=True, check=False, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("glasses-relay: error: ")
    assert reason in lines[0]


def test_strict_refuses_a_file_cut_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cut.pcapng"
    path.write_bytes(glasses_capture().getvalue()[:-5])
    doc, err = run_json(path, capsys=capsys)
    assert doc["warnings"]
    assert "warning: block cut short" in err
    assert main([str(path), "--strict"]) == 2
    assert "block cut short" in capsys.readouterr().err


# --- a capture from a real host stack (bumble) ----------------------------------


async def _bumble_session(snoop: Path) -> tuple[int, int]:
    """Phone and glasses bumble stacks on one virtual link; the phone is snooped."""
    link = LocalLink()  # type: ignore[no-untyped-call]  # untyped in bumble
    phone_ctl, glasses_ctl = (
        Controller("phone", link=link),
        Controller("glasses", link=link),
    )
    phone_host = Host(phone_ctl, AsyncPipeSink(phone_ctl))
    glasses_host = Host(glasses_ctl, AsyncPipeSink(glasses_ctl))
    phone = Device(name="phone", address=Address("F0:F1:F2:F3:F4:F5"), host=phone_host)
    glasses = Device(
        name="glasses", address=Address("C0:11:22:33:44:55"), host=glasses_host
    )
    written: list[bytes] = []

    def on_write(_connection: object, value: bytes) -> None:
        written.append(value)

    tx: Characteristic[bytes] = Characteristic(
        TX_CHAR_UUID,
        Characteristic.Properties.NOTIFY | Characteristic.Properties.READ,
        Characteristic.READABLE,
        b"\x00\x00",
    )
    rx: Characteristic[bytes] = Characteristic(
        RX_CHAR_UUID,
        Characteristic.Properties.WRITE
        | Characteristic.Properties.WRITE_WITHOUT_RESPONSE,
        Characteristic.WRITEABLE,
        CharacteristicValue(write=on_write),
    )
    glasses.add_service(Service(SERVICE_UUID, [tx, rx]))
    with snoop.open("wb") as out:
        phone_host.snooper = BtSnooper(out)
        await phone.power_on()
        await glasses.power_on()
        await glasses.start_advertising(auto_restart=False)
        connection = await phone.connect(glasses.random_address)
        peer = Peer(connection)
        await peer.request_mtu(247)
        await peer.discover_services()
        await peer.discover_characteristics()
        for service in peer.services:
            for characteristic in service.characteristics:
                await peer.discover_descriptors(characteristic)
        peer_tx = peer.get_characteristics_by_uuid(tx.uuid)[0]
        peer_rx = peer.get_characteristics_by_uuid(rx.uuid)[0]
        received: list[bytes] = []
        await peer.subscribe(peer_tx, received.append)
        await peer.read_value(peer_tx)
        for value in records(4, 150, Channel.BULK):
            await glasses.notify_subscribers(tx, value)
        fragments = records(3, 200, Channel.INTERACTIVE)  # > 27-byte ACL buffers
        for i, value in enumerate(fragments):
            await peer.write_value(peer_rx, value, with_response=i % 2 == 0)
        for _ in range(100):
            if len(written) == len(fragments):
                break
            await asyncio.sleep(0.01)
        await connection.disconnect()
        await asyncio.sleep(0.05)
    return len(received), len(written)


@needs_tshark
@pytest.mark.timeout(60)
async def test_a_real_host_stack_capture_agrees_with_tshark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snoop = tmp_path / "bumble_btsnoop_hci.log"
    received, written = await asyncio.wait_for(_bumble_session(snoop), 30)
    assert received == 8
    assert written == 9
    doc, _ = run_json(snoop, "--decode", capsys=capsys)
    assert doc["att"] == tshark_counts(snoop)
    assert doc["att"] == {
        "notify": 8, "indicate": 0, "write_req": 6, "write_cmd": 4, "read_rsp": 1,
    }  # fmt: skip
    kinds = Counter((r["direction"], r["event"]) for r in doc["records"])
    assert kinds[("glasses>phone", "record")] == 4
    assert kinds[("phone>glasses", "record")] == 3
