"""Typed message bodies (docs/protocol.md §5).

Structured bodies are CBOR maps (RFC 8949) with short text keys; media chunks
and a few fixed-size control bodies are raw bytes. :func:`decode_body` maps a
:class:`~protocol.constants.MessageKind` and body bytes to one of the classes
here, or raises :class:`~protocol.errors.MalformedError`; :func:`encode_body`
is its inverse. Decoding is strict: CBOR tags, indefinite lengths, duplicate
keys, unknown keys and wrong types are all refused.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

import cbor2

from protocol.constants import MESSAGE_ID_SIZE, MessageKind
from protocol.errors import LocalProtocolError, MalformedError

__all__ = [
    "Ack",
    "AudioChunk",
    "Body",
    "Cancel",
    "ClockSync",
    "Credit",
    "Display",
    "Error",
    "ErrorCode",
    "Event",
    "EventType",
    "Heartbeat",
    "Holding",
    "MediaAction",
    "MediaControl",
    "Mode",
    "Navigation",
    "Payment",
    "PhotoChunk",
    "Presence",
    "Request",
    "RequestKind",
    "ResponseAudio",
    "ResponseText",
    "Telemetry",
    "WakeWord",
    "decode_body",
    "encode_body",
    "kind_of",
]

_E = TypeVar("_E", bound=enum.IntEnum)
_MAX_DEPTH: Final = 4
_INT_MIN: Final = -(1 << 63)
_INT_MAX: Final = (1 << 64) - 1
_MAX_ACK_IDS: Final = 1024
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")


class RequestKind(enum.IntEnum):
    """What a request asks for; the router decides by it (docs/protocol.md §5.1)."""

    VOICE_QUERY = 1
    PHOTO_QUERY = 2
    TEXT_QUERY = 3
    MEDIA = 4
    VOLUME = 5
    TIME = 6
    BATTERY = 7
    TIMER = 8
    NAVIGATION = 9
    PAYMENT = 10


class EventType(enum.IntEnum):
    """Input events from the glasses."""

    BUTTON = 1
    GESTURE = 2
    GAZE = 3
    HEAD_POSE = 4
    WAKE_WORD = 5
    """The glasses heard the wake word: a request is coming (the phone wakes
    its cellular radio now, while the user still speaks)."""


class MediaAction(enum.IntEnum):
    """Media keys and volume."""

    PLAY = 1
    PAUSE = 2
    NEXT = 3
    PREVIOUS = 4
    VOLUME_UP = 5
    VOLUME_DOWN = 6
    SET_VOLUME = 7


class ErrorCode(enum.IntEnum):
    """Application-level error codes carried by ERROR messages."""

    MALFORMED = 1
    UNSUPPORTED = 2
    BUSY = 3
    TIMEOUT = 4
    UNAVAILABLE = 5
    INTERNAL = 6


class _Tags(dict[int, Callable[[object, object], object]]):
    """Claims every CBOR tag so that cbor2 hands them all to :func:`_no_tag`."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: int) -> Callable[[object, object], object]:
        return _no_tag

    def get(
        self, key: int, default: object = None
    ) -> Callable[[object, object], object]:
        return _no_tag


def _no_tag(decoder: object, value: object) -> object:
    raise ValueError("CBOR tags are not allowed")


_ALL_TAGS: Final = _Tags()
_CBOR_MAP: Final = 5
"""The major type (the initial byte's top three bits) of a CBOR map."""


def _loads(data: bytes) -> dict[str, object]:
    if not data or data[0] >> 5 != _CBOR_MAP:
        # Not a map: refused before cbor2 builds a decoder (the daemon peeks
        # into every EVENT, whatever its body).
        raise MalformedError("structured body must be a map with text keys")
    try:
        value = cbor2.loads(
            data,
            tag_hook=_no_tag,
            semantic_decoders=_ALL_TAGS,
            max_depth=_MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError):
        raise MalformedError("body is not valid CBOR for this protocol") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise MalformedError("structured body must be a map with text keys")
    return value


def _dumps(fields: Mapping[str, object]) -> bytes:
    return cbor2.dumps(
        {k: v for k, v in fields.items() if v is not None}, canonical=True
    )


class _Map:
    """Typed access to a decoded CBOR map; every key must be consumed."""

    __slots__ = ("_m", "_seen", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._m = _loads(data)
        self._seen: set[str] = set()
        self._what = what

    def _get(self, key: str, required: bool) -> object:
        self._seen.add(key)
        if key not in self._m:
            if required:
                raise MalformedError(f"{self._what}: missing field {key!r}")
            return None
        return self._m[key]

    def opt_int(
        self, key: str, *, required: bool = False, lo: int = _INT_MIN
    ) -> int | None:
        v = self._get(key, required)
        if v is None:
            return None
        if type(v) is not int or not lo <= v <= _INT_MAX:
            raise MalformedError(f"{self._what}: field {key!r} must be an integer")
        return v

    def req_int(self, key: str, *, lo: int = _INT_MIN) -> int:
        v = self.opt_int(key, required=True, lo=lo)
        assert v is not None  # noqa: S101  (required=True never returns None)
        return v

    def opt_float(self, key: str) -> float | None:
        v = self._get(key, False)
        if v is None:
            return None
        if type(v) not in (int, float) or not math.isfinite(float(v)):  # type: ignore[arg-type]
            raise MalformedError(f"{self._what}: field {key!r} must be a number")
        return float(v)  # type: ignore[arg-type]

    def opt_str(self, key: str, *, required: bool = False) -> str | None:
        v = self._get(key, required)
        if v is None:
            return None
        if type(v) is not str:
            raise MalformedError(f"{self._what}: field {key!r} must be text")
        return v

    def req_str(self, key: str) -> str:
        v = self.opt_str(key, required=True)
        assert v is not None  # noqa: S101
        return v

    def opt_bool(self, key: str, *, required: bool = False) -> bool | None:
        v = self._get(key, required)
        if v is None:
            return None
        if type(v) is not bool:
            raise MalformedError(f"{self._what}: field {key!r} must be a boolean")
        return v

    def opt_bytes(self, key: str, size: int) -> bytes | None:
        v = self._get(key, False)
        if v is None:
            return None
        if type(v) is not bytes or len(v) != size:
            raise MalformedError(f"{self._what}: field {key!r} must be {size} bytes")
        return v

    def strs(self, key: str) -> tuple[str, ...]:
        v = self._get(key, False)
        if v is None:
            return ()
        if type(v) is not list or not all(type(x) is str for x in v):
            raise MalformedError(f"{self._what}: field {key!r} must be a text list")
        return tuple(v)

    def enum(self, key: str, cls: type[_E]) -> _E:
        v = self.req_int(key)
        try:
            return cls(v)
        except ValueError:
            raise MalformedError(f"{self._what}: unknown {cls.__name__} {v}") from None

    def done(self) -> None:
        extra = set(self._m) - self._seen
        if extra:
            raise MalformedError(f"{self._what}: unknown fields {sorted(extra)!r}")


@dataclass(frozen=True, slots=True)
class Request:
    """Metadata that opens every request (docs/protocol.md §5.1).

    Attributes:
        kind: What is asked.
        deadline_ms: Answer budget, from ``capture_end_us``.
        capture_end_us: End of the utterance or photo capture, glasses clock.
        size: Bytes of media that will follow (0 for text).
        intent: An optional hint from the glasses ("price", "translate").
        text: The query text, or the glasses' transcript hint.
        codec: Media codec of the chunks that follow ("opus", "lc3", "jpeg").
    """

    kind: RequestKind
    deadline_ms: int
    capture_end_us: int
    size: int = 0
    intent: str | None = None
    text: str | None = None
    codec: str | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps(
            {
                "k": int(self.kind),
                "d": self.deadline_ms,
                "t": self.capture_end_us,
                "n": self.size,
                "i": self.intent,
                "q": self.text,
                "c": self.codec,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "request")
        v = cls(
            m.enum("k", RequestKind),
            m.req_int("d", lo=0),
            m.req_int("t"),
            m.req_int("n", lo=0),
            m.opt_str("i"),
            m.opt_str("q"),
            m.opt_str("c"),
        )
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Raw media: a 4-byte big-endian chunk index, then the media bytes."""

    seq: int
    data: bytes

    def encode(self) -> bytes:
        """Return index and bytes."""
        if not 0 <= self.seq < 1 << 32:
            raise LocalProtocolError("chunk index must fit 32 bits")
        return _U32.pack(self.seq) + self.data

    @classmethod
    def _split(cls, data: bytes) -> tuple[int, bytes]:
        if len(data) < _U32.size:
            raise MalformedError("media chunk shorter than its 4-byte index")
        return _U32.unpack_from(data)[0], data[_U32.size :]


@dataclass(frozen=True, slots=True)
class AudioChunk(_Chunk):
    """Voice-query audio (codec frames, e.g. Opus or LC3) from the glasses."""

    @classmethod
    def decode(cls, data: bytes) -> AudioChunk:
        """Parse a raw chunk; raises ``MalformedError``."""
        return cls(*cls._split(data))


@dataclass(frozen=True, slots=True)
class PhotoChunk(_Chunk):
    """A piece of a photo (JPEG bytes) from the glasses."""

    @classmethod
    def decode(cls, data: bytes) -> PhotoChunk:
        """Parse a raw chunk; raises ``MalformedError``."""
        return cls(*cls._split(data))


@dataclass(frozen=True, slots=True)
class ResponseAudio(_Chunk):
    """Spoken answer audio to the glasses."""

    @classmethod
    def decode(cls, data: bytes) -> ResponseAudio:
        """Parse a raw chunk; raises ``MalformedError``."""
        return cls(*cls._split(data))


@dataclass(frozen=True, slots=True)
class ResponseText:
    """A piece of the answer text; FINAL on the message marks the last piece."""

    seq: int
    text: str
    route: str | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps({"s": self.seq, "x": self.text, "r": self.route})

    @classmethod
    def decode(cls, data: bytes) -> ResponseText:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "response text")
        v = cls(m.req_int("s", lo=0), m.req_str("x"), m.opt_str("r"))
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class Holding:
    """A holding reply ("still working on it"); not an answer."""

    text: str

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps({"x": self.text})

    @classmethod
    def decode(cls, data: bytes) -> Holding:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "holding")
        v = cls(m.req_str("x"))
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class Display:
    """A display command: ``op`` is "text", "clear" or "card"."""

    op: str
    text: str | None = None
    line: int | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps({"o": self.op, "x": self.text, "l": self.line})

    @classmethod
    def decode(cls, data: bytes) -> Display:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "display")
        v = cls(m.req_str("o"), m.opt_str("x"), m.opt_int("l", lo=0))
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class Event:
    """A button, gesture, gaze or head-pose event.

    ``name`` says which button or gesture ("tap", "double_tap", "swipe_back");
    ``x``/``y`` are gaze coordinates, ``x``/``y``/``z`` yaw, pitch and roll in
    degrees for head pose; ``t_us`` is the glasses' clock.
    """

    type: EventType
    t_us: int
    name: str | None = None
    x: float | None = None
    y: float | None = None
    z: float | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps(
            {
                "e": int(self.type),
                "t": self.t_us,
                "n": self.name,
                "x": self.x,
                "y": self.y,
                "z": self.z,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Event:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "event")
        v = cls(
            m.enum("e", EventType),
            m.req_int("t"),
            m.opt_str("n"),
            m.opt_float("x"),
            m.opt_float("y"),
            m.opt_float("z"),
        )
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class Telemetry:
    """Battery and temperature of the glasses."""

    battery_pct: int
    charging: bool
    t_us: int
    temperature_c: float | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps(
            {
                "b": self.battery_pct,
                "g": self.charging,
                "t": self.t_us,
                "c": self.temperature_c,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Telemetry:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "telemetry")
        battery = m.req_int("b", lo=0)
        if battery > 100:
            raise MalformedError("telemetry: battery_pct above 100")
        charging = m.opt_bool("g", required=True)
        assert charging is not None  # noqa: S101
        v = cls(battery, charging, m.req_int("t"), m.opt_float("c"))
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class Navigation:
    """One navigation step, shown on the glasses."""

    instruction: str
    distance_m: int | None = None
    direction: str | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps(
            {"x": self.instruction, "m": self.distance_m, "r": self.direction}
        )

    @classmethod
    def decode(cls, data: bytes) -> Navigation:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "navigation")
        v = cls(m.req_str("x"), m.opt_int("m", lo=0), m.opt_str("r"))
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class Payment:
    """A payment to confirm (phone to glasses) or its confirmation (back).

    ``amount_minor`` is in the currency's minor unit (cents); ``confirmed``
    is absent on the question and true or false on the answer.
    """

    amount_minor: int
    currency: str
    merchant: str
    confirmed: bool | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps(
            {
                "a": self.amount_minor,
                "u": self.currency,
                "m": self.merchant,
                "ok": self.confirmed,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Payment:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "payment")
        v = cls(m.req_int("a", lo=0), m.req_str("u"), m.req_str("m"), m.opt_bool("ok"))
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class MediaControl:
    """A media key or volume change."""

    action: MediaAction
    volume: int | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps({"a": int(self.action), "v": self.volume})

    @classmethod
    def decode(cls, data: bytes) -> MediaControl:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "media control")
        v = cls(m.enum("a", MediaAction), m.opt_int("v", lo=0))
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class WakeWord:
    """The glasses heard the wake word: the phone may wake its radio now."""

    t_us: int
    word: str | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps({"t": self.t_us, "w": self.word})

    @classmethod
    def decode(cls, data: bytes) -> WakeWord:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "wake word")
        v = cls(m.req_int("t"), m.opt_str("w"))
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledged message ids: raw, 16 bytes each, 1 to 1024 of them."""

    ids: tuple[bytes, ...]

    def encode(self) -> bytes:
        """Return the concatenated ids."""
        if not 1 <= len(self.ids) <= _MAX_ACK_IDS or any(
            len(i) != MESSAGE_ID_SIZE for i in self.ids
        ):
            raise LocalProtocolError("an ACK carries 1..1024 ids of 16 bytes")
        return b"".join(self.ids)

    @classmethod
    def decode(cls, data: bytes) -> Ack:
        """Parse the ids; raises ``MalformedError``."""
        n, rest = divmod(len(data), MESSAGE_ID_SIZE)
        if rest or not 1 <= n <= _MAX_ACK_IDS:
            raise MalformedError("ACK body must be 1..1024 ids of 16 bytes")
        return cls(
            tuple(data[i : i + MESSAGE_ID_SIZE] for i in range(0, len(data), 16))
        )


@dataclass(frozen=True, slots=True)
class Credit:
    """Flow-control credits: how many more reliable messages the sender may send."""

    credits: int

    def encode(self) -> bytes:
        """Return the 4-byte big-endian count."""
        if not 0 <= self.credits < 1 << 32:
            raise LocalProtocolError("credits must fit 32 bits")
        return _U32.pack(self.credits)

    @classmethod
    def decode(cls, data: bytes) -> Credit:
        """Parse the count; raises ``MalformedError``."""
        if len(data) != _U32.size:
            raise MalformedError("CREDIT body must be 4 bytes")
        return cls(_U32.unpack(data)[0])


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Link supervision: the sender's monotonic clock in microseconds."""

    t_us: int

    def encode(self) -> bytes:
        """Return the 8-byte big-endian time."""
        if not 0 <= self.t_us < 1 << 64:
            raise LocalProtocolError("heartbeat time must fit 64 bits")
        return _U64.pack(self.t_us)

    @classmethod
    def decode(cls, data: bytes) -> Heartbeat:
        """Parse the time; raises ``MalformedError``."""
        if len(data) != _U64.size:
            raise MalformedError("HEARTBEAT body must be 8 bytes")
        return cls(_U64.unpack(data)[0])


@dataclass(frozen=True, slots=True)
class Error:
    """An application error, optionally about message ``ref``."""

    code: ErrorCode
    reason: str
    ref: bytes | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps({"c": int(self.code), "r": self.reason, "ref": self.ref})

    @classmethod
    def decode(cls, data: bytes) -> Error:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "error")
        v = cls(
            m.enum("c", ErrorCode), m.req_str("r"), m.opt_bytes("ref", MESSAGE_ID_SIZE)
        )
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class ClockSync:
    """NTP-style clock exchange (docs/protocol.md §5.4), microseconds.

    The requester sends ``t1`` (its send time); the responder answers with
    ``t1`` echoed, ``t2`` (its receive time) and ``t3`` (its send time).
    """

    t1: int
    t2: int | None = None
    t3: int | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps({"1": self.t1, "2": self.t2, "3": self.t3})

    @classmethod
    def decode(cls, data: bytes) -> ClockSync:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "clock sync")
        v = cls(m.req_int("1"), m.opt_int("2"), m.opt_int("3"))
        m.done()
        if (v.t2 is None) != (v.t3 is None):
            raise MalformedError("clock sync: t2 and t3 come together")
        return v


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel the request named in the message header's request id."""

    reason: str | None = None

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps({"r": self.reason})

    @classmethod
    def decode(cls, data: bytes) -> Cancel:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "cancel")
        v = cls(m.opt_str("r"))
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class Mode:
    """Desired state of the glasses, re-applied after every reconnect.

    ``mic`` is "off", "wake_word" or "streaming"; ``display`` is "off",
    "glance" or "on"; ``subscriptions`` names what the phone wants pushed
    ("telemetry", "events").
    """

    mic: str
    display: str
    subscriptions: tuple[str, ...] = ()

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps({"m": self.mic, "d": self.display, "s": list(self.subscriptions)})

    @classmethod
    def decode(cls, data: bytes) -> Mode:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "mode")
        v = cls(m.req_str("m"), m.req_str("d"), m.strs("s"))
        m.done()
        return v


@dataclass(frozen=True, slots=True)
class Presence:
    """The phone's presence towards the cloud: "online" or "offline" (last will)."""

    state: str
    t_us: int

    def encode(self) -> bytes:
        """Return the CBOR body."""
        return _dumps({"s": self.state, "t": self.t_us})

    @classmethod
    def decode(cls, data: bytes) -> Presence:
        """Parse the CBOR body; raises ``MalformedError``."""
        m = _Map(data, "presence")
        v = cls(m.req_str("s"), m.req_int("t"))
        m.done()
        return v


Body = (
    Ack
    | AudioChunk
    | Cancel
    | ClockSync
    | Credit
    | Display
    | Error
    | Event
    | Heartbeat
    | Holding
    | MediaControl
    | Mode
    | Navigation
    | Payment
    | PhotoChunk
    | Presence
    | Request
    | ResponseAudio
    | ResponseText
    | Telemetry
    | WakeWord
)

_DECODERS: Final[Mapping[MessageKind, Callable[[bytes], Body]]] = {
    MessageKind.ACK: Ack.decode,
    MessageKind.CREDIT: Credit.decode,
    MessageKind.ERROR: Error.decode,
    MessageKind.CLOCK_SYNC: ClockSync.decode,
    MessageKind.CANCEL: Cancel.decode,
    MessageKind.HEARTBEAT: Heartbeat.decode,
    MessageKind.MODE: Mode.decode,
    MessageKind.PRESENCE: Presence.decode,
    MessageKind.REQUEST: Request.decode,
    MessageKind.AUDIO_CHUNK: AudioChunk.decode,
    MessageKind.PHOTO_CHUNK: PhotoChunk.decode,
    MessageKind.WAKE_WORD: WakeWord.decode,
    MessageKind.RESPONSE_TEXT: ResponseText.decode,
    MessageKind.RESPONSE_AUDIO: ResponseAudio.decode,
    MessageKind.HOLDING: Holding.decode,
    MessageKind.DISPLAY: Display.decode,
    MessageKind.EVENT: Event.decode,
    MessageKind.TELEMETRY: Telemetry.decode,
    MessageKind.NAVIGATION: Navigation.decode,
    MessageKind.PAYMENT: Payment.decode,
    MessageKind.MEDIA_CONTROL: MediaControl.decode,
}

_KINDS: Final[Mapping[type, MessageKind]] = {
    Ack: MessageKind.ACK,
    Credit: MessageKind.CREDIT,
    Error: MessageKind.ERROR,
    ClockSync: MessageKind.CLOCK_SYNC,
    Cancel: MessageKind.CANCEL,
    Heartbeat: MessageKind.HEARTBEAT,
    Mode: MessageKind.MODE,
    Presence: MessageKind.PRESENCE,
    Request: MessageKind.REQUEST,
    AudioChunk: MessageKind.AUDIO_CHUNK,
    PhotoChunk: MessageKind.PHOTO_CHUNK,
    WakeWord: MessageKind.WAKE_WORD,
    ResponseText: MessageKind.RESPONSE_TEXT,
    ResponseAudio: MessageKind.RESPONSE_AUDIO,
    Holding: MessageKind.HOLDING,
    Display: MessageKind.DISPLAY,
    Event: MessageKind.EVENT,
    Telemetry: MessageKind.TELEMETRY,
    Navigation: MessageKind.NAVIGATION,
    Payment: MessageKind.PAYMENT,
    MediaControl: MessageKind.MEDIA_CONTROL,
}


def kind_of(body: Body) -> MessageKind:
    """The message kind that carries ``body``."""
    return _KINDS[type(body)]


def decode_body(kind: MessageKind, data: bytes) -> Body:
    """Parse the body of a message of ``kind``.

    Raises:
        MalformedError: the bytes are not a valid body of that kind.
    """
    return _DECODERS[kind](bytes(data))


def encode_body(body: Body) -> tuple[MessageKind, bytes]:
    """Return the message kind and the encoded bytes of ``body``."""
    return _KINDS[type(body)], body.encode()
