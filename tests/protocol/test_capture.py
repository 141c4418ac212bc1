"""protocol.capture: written files decode in tshark, readers agree with tshark.

tshark is the oracle (../shared/design/CAPTURE-FORMATS.md §5): every ATT PDU
the writer emits decodes as ``btatt`` with zero expert errors, and the reader
finds the same ATT PDUs (frame, opcode, handle, value) in every container and
link type, in fragmented and truncated files and in the two real captures.
The fuzz test holds the error contract: any bytes give a value or a
CaptureError.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocol.capture import (
    AttOpcode,
    CaptureError,
    CaptureFormat,
    CaptureWriter,
    CharacteristicSpec,
    CharProps,
    Direction,
    HandleMap,
    ServiceSpec,
    Transport,
    detect_format,
    glasses_services,
    read_capture,
    read_packets,
    summarize,
)
from protocol.capture.air import decode_nordic
from protocol.capture.containers import (
    BTSNOOP_EPOCH_DELTA_US,
    encode_pcapng_epb,
    encode_pcapng_idb,
    encode_pcapng_shb,
)
from protocol.constants import Channel, RecordType
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.gatt import RX_CHAR_UUID, SERVICE_UUID, TX_CHAR_UUID
from protocol.link import fragment_record
from protocol.record import Record, RecordHeader

DATA = Path(__file__).parent.parent / "data" / "captures"
REAL = {
    "even-g2-glasses_adv-only_nrfsniffer.pcapng": (CaptureFormat.PCAPNG, 272, 2615),
    "oppo-earbuds_classic-only_btsnoop_hci.log": (CaptureFormat.BTSNOOP, 1002, 2981),
}
TSHARK = shutil.which("tshark")
EDITCAP = shutil.which("editcap")
needs_tshark = pytest.mark.skipif(
    TSHARK is None, reason="tshark is the oracle (make system-tools)"
)
BATTERY_SERVICE = "180f"
BATTERY_LEVEL = "2a19"
STATUS_SERVICE = "7a3e5c20-94d2-4b8e-9f2a-3d6c8b1e4f70"
STATUS = "7a3e5c21-94d2-4b8e-9f2a-3d6c8b1e4f70"
"""A made-up service whose characteristic indicates (2a19 may not)."""
LEFT, RIGHT = 0x0040, 0x0041
SESSION = 0x5EC0_0001


# --- tshark ----------------------------------------------------------------


@dataclass(frozen=True)
class Oracle:
    """What tshark shows: per frame with ATT, opcode, handle, value, UUID."""

    att: list[tuple[int, int, int | None, bytes, str]]
    comments: dict[int, str]
    expert: str

    def opcodes(self) -> Counter[int]:
        return Counter(op for _, op, _, _, _ in self.att)

    def section(self, name: str) -> int:
        for line in self.expert.splitlines():
            if line.startswith(f"{name} ("):
                return int(line.split("(")[1].rstrip(")"))
        return 0


def tshark(path: Path) -> Oracle:
    assert TSHARK is not None
    fields = ["frame.number", "btatt.opcode", "btatt.handle", "btatt.value"]
    fields += ["btatt.uuid128", "frame.comment"]
    args = [TSHARK, "-r", str(path), "-T", "fields", "-E", "occurrence=f"]
    for name in fields:
        args += ["-e", name]
    out = subprocess.run(
        [*args, "-z", "expert"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    att = []
    comments = {}
    lines = out.splitlines()
    i = 0
    for i, line in enumerate(lines):  # noqa: B007 - the expert part follows
        parts = line.split("\t")
        if len(parts) != len(fields) or not parts[0].isdigit():
            break
        frame, opcode, handle, value, uuid, comment = parts
        if opcode:
            att.append(
                (
                    int(frame),
                    int(opcode, 16),
                    int(handle, 16) if handle else None,
                    bytes.fromhex(value.replace(":", "")),
                    uuid,
                )
            )
        if comment:
            comments[int(frame)] = comment
    return Oracle(att, comments, "\n".join(lines[i:]))


def mine(data: bytes) -> list[tuple[int, int]]:
    return [(op.packet + 1, op.opcode) for op in read_capture(data).att]


# --- a scenario: two arms, discovery, our frames, a reused handle ------------


def services() -> list[ServiceSpec]:
    battery = CharacteristicSpec(BATTERY_LEVEL, CharProps.READ | CharProps.NOTIFY)
    status = CharacteristicSpec(STATUS, CharProps.READ | CharProps.INDICATE)
    return [
        *glasses_services(),
        ServiceSpec(BATTERY_SERVICE, (battery,)),
        ServiceSpec(STATUS_SERVICE, (status,)),
    ]


def frames(count: int, size: int, channel: Channel, first_seq: int) -> list[bytes]:
    out = []
    seq = first_seq
    for counter in range(count):
        record = Record(RecordHeader(RecordType.DATA, SESSION, counter), bytes(size))
        pieces = fragment_record(record.encode(), 244, channel=channel, first_seq=seq)
        seq += len(pieces)
        out += pieces
    return out


@dataclass
class Scenario:
    writer: CaptureWriter
    data: bytes
    counts: Counter[str]


def scenario(max_acl_payload: int | None = None) -> Scenario:
    """Both arms connect, discover, subscribe and exchange our records."""
    w = CaptureWriter(
        services(), comment="bleak backend: test", max_acl_payload=max_acl_payload
    )
    counts: Counter[str] = Counter()
    out = bytearray(w.header)
    t = 1_700_000_000.0
    for conn, peer in ((LEFT, "C0:11:22:33:44:55"), (RIGHT, "C0:11:22:33:44:56")):
        out += w.connect(conn, peer, t)
        out += w.mtu(conn, 247, t + 0.01, server_mtu=247)
        out += w.discover(conn, t + 0.02)
        out += w.subscribe(conn, TX_CHAR_UUID, t + 0.03)
        counts["write_req"] += 1
        t += 0.1
    out += w.subscribe(LEFT, STATUS, t, indicate=True)
    counts["write_req"] += 1
    for i, value in enumerate(frames(3, 400, Channel.BULK, 0)):
        out += w.att_notify(LEFT, TX_CHAR_UUID, value, t + i * 0.01)
        counts["notify"] += 1
    for i, value in enumerate(frames(2, 30, Channel.INTERACTIVE, 0)):
        out += w.att_write_cmd(LEFT, RX_CHAR_UUID, value, t, comment=f"down {i}")
        counts["write_cmd"] += 1
    for value in frames(1, 20, Channel.CONTROL, 0):
        out += w.att_write_req(RIGHT, RX_CHAR_UUID, value, t + 0.5)
        counts["write_req"] += 1
    for value in frames(2, 100, Channel.STREAM, 0):
        out += w.att_notify(RIGHT, TX_CHAR_UUID, value, t + 0.6)
        counts["notify"] += 1
    out += w.att_indicate(LEFT, STATUS, b"\x55", t + 0.7)
    counts["indicate"] += 1
    out += w.att_read(LEFT, BATTERY_LEVEL, b"\x54", t + 0.8)
    counts["read_rsp"] += 1
    out += w.disconnect(LEFT, t + 1.0)
    out += w.connect(LEFT, "C0:11:22:33:44:57", t + 2.0)  # the handle is reused
    out += w.discover(LEFT, t + 2.1)
    for value in frames(1, 10, Channel.CONTROL, 0):
        out += w.att_notify(LEFT, TX_CHAR_UUID, value, t + 2.2, comment="after reuse")
        counts["notify"] += 1
    out += w.disconnect(LEFT, t + 3.0)
    out += w.disconnect(RIGHT, t + 3.0, reason=0x08)
    assert bytes(out) == w.getvalue()
    return Scenario(w, bytes(out), counts)


# --- re-framing a 201 capture into other containers and link types ---------


@dataclass(frozen=True)
class H4:
    timestamp_us: int
    direction: int
    data: bytes  # H4 type byte + HCI


def h4_frames(pcapng: bytes) -> list[H4]:
    out = []
    for p in read_packets(pcapng).packets:
        (direction,) = struct.unpack_from(">I", p.data)
        out.append(H4(p.timestamp_ns // 1000, direction, p.data[4:]))
    return out


_MONITOR = {(1, 0): 2, (4, 1): 3, (2, 0): 4, (2, 1): 5}


def btsnoop(datalink: int, records: list[tuple[int, int, bytes, int]]) -> bytes:
    out = [b"btsnoop\x00" + struct.pack(">II", 1, datalink)]
    for ts, flags, data, orig in records:
        out.append(
            struct.pack(
                ">IIIIq", orig, len(data), flags, 0, ts + BTSNOOP_EPOCH_DELTA_US
            )
        )
        out.append(data)
    return b"".join(out)


def to_btsnoop_h1(frames: list[H4]) -> bytes:
    records = []
    for f in frames:
        flags = f.direction | (2 if f.data[0] in (1, 4) else 0)
        records.append((f.timestamp_us, flags, f.data[1:], len(f.data) - 1))
    return btsnoop(1001, records)


def to_btsnoop_monitor(frames: list[H4]) -> bytes:
    new_index = bytes([0, 1]) + bytes(6) + b"hci0\x00\x00\x00\x00"
    records = [(frames[0].timestamp_us, 0, new_index, 16)]
    records.append((frames[0].timestamp_us, 12, b"system note\x00", 12))
    for f in frames:
        flags = 1 << 16 | _MONITOR[(f.data[0], f.direction)]
        records.append((f.timestamp_us, flags, f.data[1:], len(f.data) - 1))
    return btsnoop(2001, records)


def to_btsnoop_truncated(frames: list[H4], keep: int) -> bytes:
    """An Android btsnooz-style log: ACL records cut to ``keep`` bytes."""
    records = []
    for f in frames:
        flags = f.direction | (2 if f.data[0] in (1, 4) else 0)
        data = f.data[:keep] if f.data[0] == 2 else f.data
        records.append((f.timestamp_us, flags, data, len(f.data)))
    return btsnoop(1002, records)


def to_pcap(
    frames: list[H4], linktype: int, *, order: str = "<", ns: bool = False
) -> bytes:
    magic = 0xA1B23C4D if ns else 0xA1B2C3D4
    out = [struct.pack(f"{order}IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)]
    for f in frames:
        if linktype == 201:
            data = struct.pack(">I", f.direction) + f.data
        elif linktype == 254:
            data = (
                struct.pack(">HH", 0, _MONITOR[(f.data[0], f.direction)]) + f.data[1:]
            )
        else:  # 187
            data = f.data
        sec, frac = divmod(f.timestamp_us, 1_000_000)
        out.append(
            struct.pack(
                f"{order}IIII", sec, frac * 1000 if ns else frac, len(data), len(data)
            )
        )
        out.append(data)
    return b"".join(out)


def to_pcapng_monitor(frames: list[H4]) -> bytes:
    out = encode_pcapng_shb() + encode_pcapng_idb(254)
    for f in frames:
        data = struct.pack(">HH", 0, _MONITOR[(f.data[0], f.direction)]) + f.data[1:]
        out += encode_pcapng_epb(f.timestamp_us, data)
    return out


# --- tests: the writer and tshark -----------------------------------------


@needs_tshark
@pytest.mark.parametrize("max_acl_payload", [None, 7], ids=["whole", "fragmented"])
def test_written_capture_decodes_in_tshark_with_zero_expert_errors(
    tmp_path: Path, max_acl_payload: int | None
) -> None:
    s = scenario(max_acl_payload)
    path = tmp_path / "written.pcapng"
    path.write_bytes(s.data)
    oracle = tshark(path)
    capture = read_capture(s.data)
    # Every ATT PDU is a btatt frame, in the same frames, same opcodes.
    assert [(f, op) for f, op, *_ in oracle.att] == mine(s.data)
    assert oracle.section("Errors") == 0, oracle.expert
    assert oracle.section("Warns") == 0, oracle.expert
    # Handles, values and UUIDs as written.
    tx = s.writer.handles.value_handle(TX_CHAR_UUID)
    rx = s.writer.handles.value_handle(RX_CHAR_UUID)
    theirs = {f: (h, v, u) for f, op, h, v, u in oracle.att}
    data_ops = 0
    for op in capture.att:
        if op.opcode in (0x1B, 0x52, 0x12) and op.handle in (tx, rx):
            handle, value, uuid = theirs[op.packet + 1]
            assert (handle, value) == (op.handle, op.value)
            assert op.uuid is not None
            assert uuid == op.uuid.replace("-", "")
            data_ops += 1
    assert data_ops == s.counts["notify"] + s.counts["write_cmd"] + 1
    assert summarize(capture).att.to_dict() == dict(s.counts)
    assert Counter(op.name for op in capture.att if op.name in s.counts) == s.counts


@needs_tshark
def test_packet_comments_and_the_handle_map_are_in_the_file(tmp_path: Path) -> None:
    s = scenario()
    path = tmp_path / "c.pcapng"
    path.write_bytes(s.data)
    oracle = tshark(path)
    assert sorted(oracle.comments.values()) == ["after reuse", "down 0", "down 1"]
    ours = {op.packet + 1: op.comment for op in read_capture(s.data).att if op.comment}
    assert ours == oracle.comments
    packets = read_packets(s.data)
    assert packets.comments[0].startswith("Synthesized by glasses-relay")
    assert "bleak backend: test" in packets.comments[0]
    handle_map = packets.comments[1]
    tx = s.writer.handles.value_handle(TX_CHAR_UUID)
    assert f"0x{tx:04x} {TX_CHAR_UUID} value read|notify" in handle_map
    assert SERVICE_UUID in handle_map


def test_the_handle_map_is_self_consistent() -> None:
    handles = HandleMap.allocate(services(), first_handle=0x0010)
    service, battery, status = handles.services
    tx, rx = service.characteristics
    assert (service.start, tx.declaration, tx.value, tx.cccd) == (
        0x10,
        0x11,
        0x12,
        0x13,
    )
    assert (rx.declaration, rx.value, rx.cccd, service.end) == (0x14, 0x15, None, 0x15)
    assert battery.start == service.end + 1
    assert status.characteristics[0].cccd == status.end
    assert handles.uuid_of(0x12) == TX_CHAR_UUID
    assert handles.uuid_of(0x13) == "00002902-0000-1000-8000-00805f9b34fb"
    assert handles.characteristic(0x15).uuid == RX_CHAR_UUID
    assert handles.value_handle(0x0099) == 0x0099  # raw handles pass through


def test_discovery_fills_each_connections_uuid_map() -> None:
    s = scenario()
    capture = read_capture(s.data)
    expected = s.writer.handles.uuids()
    assert len(capture.connections) == 3
    for conn in capture.connections:
        assert conn.uuid_map() == expected
    notify = next(op for op in capture.att if op.opcode == AttOpcode.HANDLE_VALUE_NTF)
    assert notify.uuid == TX_CHAR_UUID
    assert notify.direction is Direction.RECEIVED
    read = next(op for op in capture.att if op.opcode == AttOpcode.READ_RSP)
    assert (read.handle, read.value) == (s.writer.handles.value_handle("2a19"), b"\x54")


def test_connections_reused_handles_and_summary() -> None:
    s = scenario()
    capture = read_capture(s.data)
    left, right, left_again = capture.connections
    assert (left.handle, right.handle, left_again.handle) == (LEFT, RIGHT, LEFT)
    assert all(
        c.transport is Transport.LE and not c.implicit for c in capture.connections
    )
    assert (left.peer, left_again.peer) == ("C0:11:22:33:44:55", "C0:11:22:33:44:57")
    assert left.disconnected
    assert left.disconnect_reason == 0x13
    assert right.disconnect_reason == 0x08
    assert left.central
    assert left.peer_random
    assert left_again.start_ns > left.end_ns
    summary = summarize(capture)
    doc = summary.to_dict()
    assert doc["format"] == "pcapng"
    assert doc["linktype"] == 201
    assert doc["packets"] == capture.packets == len(read_packets(s.data).packets)
    assert doc["connections"] == 3
    per = summary.connections
    assert per[0].peer == "**:**:**:**:44:55"
    assert summarize(capture, addresses=True).connections[0].peer == "C0:11:22:33:44:55"
    tx = s.writer.handles.value_handle(TX_CHAR_UUID)
    notify = next(o for o in per[0].operations if o.name == "notify")
    assert (notify.handle, notify.uuid, notify.count) == (tx, TX_CHAR_UUID, 6)
    assert sum(c.att.notify for c in per) == s.counts["notify"] == 9
    assert summary.duration_s == pytest.approx(3.2)


@needs_tshark
def test_btsnoop_export_reads_back_identical_att(tmp_path: Path) -> None:
    s = scenario(max_acl_payload=20)
    exported = s.writer.to_btsnoop()
    assert detect_format(exported) is CaptureFormat.BTSNOOP
    ours = read_capture(s.data)
    back = read_capture(exported)
    assert back.linktype == 1002
    key = [
        (o.packet, o.direction, o.opcode, o.handle, o.value, o.uuid) for o in ours.att
    ]
    assert [
        (o.packet, o.direction, o.opcode, o.handle, o.value, o.uuid) for o in back.att
    ] == key
    assert [(o.timestamp_ns) for o in back.att] == [o.timestamp_ns for o in ours.att]
    path = tmp_path / "export.log"
    path.write_bytes(exported)
    assert tshark(path).opcodes() == Counter(o.opcode for o in back.att)


@pytest.mark.skipif(EDITCAP is None, reason="editcap comes with tshark")
def test_btsnoop_export_is_what_editcap_makes(tmp_path: Path) -> None:
    assert EDITCAP is not None
    s = scenario()
    src, dst = tmp_path / "a.pcapng", tmp_path / "a.btsnoop"
    src.write_bytes(s.data)
    subprocess.run(
        [EDITCAP, "-F", "btsnoop", str(src), str(dst)], check=True, timeout=60
    )
    assert dst.read_bytes() == s.writer.to_btsnoop()


def test_writer_refuses_caller_mistakes() -> None:
    w = CaptureWriter(glasses_services(), keep=False)
    with pytest.raises(LocalProtocolError):
        w.att_notify(LEFT, TX_CHAR_UUID, b"\xc0\x00", 0.0)  # not connected
    w.connect(LEFT, "C0:11:22:33:44:55", 0.0)
    calls: list[Callable[[], object]] = [
        lambda: w.connect(LEFT, "C0:11:22:33:44:55", 0.0),
        lambda: w.connect(RIGHT, "not an address", 0.0),
        lambda: w.att_notify(LEFT, "no-such-uuid", b"", 0.0),
        lambda: w.att_notify(LEFT, "2a19", b"", 0.0),
        lambda: w.att_notify(LEFT, TX_CHAR_UUID, b"", -1.0),
        lambda: w.att_notify(LEFT, TX_CHAR_UUID, b"", float("nan")),
        lambda: w.att_notify(LEFT, TX_CHAR_UUID, bytes(70_000), 0.0),
        lambda: w.subscribe(LEFT, RX_CHAR_UUID, 0.0),
        lambda: w.mtu(LEFT, 22, 0.0),
        w.getvalue,
        w.to_btsnoop,
    ]
    for call in calls:
        with pytest.raises(LocalProtocolError):
            call()
    assert w.att_notify(LEFT, TX_CHAR_UUID, b"\xc0\x00", 1.0).startswith(
        b"\x06\x00\x00\x00"
    )


# --- tests: the readers agree with tshark everywhere -------------------------


REFRAMINGS: dict[str, Callable[[list[H4], bytes], bytes]] = {
    "pcapng-201": lambda f, raw: raw,
    "btsnoop-1002": lambda f, raw: to_btsnoop_truncated(f, 1 << 20),
    "btsnoop-1001": lambda f, raw: to_btsnoop_h1(f),
    "btsnoop-2001": lambda f, raw: to_btsnoop_monitor(f),
    "pcap-201-le-us": lambda f, raw: to_pcap(f, 201),
    "pcap-254-be-ns": lambda f, raw: to_pcap(f, 254, order=">", ns=True),
    "pcapng-254": lambda f, raw: to_pcapng_monitor(f),
    "pcap-187": lambda f, raw: to_pcap(f, 187),
    "btsnooz-14-bytes": lambda f, raw: to_btsnoop_truncated(f, 14),
    "btsnooz-9-bytes": lambda f, raw: to_btsnoop_truncated(f, 9),
}


@needs_tshark
@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragmented"])
@pytest.mark.parametrize("name", sorted(REFRAMINGS))
def test_reader_agrees_with_tshark(tmp_path: Path, name: str, fragmented: bool) -> None:
    raw = scenario(max_acl_payload=27).data if fragmented else scenario().data
    data = REFRAMINGS[name](h4_frames(raw), raw)
    path = tmp_path / "capture.bin"  # the name says nothing about the format
    path.write_bytes(data)
    oracle = tshark(path)
    capture = read_capture(data)
    assert [(f, op) for f, op, *_ in oracle.att] == mine(data)
    theirs = {
        f: (h, v) for f, op, h, v, _ in oracle.att if op in (0x12, 0x1B, 0x1D, 0x52)
    }
    for op in capture.att:
        if op.opcode in (0x12, 0x1B, 0x1D, 0x52):
            handle, value = theirs[op.packet + 1]
            assert op.handle == handle
            if op.opcode != 0x1D and value:  # btgatt takes the battery level
                assert op.value == value
    if name.startswith("btsnooz"):
        assert capture.stats.truncated > 0


@needs_tshark
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_captures_agree_with_tshark(name: str) -> None:
    path = DATA / name
    data = path.read_bytes()
    capture = read_capture(data)
    fmt, linktype, packets = REAL[name]
    assert (capture.format, capture.linktype, capture.packets) == (
        fmt,
        linktype,
        packets,
    )
    assert capture.warnings == ()
    oracle = tshark(path)
    assert Counter(op.opcode for op in capture.att) == oracle.opcodes()
    assert summarize(capture).att.to_dict() == dict.fromkeys(
        ("notify", "indicate", "write_req", "write_cmd", "read_rsp"), 0
    )


@needs_tshark
def test_classic_log_connections_match_tsharks_acl_handles() -> None:
    assert TSHARK is not None
    path = DATA / "oppo-earbuds_classic-only_btsnoop_hci.log"
    out = subprocess.run(
        [TSHARK, "-r", str(path), "-T", "fields", "-e", "bthci_acl.chandle"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    theirs = Counter(int(v, 16) for v in out.split() if v)
    capture = read_capture(path.read_bytes())
    assert capture.stats.acl == sum(theirs.values())
    by_handle: Counter[int] = Counter()
    for conn in capture.connections:
        events = 0 if conn.implicit else 1
        by_handle[conn.handle] += conn.packets - events
    assert by_handle == theirs
    implicit, classic = capture.connections
    assert implicit.implicit
    assert implicit.transport is Transport.UNKNOWN
    assert classic.transport is Transport.BR_EDR
    assert not classic.implicit


def test_advertising_only_air_capture() -> None:
    capture = read_capture(
        (DATA / "even-g2-glasses_adv-only_nrfsniffer.pcapng").read_bytes()
    )
    assert capture.connections == ()
    assert capture.att == ()
    assert capture.stats.advertising + capture.stats.bad_crc == capture.packets
    assert 96.0 < capture.duration_s < 97.0


# --- over the air (272) ----------------------------------------------------

ADV_AA = 0x8E89BED6
CONN_AA = 0x50654CD1


class Air:
    """Builds an nRF Sniffer (protocol version 3) capture."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []
        self.sn = {True: 0, False: 0}

    def _packet(self, pid: int, flags: int, aa: int, hdr0: int, payload: bytes) -> None:
        ll = struct.pack("<I", aa) + bytes([hdr0, len(payload)]) + payload + bytes(3)
        body = bytes([10, flags, 37 if aa == ADV_AA else 5, 60]) + bytes(6) + ll
        header = b"\x00" + struct.pack("<H", len(body)) + b"\x03"
        header += struct.pack("<H", len(self.packets)) + bytes([pid])
        self.packets.append(header + body)

    def connect_ind(self) -> None:
        lldata = struct.pack("<I", CONN_AA) + b"\x55\x55\x55\x02"
        lldata += struct.pack("<HHHH", 0, 24, 0, 400) + b"\xff\xff\xff\xff\x1f\x25"
        init, adv = bytes.fromhex("f5f4f3f2f1f0"), bytes.fromhex("554433221100")
        self._packet(2, 0x01, ADV_AA, 0x05 | 0xC0, init + adv + lldata)

    def data(
        self, central: bool, llid: int, payload: bytes, *, flags: int = 0x01,
        repeat: bool = False,
    ) -> None:  # fmt: skip
        if not repeat:
            self.sn[central] ^= 1
        hdr0 = llid | self.sn[central] << 3 | (self.sn[not central] ^ 1) << 2
        self._packet(6, flags | (0x02 if central else 0), CONN_AA, hdr0, payload)

    def att(self, central: bool, att: bytes, *, size: int = 251) -> None:
        pdu = struct.pack("<HH", len(att), 4) + att
        for i in range(0, len(pdu), size):
            self.data(central, 2 if i == 0 else 1, pdu[i : i + size])

    def file(self) -> bytes:
        out = encode_pcapng_shb() + encode_pcapng_idb(272)
        for i, packet in enumerate(self.packets):
            out += encode_pcapng_epb(1_000_000 + i * 1250, packet)
        return out


def air_scenario() -> Air:
    air = Air()
    air.connect_ind()
    air.att(True, b"\x02\xf7\x00")
    air.att(False, b"\x03\xf7\x00")
    air.att(False, b"\x1b\x12\x00" + bytes(range(60)), size=27)  # LL fragments
    air.data(True, 1, b"")  # an empty PDU
    air.att(True, b"\x52\x15\x00hello")
    air.att(True, b"\x12\x15\x00abc")
    air.att(False, b"\x13")
    air.att(False, b"\x1d\x18\x00\x55")
    air.att(True, b"\x1e")
    return air


@needs_tshark
def test_air_capture_agrees_with_tshark(tmp_path: Path) -> None:
    air = air_scenario()
    air.data(True, 3, b"\x02\x13")  # LL_TERMINATE_IND
    data = air.file()
    path = tmp_path / "air.pcapng"
    path.write_bytes(data)
    oracle = tshark(path)
    capture = read_capture(data)
    assert [(f, op) for f, op, *_ in oracle.att] == mine(data)
    assert [(op.handle, op.value) for op in capture.att if op.opcode == 0x1B] == [
        (0x12, bytes(range(60)))
    ]
    (conn,) = capture.connections
    assert conn.over_the_air
    assert conn.handle == CONN_AA
    assert not conn.implicit
    assert conn.peer == "00:11:22:33:44:55"
    assert conn.disconnect_reason == 0x13
    directions = {op.opcode: op.direction for op in capture.att}
    assert directions[0x52] is Direction.SENT
    assert directions[0x1B] is Direction.RECEIVED


def test_air_skips_retransmissions_bad_crc_and_undecryptable_packets() -> None:
    air = air_scenario()
    base = read_capture(air.file())
    air.att(False, b"\x1b\x12\x00one")
    air.data(False, 2, struct.pack("<HH", 6, 4) + b"\x1b\x12\x00one", repeat=True)
    notify = struct.pack("<HH", 6, 4) + b"\x1b\x12\x00"
    air.data(False, 2, notify + b"bad", flags=0x00)  # a new packet, CRC failed
    air.data(False, 2, notify + b"bad", repeat=True)  # its retransmission
    air.data(False, 2, notify + b"enc", flags=0x05)  # encrypted, not decrypted
    air.data(
        False, 2, notify + b"dec" + b"MIC!", flags=0x0D
    )  # decrypted by the sniffer
    capture = read_capture(air.file())
    values = [op.value for op in capture.att if op.opcode == 0x1B]
    assert values[len(values) - 3 :] == [b"one", b"bad", b"dec"]
    assert len(capture.att) == len(base.att) + 3
    stats = capture.stats
    assert (stats.retransmissions, stats.bad_crc, stats.encrypted) == (1, 1, 1)


def test_nordic_packets_without_a_link_layer_packet() -> None:
    assert decode_nordic(b"") is None
    assert decode_nordic(b"\x00\xbe\xef" + bytes(40)) is None  # legacy format
    assert decode_nordic(b"\x00\x10\x00\x03\x00\x00\x0e" + bytes(20)) is None  # ping
    assert decode_nordic(b"\x00\x10\x00\x03\x00\x00\x06\x05" + bytes(20)) is None


# --- containers ------------------------------------------------------------


def test_format_comes_from_magic_bytes_only() -> None:
    s = scenario()
    assert detect_format(s.data) is CaptureFormat.PCAPNG
    assert detect_format(s.writer.to_btsnoop()) is CaptureFormat.BTSNOOP
    frames_ = h4_frames(s.data)
    assert detect_format(to_pcap(frames_, 201)) is CaptureFormat.PCAP
    assert (
        detect_format(to_pcap(frames_, 201, order=">", ns=True)) is CaptureFormat.PCAP
    )
    for junk in (b"", b"btsnoop", b"\x1f\x8b\x08\x00", b"hello world, not a capture"):
        with pytest.raises(CaptureError) as err:
            detect_format(junk)
        assert isinstance(err.value, RemoteProtocolError)
        assert isinstance(err.value, ValueError)


def test_timestamps_in_every_container_agree() -> None:
    s = scenario()
    frames_ = h4_frames(s.data)
    expected = [f.timestamp_us * 1000 for f in frames_]
    for data in (
        s.data,
        s.writer.to_btsnoop(),
        to_pcap(frames_, 201),
        to_pcap(frames_, 254, order=">", ns=True),
        to_btsnoop_h1(frames_),
    ):
        assert [p.timestamp_ns for p in read_packets(data).packets] == expected
    capture = read_capture(s.data)
    assert capture.first_ns == 1_700_000_000 * 10**9


def _pcapng_block(order: str, btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    length = 12 + len(body)
    return (
        struct.pack(f"{order}II", btype, length)
        + body
        + struct.pack(f"{order}I", length)
    )


def _pcapng_option(order: str, code: int, value: bytes) -> bytes:
    return (
        struct.pack(f"{order}HH", code, len(value))
        + value
        + b"\x00" * (-len(value) % 4)
    )


def test_pcapng_sections_byte_orders_resolutions_and_block_kinds() -> None:
    pdu = bytes.fromhex("000000010240200b00070004001b120061626364")
    le = "<"
    out = _pcapng_block(le, 0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    opts = _pcapng_option(le, 9, b"\x89") + _pcapng_option(
        le, 14, struct.pack("<q", 10)
    )
    out += _pcapng_block(le, 1, struct.pack("<HHI", 201, 0, 0) + opts + bytes(4))
    ts = 3 << 9  # 3 s at 2^-9 s per unit
    out += _pcapng_block(
        le,
        6,
        struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(pdu), len(pdu)) + pdu,
    )
    out += _pcapng_block(le, 3, struct.pack("<I", len(pdu)) + pdu)  # simple packet
    out += _pcapng_block(le, 99, b"custom block")  # skipped
    be = ">"
    out += _pcapng_block(be, 0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1))
    comment = _pcapng_option(be, 1, b"second section")
    out += _pcapng_block(be, 1, struct.pack(">HHI", 254, 0, 0) + comment + bytes(4))
    monitor = struct.pack(">HH", 0, 5) + pdu[5:]
    ts = 7_500_000_000  # ns resolution below
    out += _pcapng_block(
        be,
        1,
        struct.pack(">HHI", 201, 0, 0) + _pcapng_option(be, 9, b"\x09") + bytes(4),
    )
    out += _pcapng_block(
        be,
        6,
        struct.pack(">IIIII", 1, ts >> 32, ts & 0xFFFFFFFF, len(pdu), len(pdu)) + pdu,
    )
    out += _pcapng_block(
        be,
        2,
        struct.pack(">HHIIII", 0, 0, 0, 2_000_000, len(monitor), len(monitor))
        + monitor,
    )
    packets = read_packets(out)
    assert packets.warnings == ()
    assert packets.linktypes == (201, 254)
    assert [p.linktype for p in packets.packets] == [201, 201, 201, 254]
    assert packets.packets[0].timestamp_ns == 13 * 10**9  # 3 s + if_tsoffset 10 s
    assert packets.packets[2].timestamp_ns == 7_500_000_000
    assert packets.packets[3].timestamp_ns == 2 * 10**9
    assert "second section" in packets.comments
    capture = read_capture(out)
    assert [op.value for op in capture.att] == [b"abcd"] * 4


@pytest.mark.parametrize("container", ["btsnoop", "pcap", "pcapng"])
def test_damage_after_the_header_keeps_what_came_before(container: str) -> None:
    s = scenario()
    frames_ = h4_frames(s.data)
    data = {
        "btsnoop": s.writer.to_btsnoop(),
        "pcap": to_pcap(frames_, 201),
        "pcapng": s.data,
    }[container]
    whole = read_capture(data)
    cut = read_capture(data[:-3])
    assert cut.packets == whole.packets - 1
    assert cut.warnings
    assert "cut short" in cut.warnings[0]
    with pytest.raises(CaptureError):
        read_capture(data[:-3], strict=True)
    # A huge included length in the first record.
    field = {"btsnoop": 16 + 4, "pcap": 24 + 8, "pcapng": len(s.writer.header) + 20}
    bad = bytearray(data)
    order = ">I" if container == "btsnoop" else "<I"
    struct.pack_into(order, bad, field[container], 0xFFFFFFF0)
    damaged = read_packets(bytes(bad))
    assert "too large" in damaged.warnings[0]
    # btsnoop and pcap cannot find the next record; pcapng skips the block.
    expected = whole.packets - 1 if container == "pcapng" else 0
    assert len(damaged.packets) == expected
    with pytest.raises(CaptureError):
        read_packets(bytes(bad), strict=True)


def test_odd_epochs_and_truncated_records() -> None:
    records = [
        (-BTSNOOP_EPOCH_DELTA_US, 3, bytes.fromhex("0e0401030c00"), 6),  # year 0
        (5, 3, bytes.fromhex("0e04"), 6),  # 1970, cut short
    ]
    capture = read_capture(btsnoop(1002 - 1, records))
    assert capture.packets == 2
    assert capture.stats.truncated == 1
    assert capture.first_ns == -BTSNOOP_EPOCH_DELTA_US * 1000
    assert capture.duration_s > 60 * 60 * 24 * 365 * 1000


@pytest.mark.parametrize(
    "data",
    [
        b"btsnoop\x00" + struct.pack(">II", 2, 1002),
        b"btsnoop\x00" + struct.pack(">II", 1, 1003),
        b"btsnoop\x00\x00\x00",
        struct.pack("<IHHiIII", 0xA1B2C3D4, 3, 0, 0, 0, 65535, 201),
        struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1),  # Ethernet
        struct.pack("<IHH", 0xA1B2C3D4, 2, 4),
        bytes.fromhex("0a0d0d0a") + struct.pack("<II", 28, 0x12345678) + bytes(16),
        bytes.fromhex("0a0d0d0a") + struct.pack("<II", 13, 0x1A2B3C4D),
    ],
    ids=[
        "btsnoop-v2", "btsnoop-bcsp", "btsnoop-short", "pcap-v3", "pcap-ethernet",
        "pcap-short", "pcapng-bad-bom", "pcapng-bad-length",
    ],
)  # fmt: skip
def test_unreadable_headers_raise_capture_error(data: bytes) -> None:
    with pytest.raises(CaptureError):
        read_capture(data)


def _event(code: int, params: bytes) -> bytes:
    return bytes([4, code, len(params)]) + params


def _acl(handle: int, payload: bytes, pb: int = 2) -> bytes:
    return b"\x02" + struct.pack("<HH", handle | pb << 12, len(payload)) + payload


def _l2cap_att(att: bytes) -> bytes:
    return struct.pack("<HH", len(att), 4) + att


def test_connection_events_of_every_kind() -> None:
    peer = bytes.fromhex("665544332211")
    enhanced = bytes([0x0A, 0]) + struct.pack("<HBB", 0x0005, 1, 0) + peer + bytes(20)
    failed = bytes([0x01, 0x3E]) + struct.pack("<HBB", 0x0006, 0, 0) + peer + bytes(7)
    classic = struct.pack("<BH", 0, 0x0007) + peer + b"\x01\x00"
    sco = struct.pack("<BH", 0, 0x0008) + peer + b"\x00\x00"
    notify = _l2cap_att(b"\x1b\x20\x00hi")
    records = [
        _event(0x3E, enhanced),
        _event(0x3E, failed),  # status 0x3e: no connection
        _event(0x03, classic),
        _event(0x03, sco),  # SCO links are not ACL connections
        _acl(0x0005, notify),
        _acl(0x0009, notify),  # no Connection Complete: implicit
        _event(0x05, struct.pack("<BHB", 0x0C, 0x0005, 0x13)),  # failed disconnect
        _event(0x05, struct.pack("<BHB", 0, 0x0005, 0x16)),
        _acl(0x0005, notify),  # after the disconnect: a new, implicit connection
        _event(0x3E, b"\x01\x00"),  # malformed
        b"\x04\x3e",  # malformed
        b"\x02\x05",  # malformed ACL
        b"\x09\x00",  # unknown H4 type
    ]
    data = btsnoop(1002, [(i, 1, r, len(r)) for i, r in enumerate(records)])
    capture = read_capture(data)
    kinds = [(c.handle, c.transport, c.implicit) for c in capture.connections]
    assert kinds == [
        (0x0005, Transport.LE, False),
        (0x0007, Transport.BR_EDR, False),
        (0x0009, Transport.UNKNOWN, True),
        (0x0005, Transport.UNKNOWN, True),
    ]
    first = capture.connections[0]
    assert first.peer == "11:22:33:44:55:66"
    assert first.central is False
    assert first.disconnect_reason == 0x16
    assert first.packets == 3
    assert [op.connection for op in capture.att] == [0, 2, 3]
    assert capture.stats.malformed == 4


def test_monitor_records_without_hci_and_closed_index() -> None:
    new_index = bytes([0, 1]) + bytes(6) + b"hci0\x00\x00\x00\x00"
    only_notes = btsnoop(2001, [(0, 0, new_index, 16), (1, 12, b"note\x00", 5)])
    capture = read_capture(only_notes)
    assert (capture.packets, capture.stats.other, capture.connections) == (2, 2, ())
    peer = bytes(6)
    conn = bytes([0x01, 0]) + struct.pack("<HBB", 0x0040, 0, 0) + peer + bytes(7)
    records = [
        (0, 3 | 1 << 16, _event(0x3E, conn)[1:], 0),
        (1, 9 | 1 << 16, b"", 0),  # Close Index: the controller went away
        (2, 5 | 1 << 16, _acl(0x0040, _l2cap_att(b"\x1b\x01\x00x"))[1:], 0),
    ]
    capture = read_capture(btsnoop(2001, [(t, f, d, len(d)) for t, f, d, _ in records]))
    assert [(c.adapter, c.implicit) for c in capture.connections] == [
        (1, False),
        (1, True),
    ]


def test_acl_reassembly_rules() -> None:
    pdu = _l2cap_att(b"\x1b\x12\x00" + bytes(range(30)))
    start, middle, end = pdu[:10], pdu[10:20], pdu[20:]
    records = [
        _acl(0x40, middle, pb=1),  # orphan continuation
        _acl(0x40, start, pb=0),
        _acl(0x40, start, pb=0),  # a new start drops the first
        _acl(0x40, middle, pb=1),
        _acl(0x40, middle + b"extra" * 10, pb=1),  # would overrun: ignored
        _acl(0x40, end, pb=1),
        _acl(0x40, pdu + b"trailing", pb=2),  # longer than the PDU: fine
        _acl(0x40, b"\x01", pb=2),  # too short for the L2CAP length
    ]
    capture = read_capture(
        btsnoop(1002, [(i, 0, r, len(r)) for i, r in enumerate(records)])
    )
    value = bytes(range(30))
    assert [(op.packet, op.value) for op in capture.att] == [(5, value), (6, value)]
    stats = capture.stats
    assert (stats.l2cap_orphans, stats.l2cap_incomplete, stats.malformed) == (1, 1, 1)


# --- the error contract under fuzzing ------------------------------------------


def _seeds() -> list[bytes]:
    s = scenario(max_acl_payload=40)
    frames_ = h4_frames(s.data)[:40]
    small = CaptureWriter(glasses_services())
    small.connect(LEFT, "C0:11:22:33:44:55", 0.0)
    small.att_notify(LEFT, TX_CHAR_UUID, b"\xc0\x00hello", 0.1)
    small.disconnect(LEFT, 0.2)
    seeds = [
        small.getvalue(),
        small.to_btsnoop(),
        s.data[:3000],
        s.writer.to_btsnoop()[:3000],
        to_btsnoop_h1(frames_),
        to_btsnoop_monitor(frames_),
        to_pcap(frames_, 201),
        to_pcap(frames_, 254, order=">", ns=True),
        to_pcap(frames_, 187),
        to_pcapng_monitor(frames_),
        to_btsnoop_truncated(frames_, 14),
        air_scenario().file(),
    ]
    seeds += [(DATA / name).read_bytes()[:3000] for name in REAL]
    return seeds


def _mutations(seeds: list[bytes], count: int, rng: random.Random) -> Iterator[bytes]:
    """Random files with real magics, and mutated valid ones."""
    heads = [seed[:24] for seed in seeds]
    for i in range(count):
        kind = i % 4
        if kind == 0:
            yield rng.randbytes(rng.randrange(0, 64))
            continue
        if kind == 1:
            yield rng.choice(heads)[: rng.randrange(8, 25)] + rng.randbytes(
                rng.randrange(400)
            )
            continue
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 5)):
            op = rng.randrange(7)
            pos = rng.randrange(len(data)) if data else 0
            if op == 0 and data:  # bit flip
                data[pos] ^= 1 << rng.randrange(8)
            elif op == 1:  # truncation
                del data[pos:]
            elif op == 2 and len(data) > pos + 4:  # wrong or huge length field
                value = rng.choice((0, 1, 3, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF))
                value = rng.choice((value, rng.randrange(1 << 32), rng.randrange(600)))
                struct.pack_into(rng.choice(("<I", ">I")), data, pos, value)
            elif op == 3 and data:  # interesting byte
                data[pos] = rng.choice((0, 1, 2, 4, 0x3E, 0x7F, 0x80, 0xFF))
            elif op == 4:  # insertion
                data[pos:pos] = rng.randbytes(rng.randrange(1, 24))
            elif op == 5 and data:  # deletion
                del data[pos : pos + rng.randrange(1, 32)]
            else:  # splice with another seed
                other = rng.choice(seeds)
                cut = rng.randrange(len(other) + 1)
                data = data[:pos] + bytearray(other[cut:])
        yield bytes(data)


@pytest.mark.timeout(15)
def test_every_reader_returns_or_raises_capture_error_only() -> None:
    rng = random.Random(20261128)
    started = time.perf_counter()
    fed = errors = 0
    for data in _mutations(_seeds(), 20_000, rng):
        # Any other exception fails the test with the input in the traceback.
        try:
            capture = read_capture(data)
            summarize(capture).to_dict()
        except CaptureError:
            errors += 1
        with contextlib.suppress(CaptureError):
            read_packets(data, strict=True)
        with contextlib.suppress(CaptureError):
            detect_format(data)
        decode_nordic(data)
        fed += 1
    assert fed == 20_000
    assert 0 < errors < fed
    print(f"{fed} inputs, {errors} refused, in {time.perf_counter() - started:.1f} s")
