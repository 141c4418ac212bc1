"""The uplink seam: what the relay needs from a connection to the cloud.

An uplink carries opaque payloads (sealed envelopes, already packed into batches
by the caller) to the gateway and brings the gateway's payloads (signed
acknowledgements, answers) back. It never looks inside them.

Delivery contract:
    :meth:`Uplink.send` returns when the transport has accepted every payload (MQTT
    QoS 1: a PUBACK for each; WebSocket: the frames are written). That is *not* an
    end-to-end acknowledgement: the caller keeps each envelope in its outbox until
    the gateway's signed acknowledgement arrives on :meth:`Uplink.incoming`, and
    resends what is unacknowledged after a reconnect.

Errors:
    A broker or gateway that is down is not an error of the relay: the uplink
    reconnects by itself, forever, with capped and fully jittered exponential
    backoff, and meanwhile :meth:`Uplink.send` raises
    :class:`UplinkUnavailableError` so the caller keeps its messages and retries.
    Permanent problems (malformed URL, unreadable CA file, refused credentials)
    raise :class:`relay.errors.UplinkConfigError`, whose message is one line for
    the user.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, Self

from relay.errors import UplinkError

__all__ = [
    "BACKOFF_CAP_S",
    "BACKOFF_INITIAL_S",
    "CHANNEL_UP",
    "STABLE_AFTER_S",
    "Backoff",
    "PayloadTooLargeError",
    "Uplink",
    "UplinkState",
    "UplinkStats",
    "UplinkUnavailableError",
]

#: First reconnect delay ceiling, seconds; doubles per failed attempt.
BACKOFF_INITIAL_S: Final = 0.5
#: Upper bound of the reconnect delay ceiling, seconds.
BACKOFF_CAP_S: Final = 30.0
#: A connection that lasted this long resets the backoff to its first step.
STABLE_AFTER_S: Final = 10.0
#: The channel key for envelopes to the gateway.
CHANNEL_UP: Final = "up"

_MAX_EXPONENT: Final = 64


class UplinkUnavailableError(UplinkError):
    """The broker or gateway cannot take messages now (down, unreachable, slow).

    Not a failure of the relay: keep the messages in the outbox and retry after
    :meth:`Uplink.wait_connected`.
    """


class PayloadTooLargeError(UplinkError, ValueError):
    """A payload is larger than the uplink's configured ``max_payload``.

    Attributes:
        size: The payload's size in bytes.
        limit: The configured limit in bytes.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds the uplink limit of {limit}")
        self.size = size
        self.limit = limit


class UplinkState(enum.StrEnum):
    """Where an uplink's connection is."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter (AWS Architecture Blog, 2015).

    The delay before reconnect attempt ``n`` (0-based) is uniform in
    ``[0, min(cap_s, initial_s * 2**n)]``.

    Attributes:
        initial_s: Ceiling of the first delay, seconds.
        cap_s: Largest ceiling, seconds.
    """

    initial_s: float = BACKOFF_INITIAL_S
    cap_s: float = BACKOFF_CAP_S

    def __post_init__(self) -> None:
        """Reject non-positive or inverted bounds."""
        if not 0 < self.initial_s <= self.cap_s:
            raise ValueError(
                "backoff needs 0 < initial_s <= cap_s, "
                f"got {self.initial_s}, {self.cap_s}"
            )

    def ceiling(self, attempt: int) -> float:
        """Return the upper bound of the delay before attempt ``attempt``."""
        return min(self.cap_s, self.initial_s * 2.0 ** min(attempt, _MAX_EXPONENT))

    def delay(self, attempt: int, uniform01: float) -> float:
        """Return the delay before attempt ``attempt``, given a uniform [0, 1) draw."""
        return self.ceiling(attempt) * uniform01


@dataclass(frozen=True, slots=True)
class UplinkStats:
    """A snapshot of an uplink's counters (all since :meth:`Uplink.start`).

    Attributes:
        state: The connection state when the snapshot was taken.
        connects: Connections established.
        reconnects: Connections established after the first one.
        publishes: Payloads the transport accepted (PUBACKed or written).
        bytes_sent: Payload bytes the transport accepted.
        in_flight: Payloads handed to the transport and not yet accepted.
        received: Payloads received from the gateway and queued for the caller.
        bytes_received: Payload bytes received and queued.
        dropped_incoming: Payloads dropped because the incoming queue was full.
    """

    state: UplinkState
    connects: int
    reconnects: int
    publishes: int
    bytes_sent: int
    in_flight: int
    received: int
    bytes_received: int
    dropped_incoming: int


class Uplink(Protocol):
    """A reconnecting connection to the cloud gateway carrying opaque payloads.

    Use as ``async with uplink:`` or call :meth:`start` and :meth:`aclose`.
    """

    @property
    def state(self) -> UplinkState:
        """The connection's current state."""
        ...

    @property
    def reconnects(self) -> int:
        """Connections after the first (``stats().reconnects``, no snapshot)."""
        ...

    async def start(self) -> None:
        """Validate what can be checked offline and start connecting in the background.

        Returns without waiting for the connection (see :meth:`wait_connected`).

        Raises:
            UplinkConfigError: a permanent problem such as an unreadable CA file.
        """
        ...

    async def aclose(self) -> None:
        """Disconnect cleanly and stop reconnecting; idempotent."""
        ...

    async def __aenter__(self) -> Self:
        """Call :meth:`start`."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Call :meth:`aclose`."""
        ...

    async def wait_connected(self) -> None:
        """Wait until connected; wrap in ``asyncio.timeout()`` to bound the wait.

        Raises:
            UplinkConfigError: the uplink failed permanently.
            UplinkUnavailableError: the uplink was closed.
        """
        ...

    async def send(self, payloads: Sequence[tuple[str, bytes]]) -> None:
        """Send ``(channel, payload)`` pairs; return when the transport accepted all.

        Raises:
            UplinkUnavailableError: not connected, or the connection was lost or
                too slow before every payload was accepted. Some may have been
                delivered: resend all of them later (receivers drop duplicates).
            UplinkConfigError: the uplink failed permanently.
            PayloadTooLargeError: a payload exceeds ``max_payload``; nothing sent.
            ValueError: a channel key is not valid for this uplink.
        """
        ...

    def incoming(self) -> AsyncIterator[bytes]:
        """Payloads from the gateway, in arrival order, across reconnects.

        One consumer at a time. The iteration ends after :meth:`aclose` and raises
        :class:`relay.errors.UplinkConfigError` after a permanent failure.
        """
        ...

    def stats(self) -> UplinkStats:
        """Return a snapshot of the counters."""
        ...
