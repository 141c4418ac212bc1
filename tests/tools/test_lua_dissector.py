"""The Wireshark dissector ``tools/wireshark/glasses_relay.lua``, run by tshark.

Captures are written with the project's own writer; tshark loads the script
with ``-X lua_script:`` and must show the fragment header, the records
reassembled from one or several fragments (also across channels and across a
sequence wrap), the cleartext record bodies, and the messages of a
``--plaintext`` comment, with zero expert errors. The Python link layer
(``tools.replay.decode_frames``) is the second opinion on what the records are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocol.capture import (
    CaptureWriter,
    glasses_services,
    plaintext_comment,
    read_capture,
)
from protocol.capture.rewrite import redact
from protocol.capture.services import CharacteristicSpec, CharProps, ServiceSpec
from protocol.constants import AlertCode, Channel, RecordType
from protocol.gatt import RX_CHAR_UUID, TX_CHAR_UUID
from protocol.link import LinkSender, fragment_record
from protocol.message import decode_messages
from protocol.record import Alert, Record, RecordHeader
from tools.replay import decode_frames, load_capture

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "wireshark" / "glasses_relay.lua"
GOLDEN = json.loads((ROOT / "tests/data/golden/protocol-v1.json").read_text())
TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(
    TSHARK is None, reason="tshark is the oracle (make system-tools)"
)
LEFT = 0x0040
RIGHT = 0x0041
SESSION = 0xA0B0C0D0
FIELDS = (
    "frame.number",
    "glasses_relay.direction",
    "glasses_relay.frag.first",
    "glasses_relay.frag.last",
    "glasses_relay.frag.channel",
    "glasses_relay.frag.seq",
    "glasses_relay.frag.part",
    "glasses_relay.frag.reassembled_in",
    "glasses_relay.record.type",
    "glasses_relay.record.session_id",
    "glasses_relay.record.counter",
    "glasses_relay.record.length",
    "glasses_relay.record.fragments",
    "glasses_relay.record.frames",
    "glasses_relay.alert.code",
    "glasses_relay.msg.kind",
    "glasses_relay.msg.request_id",
    "glasses_relay.msg.body_length",
)


@dataclass
class Dissected:
    rows: dict[int, dict[str, str]]
    expert: str

    def severity(self, name: str) -> int:
        """Count of the ``-z expert`` section ``name`` (Errors, Warns, ...)."""
        for line in self.expert.splitlines():
            if line.startswith(f"{name} ("):
                return int(line.split("(")[1].rstrip(")"))
        return 0

    def with_field(self, name: str) -> dict[int, str]:
        return {n: row[name] for n, row in self.rows.items() if row.get(name)}


def dissect(path: Path, *options: str, two_pass: bool = False) -> Dissected:
    assert TSHARK is not None
    args = [TSHARK, "-X", f"lua_script:{SCRIPT}", "-r", str(path), "-T", "fields"]
    args += ["-E", "occurrence=a", "-E", "aggregator=;"]
    for name in FIELDS:
        args += ["-e", name]
    if two_pass:
        args.append("-2")
    for option in options:
        args += ["-o", option]
    done = subprocess.run(
        [*args, "-z", "expert"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Lua" not in done.stderr, done.stderr  # a script error is only a warning
    rows: dict[int, dict[str, str]] = {}
    lines = done.stdout.splitlines()
    i = 0
    for i, line in enumerate(lines):  # noqa: B007 - the expert part follows
        parts = line.split("\t")
        if len(parts) != len(FIELDS) or not parts[0].isdigit():
            break
        rows[int(parts[0])] = dict(zip(FIELDS[1:], parts[1:], strict=True))
    return Dissected(rows, "\n".join(lines[i:]))


def golden_fragments() -> list[bytes]:
    """The 50-byte BULK record cut at 20 bytes from sequence 4094 (a wrap)."""
    raw = bytes.fromhex(GOLDEN["fragments/50_bytes_at_20_wrapping"])
    out = []
    while raw:
        size, raw = raw[0], raw[1:]
        out.append(raw[:size])
        raw = raw[size:]
    return out


@dataclass
class Written:
    path: Path
    bulk_frames: list[int]
    """Frame numbers (1-based) of the photo record's four fragments."""
    control_frame: int
    """Frame of the one-fragment CONTROL record that interrupts them."""
    wrap_frames: list[int]


def frame_of(data: bytes, value: bytes) -> int:
    """The tshark frame number of the one ATT PDU carrying ``value``."""
    (packet,) = [op.packet for op in read_capture(data).att if op.value == value]
    return packet + 1


def write_capture(tmp_path: Path) -> Written:
    """Both arms: handshakes, a record over 4 fragments with a CONTROL record
    between its fragments, an alert, and the golden wrapping record."""
    w = CaptureWriter(glasses_services())
    w.connect(LEFT, "C0:11:22:33:44:55", 1.0)
    w.mtu(LEFT, 247, 1.01)
    w.discover(LEFT, 1.02)
    w.subscribe(LEFT, TX_CHAR_UUID, 1.03)
    hello = Record(RecordHeader(RecordType.HANDSHAKE, 0, 0), bytes(32)).encode()
    (first,) = fragment_record(hello, 200, channel=Channel.CONTROL)
    w.att_write_cmd(LEFT, RX_CHAR_UUID, first, 1.1)
    reply = Record(RecordHeader(RecordType.HANDSHAKE, 0, 0), bytes(96)).encode()
    (second,) = fragment_record(reply, 200, channel=Channel.CONTROL)
    w.att_notify(LEFT, TX_CHAR_UUID, second, 1.2)

    # Glasses to phone, sequence 1 on: a photo record on BULK; after two of
    # its fragments a CONTROL record (priority) goes first.
    up = LinkSender(first_seq=1)
    photo = Record(RecordHeader(RecordType.DATA, SESSION, 7), bytes(300)).encode()
    up.queue(photo, Channel.BULK)
    pieces = [up.pull(100), up.pull(100)]
    messages = bytes.fromhex(GOLDEN["message/request_text"])
    messages += bytes.fromhex(GOLDEN["message/heartbeat"])
    control = Record(RecordHeader(RecordType.DATA, SESSION, 8), messages + bytes(16))
    up.queue(control.encode(), Channel.CONTROL)
    pieces += [up.pull(200), up.pull(100), up.pull(100)]
    assert up.pull(100) is None
    values = [p for p in pieces if p is not None]
    for i, piece in enumerate(values):
        comment = plaintext_comment(decode_messages(messages)) if i == 2 else None
        w.att_notify(LEFT, TX_CHAR_UUID, piece, 1.3 + i / 100, comment=comment)
    alert = Alert(AlertCode.BUSY).to_record().encode()
    (refusal,) = fragment_record(alert, 100, channel=Channel.CONTROL, first_seq=1)
    w.att_write_cmd(LEFT, RX_CHAR_UUID, refusal, 1.5)
    w.disconnect(LEFT, 1.9)

    w.connect(RIGHT, "C0:11:22:33:44:66", 2.0)
    w.discover(RIGHT, 2.01)
    wrapped = Record(RecordHeader(RecordType.DATA, SESSION, 9), bytes(36)).encode()
    wrapping = fragment_record(wrapped, 20, channel=Channel.STREAM, first_seq=4094)
    for i, piece in enumerate(wrapping):
        w.att_notify(RIGHT, TX_CHAR_UUID, piece, 2.1 + i / 100)
    w.disconnect(RIGHT, 2.5)
    data = w.getvalue()
    path = tmp_path / "dissector.pcapng"
    path.write_bytes(data)
    return Written(
        path,
        [frame_of(data, v) for i, v in enumerate(values) if i != 2],
        frame_of(data, values[2]),
        [frame_of(data, v) for v in wrapping],
    )


def test_fragments_records_and_messages(tmp_path: Path) -> None:
    written = write_capture(tmp_path)
    out = dissect(written.path)
    assert out.severity("Errors") == 0, out.expert
    assert out.severity("Warns") == 0, out.expert

    # Every value of TX and RX is a fragment, with its header fields.
    fragments = out.with_field("glasses_relay.frag.seq")
    assert len(fragments) == 2 + 5 + 1 + 3
    dirs = out.with_field("glasses_relay.direction")
    assert set(dirs.values()) == {"glasses>phone", "phone>glasses"}
    bulk, control = written.bulk_frames, written.control_frame
    assert [fragments[n] for n in bulk] == ["1", "2", "4", "5"]
    assert fragments[control] == "3"
    row = out.rows[bulk[0]]
    assert row["glasses_relay.frag.first"] == "1"
    assert row["glasses_relay.frag.last"] == "0"
    assert row["glasses_relay.frag.channel"] == "2"  # BULK
    assert out.rows[bulk[-1]]["glasses_relay.frag.last"] == "1"
    assert [out.rows[n]["glasses_relay.frag.part"] for n in bulk] == [
        "1",
        "2",
        "3",
        "4",
    ]

    # The record spread over four fragments, shown in the frame of the last.
    records = out.with_field("glasses_relay.record.type")
    photo = out.rows[bulk[-1]]
    assert photo["glasses_relay.record.type"] == "0x02"
    assert photo["glasses_relay.record.session_id"] == "0xa0b0c0d0"
    assert photo["glasses_relay.record.counter"] == "7"
    assert photo["glasses_relay.record.length"] == str(14 + 300)
    assert photo["glasses_relay.record.fragments"] == "4"
    assert photo["glasses_relay.record.frames"] == ",".join(map(str, bulk))
    assert not any(n in records for n in bulk[:-1])

    # The CONTROL record in between: one fragment, messages from the comment.
    inner = out.rows[control]
    assert inner["glasses_relay.record.counter"] == "8"
    assert inner["glasses_relay.record.fragments"] == "1"
    assert inner["glasses_relay.msg.kind"] == "0x10;0x06"  # REQUEST, HEARTBEAT
    assert inner["glasses_relay.msg.request_id"] == "7;7"
    assert inner["glasses_relay.msg.body_length"] == "34;8"

    # Cleartext records: handshakes both ways, the alert's code.
    kinds = sorted(records.values())
    assert kinds == ["0x01", "0x01", "0x02", "0x02", "0x02", "0x03"]
    assert list(out.with_field("glasses_relay.alert.code").values()) == ["2"]

    # A record across the sequence wrap on the other arm.
    wrap = written.wrap_frames
    assert [fragments[n] for n in wrap] == ["4094", "4095", "0"]
    assert out.rows[wrap[-1]]["glasses_relay.record.length"] == "50"
    assert out.rows[wrap[-1]]["glasses_relay.record.counter"] == "9"
    assert out.rows[wrap[-1]]["glasses_relay.record.frames"] == ",".join(map(str, wrap))

    # The Python link layer finds the same records on the left arm. (On the
    # right one it expects sequence 0 of a new connection and reports the
    # start at 4094 as a gap; the dissector takes the first number it sees,
    # as a capture may start mid-connection.)
    lines = decode_frames(load_capture(written.path))
    left = [line for line in lines if line.connection == 0]
    assert [line.counter for line in left] == [0, 0, 8, 7, 0]
    assert sum(line.fragments or 0 for line in left) == len(fragments) - len(wrap)


def test_the_golden_fragment_vector(tmp_path: Path) -> None:
    # tests/data/golden: 50 bytes (0, 1, .. 49: not a record) cut at 20 bytes
    # from sequence 4094, as docs/protocol.md specifies and Python checks.
    w = CaptureWriter(glasses_services())
    w.connect(RIGHT, "C0:11:22:33:44:66", 2.0)
    w.discover(RIGHT, 2.01)
    for i, piece in enumerate(golden_fragments()):
        w.att_notify(RIGHT, TX_CHAR_UUID, piece, 2.1 + i / 100)
    path = tmp_path / "golden.pcapng"
    path.write_bytes(w.getvalue())
    out = dissect(path)
    seqs = out.with_field("glasses_relay.frag.seq")
    assert list(seqs.values()) == ["4094", "4095", "0"]
    assert list(out.with_field("glasses_relay.frag.channel").values()) == ["2"] * 3
    assert list(out.with_field("glasses_relay.record.length").values()) == ["50"]
    assert "Record version 0" in out.expert  # byte 0 of the vector
    assert out.severity("Errors") == 0, out.expert


def test_two_passes_point_back_to_the_completing_frame(tmp_path: Path) -> None:
    written = write_capture(tmp_path)
    out = dissect(written.path, two_pass=True)
    assert out.severity("Errors") == 0, out.expert
    last = str(written.bulk_frames[-1])
    for n in written.bulk_frames[:-1]:
        assert out.rows[n]["glasses_relay.frag.reassembled_in"] == last
    assert out.rows[written.bulk_frames[-1]]["glasses_relay.record.counter"] == "7"


def test_gaps_and_malformed_values_are_expert_items(tmp_path: Path) -> None:
    w = CaptureWriter(glasses_services())
    w.connect(LEFT, "C0:11:22:33:44:55", 1.0)
    w.discover(LEFT, 1.01)
    record = Record(RecordHeader(RecordType.DATA, SESSION, 1), bytes(200)).encode()
    pieces = fragment_record(record, 60, channel=Channel.INTERACTIVE)
    for i, piece in enumerate(pieces):
        if i != 1:  # one fragment lost: the record is dropped
            w.att_notify(LEFT, TX_CHAR_UUID, piece, 1.1 + i / 100)
    w.att_notify(LEFT, TX_CHAR_UUID, b"\x01", 1.5)  # shorter than a header
    w.disconnect(LEFT, 2.0)
    path = tmp_path / "gap.pcapng"
    path.write_bytes(w.getvalue())
    out = dissect(path)
    assert not out.with_field("glasses_relay.record.type")
    assert "1 fragment(s) lost: expected 1, got 2" in out.expert
    assert "Continuation without a record in progress" in out.expert
    assert out.severity("Errors") == 1, out.expert  # the 1-byte value


def test_handles_as_a_fallback_without_discovery(tmp_path: Path) -> None:
    # Custom UUIDs (not ours) at the same handles, so only the preference can
    # make the values ours.
    other = ServiceSpec(
        "0000ffe0-0000-1000-8000-00805f9b34fb",
        (
            CharacteristicSpec(
                "0000ffe1-0000-1000-8000-00805f9b34fb", CharProps.NOTIFY
            ),
            CharacteristicSpec(
                "0000ffe2-0000-1000-8000-00805f9b34fb",
                CharProps.WRITE_WITHOUT_RESPONSE,
            ),
        ),
    )
    w = CaptureWriter([other])
    tx = w.handles.value_handle("0000ffe1-0000-1000-8000-00805f9b34fb")
    rx = w.handles.value_handle("0000ffe2-0000-1000-8000-00805f9b34fb")
    w.connect(LEFT, "C0:11:22:33:44:55", 1.0)
    record = Record(RecordHeader(RecordType.DATA, SESSION, 3), bytes(80)).encode()
    for i, piece in enumerate(fragment_record(record, 40)):
        w.att_notify(LEFT, tx, piece, 1.1 + i / 100)
    w.att_write_cmd(LEFT, rx, fragment_record(record, 200)[0], 1.5)
    w.disconnect(LEFT, 2.0)
    path = tmp_path / "nodiscovery.pcapng"
    path.write_bytes(w.getvalue())

    assert not dissect(path).with_field("glasses_relay.frag.seq")
    out = dissect(
        path,
        f"glasses_relay.tx_handle:0x{tx:04x}",
        f"glasses_relay.rx_handle:0x{rx:04x}",
    )
    assert len(out.with_field("glasses_relay.frag.seq")) == 4
    counters = out.with_field("glasses_relay.record.counter")
    assert list(counters.values()) == ["3", "3"]  # one record each way
    assert out.severity("Errors") == 0, out.expert


def test_values_cut_by_redaction_are_noted_not_reassembled(tmp_path: Path) -> None:
    written = write_capture(tmp_path)
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(redact(written.path.read_bytes(), key=b"k" * 32, truncate=20))
    out = dissect(cut)
    assert out.severity("Errors") == 0, out.expert
    assert out.severity("Warns") == 0, out.expert
    assert "Value cut short in the capture" in out.expert
    assert len(out.with_field("glasses_relay.frag.seq")) == 11  # headers still shown
    # Values of at most 20 bytes stay whole: the alert (18 bytes) and the
    # record cut at 20 bytes on the other arm still make records.
    kinds = list(out.with_field("glasses_relay.record.type").values())
    assert kinds == ["0x03", "0x02"]
