"""The emulated phone's H4 framer against bumble's own parser."""

from __future__ import annotations

import itertools

import pytest
from bumble import core
from bumble.transport.common import PacketParser
from hypothesis import given
from hypothesis import strategies as st

from relay.sim.controller_fixes import H4Framer


class Collect:
    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def on_packet(self, packet: bytes) -> None:
        self.packets.append(bytes(packet))


def _packet(kind: int, body: bytes, selector: int) -> bytes:
    """One H4 packet of ``kind`` (``selector``: its opcode, handle or event code)."""
    head = selector.to_bytes(2, "little")
    if kind in (0x02, 0x05):  # ACL or ISO: handle, u16 length
        return bytes([kind]) + head + len(body).to_bytes(2, "little") + body
    if kind in (0x01, 0x03):  # command (opcode) or SCO (handle): u8 length
        return bytes([kind]) + head + bytes([len(body)]) + body
    return bytes([kind, selector & 0xFF, len(body)]) + body  # event


packets = st.lists(
    st.builds(
        _packet,
        st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05]),
        st.binary(max_size=255),
        st.integers(0, 0x0FFF),
    ),
    max_size=12,
)


@given(packets, st.lists(st.integers(0, 4000), max_size=8))
def test_framer_cuts_any_chunking_like_bumble(
    sent: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(sent)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    ours, theirs = Collect(), Collect()
    framer, parser = H4Framer(ours), PacketParser(theirs)
    for chunk in chunks:
        framer.feed(chunk)
        parser.feed_data(chunk)
    assert ours.packets == theirs.packets == sent


def test_a_packet_split_byte_by_byte_comes_out_once_whole() -> None:
    packet = _packet(0x02, bytes(range(251)), 0x0040)
    out = Collect()
    framer = H4Framer(out)
    for i in range(len(packet)):
        framer.feed(packet[i : i + 1])
        assert out.packets == ([] if i < len(packet) - 1 else [packet])


def test_an_unknown_type_raises_and_the_framer_starts_over() -> None:
    out = Collect()
    framer = H4Framer(out)
    good = _packet(0x04, b"\x01\x02", 0x0E)
    with pytest.raises(core.InvalidPacketError, match="unknown H4 packet type 9"):
        framer.feed(good + b"\x09junk")
    assert out.packets == [good]  # what came before the bad byte is delivered
    framer.feed(good[:3])
    framer.feed(good[3:])
    assert out.packets == [good, good]  # nothing of the bad chunk was kept
