"""Events the sans-I/O layers report (docs/protocol.md §7).

Events are past-tense nouns: something that happened while feeding bytes.
Drops are events, not exceptions, so one bad fragment never stops a link.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.constants import Channel


class DropReason(enum.StrEnum):
    """Why the link layer discarded data it had received."""

    GAP = "gap"
    """Fragments were lost in between; partial records cannot complete."""
    ORPHAN = "orphan"
    """A continuation fragment with no record in progress on its channel."""
    RESTARTED = "restarted"
    """A new record began on a channel before the previous one ended."""
    OVERSIZE = "oversize"
    """The record grew past ``Limits.max_record_size``."""
    EXPIRED = "expired"
    """The record waited longer than ``Limits.max_reassembly_age``."""
    TOO_MANY_PARTIAL = "too_many_partial"
    """More partial records than ``Limits.max_partial_records``."""


@dataclass(frozen=True, slots=True)
class RecordReassembled:
    """A whole record arrived on ``channel``."""

    channel: Channel
    record: bytes
    fragments: int


@dataclass(frozen=True, slots=True)
class FragmentsLost:
    """``count`` fragments never arrived before fragment ``seq``."""

    expected: int
    seq: int
    count: int


@dataclass(frozen=True, slots=True)
class FragmentDuplicated:
    """Fragment ``seq`` arrived a second time and was dropped."""

    seq: int


@dataclass(frozen=True, slots=True)
class FragmentReordered:
    """Fragment ``seq`` came after later ones (counted lost then) and was dropped."""

    seq: int


@dataclass(frozen=True, slots=True)
class RecordDropped:
    """A partial record on ``channel`` was discarded for ``reason``."""

    channel: Channel
    reason: DropReason
    size: int


LinkEvent = (
    RecordReassembled
    | FragmentsLost
    | FragmentDuplicated
    | FragmentReordered
    | RecordDropped
)
