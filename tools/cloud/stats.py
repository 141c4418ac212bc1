"""The gateway's counters, kept in one object and logged at shutdown."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

__all__ = ["GatewayStats"]


@dataclass(slots=True)
class GatewayStats:
    """The gateway's counters (all since start).

    Attributes:
        opened: Uplink envelopes that opened.
        processed: New messages processed (one per id, ever).
        duplicates: Messages seen before, acknowledged again.
        refused: New messages acknowledged but not used (bad body, limits).
        acks_sent: Signed acks handed to a transport.
        acked_ids: Message ids in those acks.
        acks_unsent: Signed acks no transport could take.
        responses: Answers whose last piece went down.
        pieces_sent: Answer pieces sent (first transmissions).
        resends: Answer pieces sent again.
        downlink_acked: Answer pieces the phone acknowledged.
        downlink_dropped: Answer pieces that left the resend timer
            unacknowledged: over the per-device limit (still saved, loaded
            again from the store when there is room) or past their age.
        presence_updates: Presence changes applied.
        assistant_errors: Answers the assistant failed to give.
        drops: Uplink items dropped, by reason.
    """

    opened: int = 0
    processed: int = 0
    duplicates: int = 0
    refused: int = 0
    acks_sent: int = 0
    acked_ids: int = 0
    acks_unsent: int = 0
    responses: int = 0
    pieces_sent: int = 0
    resends: int = 0
    downlink_acked: int = 0
    downlink_dropped: int = 0
    presence_updates: int = 0
    assistant_errors: int = 0
    drops: collections.Counter[str] = field(default_factory=collections.Counter)

    def snapshot(self) -> dict[str, int]:
        """Every counter, drops as ``drop_<reason>``."""
        out = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name != "drops"
        }
        out.update({f"drop_{reason}": count for reason, count in self.drops.items()})
        return out

    def summary(self) -> str:
        """One line of ``name=value`` pairs, for the log."""
        return " ".join(f"{k}={v}" for k, v in self.snapshot().items())
