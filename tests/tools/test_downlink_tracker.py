"""The gateway's tracker of unacknowledged answer pieces (sans-I/O)."""

from __future__ import annotations

from tools.cloud.downlink import DownlinkTracker


def tracker(max_per_device: int = 4) -> DownlinkTracker:
    return DownlinkTracker(
        initial_s=1.0, cap_s=8.0, ttl_s=100.0, max_per_device=max_per_device
    )


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_over_the_limit_the_oldest_leaves_and_the_device_is_marked() -> None:
    t = tracker()
    for n in range(4):
        t.track("dev", mid(n), b"env", now=0.0)
    assert t.evicted == set()
    t.track("dev", mid(4), b"env", now=0.0)
    assert t.pending("dev") == [mid(1), mid(2), mid(3), mid(4)]
    assert t.count("dev") == 4
    assert t.dropped_overflow == 1
    assert t.evicted == {"dev"}  # its owner must load the dropped piece again
    t.track("other", mid(9), b"env", now=0.0)
    assert t.evicted == {"dev"}


def test_acked_pieces_leave_and_are_not_resent() -> None:
    t = tracker()
    for n in range(3):
        t.track("dev", mid(n), b"env%d" % n, now=0.0)
    assert t.acked("dev", [mid(0), mid(7)]) == 1
    due = t.take_due(10.0)  # due times are jittered: compare as a set
    assert {m for m, _ in due["dev"]} == {mid(1), mid(2)}
    assert t.count("dev") == 2
