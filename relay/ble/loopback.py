"""An in-memory pair of fragment links, for tests and the pipeline benchmark.

Both ends honour a maximum fragment size and a bounded queue (a write waits
while the peer's queue is full), like a paced BLE link without air time.
"""

from __future__ import annotations

import asyncio

from relay.errors import LinkError

__all__ = ["LoopbackLink", "loopback_pair"]


class LoopbackLink:
    """One end of an in-memory link (see :func:`loopback_pair`)."""

    def __init__(self, max_fragment_size: int, queue: int, name: str) -> None:
        """Use :func:`loopback_pair`."""
        self._max = max_fragment_size
        self.name = name
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue(queue)
        self.peer: LoopbackLink | None = None
        self._lost = asyncio.Event()

    @property
    def max_fragment_size(self) -> int:
        """Largest GATT value this end takes."""
        return self._max

    async def recv(self) -> bytes:
        """Next value from the peer; raises LinkError once the link is cut."""
        if self._lost.is_set() and self.inbox.empty():
            raise LinkError(f"{self.name}: link lost")
        get = asyncio.ensure_future(self.inbox.get())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({get, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not get.done():
                get.cancel()
        if get.cancelled() or not get.done():
            raise LinkError(f"{self.name}: link lost")
        return get.result()

    def recv_nowait(self) -> bytes | None:
        """A value already queued by the peer, or None."""
        try:
            return self.inbox.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def write(self, fragment: bytes) -> None:
        """Deliver one value to the peer; waits while its queue is full."""
        if self._lost.is_set() or self.peer is None:
            raise LinkError(f"{self.name}: link lost")
        if len(fragment) > self._max:
            raise LinkError(f"{self.name}: fragment exceeds {self._max} bytes")
        await self.peer.inbox.put(bytes(fragment))

    def cut(self) -> None:
        """Drop the link at both ends (what a radio loss looks like)."""
        self._lost.set()
        if self.peer is not None:
            self.peer._lost.set()


def loopback_pair(
    max_fragment_size: int = 244, queue: int = 64
) -> tuple[LoopbackLink, LoopbackLink]:
    """Return (phone end, glasses end) of a fresh in-memory link."""
    phone = LoopbackLink(max_fragment_size, queue, "phone")
    glasses = LoopbackLink(max_fragment_size, queue, "glasses")
    phone.peer, glasses.peer = glasses, phone
    return phone, glasses
