"""The golden cases of wire protocol v1: one per frame, record, message and body.

``make_golden.py`` writes their bytes to tests/data/golden/protocol-v1.json once;
test_golden.py checks that encoding still gives those bytes and decoding them
gives the same values. Changing a byte here is a wire-format change: bump the
protocol version and say so in docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protocol.bodies import (
    Ack,
    AudioChunk,
    Body,
    Cancel,
    ClockSync,
    Credit,
    Display,
    Error,
    ErrorCode,
    Event,
    EventType,
    Heartbeat,
    Holding,
    MediaAction,
    MediaControl,
    Mode,
    Navigation,
    Payment,
    PhotoChunk,
    Presence,
    Request,
    RequestKind,
    ResponseAudio,
    ResponseText,
    Telemetry,
    WakeWord,
    decode_body,
    encode_body,
)
from protocol.constants import AlertCode, Channel, MessageFlags, MessageKind, RecordType
from protocol.events import RecordReassembled
from protocol.link import FragmentHeader, Reassembler, fragment_record
from protocol.message import Message, decode_messages, encode_messages
from protocol.record import Alert, Record, RecordHeader

MID = bytes(range(16))
MID2 = bytes(range(16, 32))


@dataclass(frozen=True)
class Case:
    name: str
    encode: Callable[[], bytes]
    check: Callable[[bytes], bool]


BODIES: list[tuple[str, Body, MessageFlags]] = [
    ("ack", Ack((MID, MID2)), MessageFlags.NONE),
    ("credit", Credit(32), MessageFlags.NONE),
    ("error", Error(ErrorCode.BUSY, "outbox full", MID), MessageFlags.NONE),
    ("clock_sync_request", ClockSync(1_000_000), MessageFlags.NONE),
    ("clock_sync_reply", ClockSync(1_000_000, 5_000_250, 5_000_300), MessageFlags.NONE),
    ("cancel", Cancel("user tapped"), MessageFlags.RELIABLE),
    ("heartbeat", Heartbeat(123_456_789), MessageFlags.NONE),
    ("presence", Presence("offline", 123), MessageFlags.NONE),
    (
        "mode",
        Mode("wake_word", "glance", ("telemetry", "events")),
        MessageFlags.RELIABLE,
    ),
    (
        "request_voice",
        Request(RequestKind.VOICE_QUERY, 3000, 9_876_543, 12_000, "ask", None, "opus"),
        MessageFlags.RELIABLE,
    ),
    (
        "request_text",
        Request(RequestKind.TEXT_QUERY, 3000, 42, 0, None, "what time is it", None),
        MessageFlags.RELIABLE,
    ),
    ("audio_chunk", AudioChunk(3, bytes(range(40))), MessageFlags.REALTIME),
    (
        "photo_chunk",
        PhotoChunk(0, b"\xff\xd8\xff\xe0" + bytes(60)),
        MessageFlags.RELIABLE,
    ),
    ("wake_word", WakeWord(7_000_000, "hey glasses"), MessageFlags.NONE),
    ("response_text", ResponseText(0, "It is 10:42.", "local"), MessageFlags.FINAL),
    ("response_audio", ResponseAudio(1, bytes(range(8))), MessageFlags.NONE),
    ("holding", Holding("Still working on it"), MessageFlags.NONE),
    ("display", Display("text", "Turn left in 50 m", 1), MessageFlags.RELIABLE),
    ("event_button", Event(EventType.BUTTON, 100, "double_tap"), MessageFlags.RELIABLE),
    ("event_gaze", Event(EventType.GAZE, 200, None, 0.25, -0.5), MessageFlags.NONE),
    (
        "event_head_pose",
        Event(EventType.HEAD_POSE, 300, None, 12.5, -3.0, 0.5),
        MessageFlags.NONE,
    ),
    ("telemetry", Telemetry(87, False, 400, 31.5), MessageFlags.RELIABLE),
    ("navigation", Navigation("Turn left onto Main St", 50, "left"), MessageFlags.NONE),
    ("payment_ask", Payment(1299, "EUR", "Cafe Central"), MessageFlags.RELIABLE),
    (
        "payment_confirm",
        Payment(1299, "EUR", "Cafe Central", True),
        MessageFlags.RELIABLE,
    ),
    ("media_control", MediaControl(MediaAction.SET_VOLUME, 7), MessageFlags.RELIABLE),
]


def _body_case(name: str, body: Body, flags: MessageFlags) -> list[Case]:
    kind, data = encode_body(body)
    message = Message(kind, MID, data, flags, request_id=7)

    def check_body(raw: bytes) -> bool:
        return decode_body(kind, raw) == body

    def check_message(raw: bytes) -> bool:
        return decode_messages(raw) == [message]

    return [
        Case(f"body/{name}", lambda: data, check_body),
        Case(f"message/{name}", message.encode, check_message),
    ]


def _kind_and_bytes(body: Body, mid: bytes) -> tuple[MessageKind, bytes, bytes]:
    kind, data = encode_body(body)
    return kind, mid, data


def _record_cases() -> list[Case]:
    handshake = Record(RecordHeader(RecordType.HANDSHAKE, 0x01020304, 0), b"\x11" * 32)
    data = Record(RecordHeader(RecordType.DATA, 0xA0B0C0D0, 2**40 + 5), b"\x22" * 20)
    alert = Alert(AlertCode.UNSUPPORTED_VERSION).to_record()
    out = [
        Case(
            "record/handshake",
            handshake.encode,
            lambda b: Record.decode(b) == handshake,
        ),
        Case("record/data", data.encode, lambda b: Record.decode(b) == data),
        Case("record/alert", alert.encode, lambda b: Record.decode(b) == alert),
        Case(
            "alert/unsupported_version",
            Alert(AlertCode.UNSUPPORTED_VERSION).encode,
            lambda b: Alert.decode(b) == Alert(AlertCode.UNSUPPORTED_VERSION),
        ),
    ]
    two = [
        Message(*_kind_and_bytes(Heartbeat(1), MID)),
        Message(*_kind_and_bytes(Credit(4), MID2)),
    ]
    out.append(
        Case(
            "plaintext/two_messages",
            lambda: encode_messages(two),
            lambda b: decode_messages(b) == two,
        )
    )
    return out


def _fragment_cases() -> list[Case]:
    out: list[Case] = []
    for first, last, channel, seq in [
        (True, True, Channel.CONTROL, 0),
        (True, False, Channel.INTERACTIVE, 1),
        (False, False, Channel.BULK, 2048),
        (False, True, Channel.STREAM, 4095),
    ]:
        header = FragmentHeader(first, last, channel, seq)

        def check_header(raw: bytes, h: FragmentHeader = header) -> bool:
            return FragmentHeader.decode(raw) == h

        out.append(
            Case(
                f"fragment_header/{int(first)}{int(last)}_{channel.name.lower()}_{seq}",
                header.encode,
                check_header,
            )
        )
    record = bytes(range(50))

    def encode_fragments() -> bytes:
        # Each fragment is prefixed by its length (one byte) in this vector.
        pieces = fragment_record(record, 20, channel=Channel.BULK, first_seq=4094)
        return b"".join(bytes([len(f)]) + f for f in pieces)

    def check_fragments(raw: bytes) -> bool:
        reassembler = Reassembler(first_seq=4094)
        events = []
        while raw:
            size, raw = raw[0], raw[1:]
            events += reassembler.feed(raw[:size], 0.0)
            raw = raw[size:]
        return events == [RecordReassembled(Channel.BULK, record, 3)]

    out.append(
        Case("fragments/50_bytes_at_20_wrapping", encode_fragments, check_fragments)
    )
    return out


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for name, body, flags in BODIES:
        cases += _body_case(name, body, flags)
    cases += _record_cases()
    cases += _fragment_cases()
    return cases
