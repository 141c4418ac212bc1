"""``replay FILE --into-daemon``: a ``sniff --plaintext`` capture played back.

The capture is recorded once per module by ``sniff --sim --plaintext`` (the
daemon against emulated glasses playing the ``day`` scenario). Played back
as glasses into a fresh daemon, the daemon writes what it wrote then: an
empty diff with every timing. A capture with one recorded write altered in
its plaintext comment gives a non-empty diff and exit status 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from protocol.bodies import Mode
from protocol.capture import (
    CaptureWriter,
    glasses_services,
    messages_in_comment,
    plaintext_comment,
    read_capture,
    read_packets,
)
from protocol.capture.containers import (
    encode_pcapng_epb,
    encode_pcapng_idb,
    encode_pcapng_shb,
)
from protocol.capture.expect import (
    MASK,
    diff_messages,
    normalize,
    script_from_capture,
)
from protocol.constants import MessageFlags, MessageKind
from protocol.gatt import TX_CHAR_UUID
from protocol.message import Message
from tools.cli import main


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replay") / "day.pcapng"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(
            ["sniff", "--sim", "--plaintext", "--duration", "7", "--out", str(path)]
        )
    assert code == 0, err.getvalue()
    return path


def replay(path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["replay", str(path), "--into-daemon", "--json", *args])
    doc = json.loads(out.getvalue()) if out.getvalue() else {}
    return code, doc, err.getvalue()


def test_the_recording_is_a_script(recorded: Path) -> None:
    steps = script_from_capture(read_capture(recorded.read_bytes()))
    sent = [s.send.kind for s in steps if s.send is not None]
    expected = [s.expect.kind for s in steps if s.expect is not None]
    assert MessageKind.REQUEST in sent
    assert MessageKind.AUDIO_CHUNK in sent
    assert MessageKind.CLOCK_SYNC not in sent  # answered live by the glasses
    assert expected[:2] == [MessageKind.CLOCK_SYNC, MessageKind.MODE]
    assert MessageKind.RESPONSE_TEXT in expected  # a local answer (the time)


@pytest.mark.parametrize(
    "args", [["--timing", "lockstep"], ["--timing", "asap"]], ids=lambda a: a[-1]
)
def test_replay_reproduces_the_session(recorded: Path, args: list[str]) -> None:
    code, doc, err = replay(recorded, *args)
    assert code == 0, (doc, err)
    assert doc["equal"] is True
    assert doc["diff"] == []
    assert doc["expected"] == doc["observed"] >= 4
    assert doc["sent"] > 10
    assert "matches" in err


def test_faithful_timing_at_twice_the_speed(recorded: Path) -> None:
    code, doc, err = replay(recorded, "--timing", "faithful", "--speed", "2")
    assert code == 0, (doc, err)
    assert doc["diff"] == []


def altered(path: Path, out: Path) -> None:
    """Copy ``path`` with the recorded MODE write changed (display 'off')."""
    pf = read_packets(path.read_bytes())
    blocks = [encode_pcapng_shb(comment="altered"), encode_pcapng_idb(201)]
    done = False
    for packet in pf.packets:
        comment = packet.comment
        messages = messages_in_comment(comment)
        if not done and any(m.kind is MessageKind.MODE for m in messages):
            changed = [
                Message(m.kind, m.message_id, Mode("wake_word", "off", ()).encode(),
                        m.flags, m.request_id)
                if m.kind is MessageKind.MODE else m
                for m in messages
            ]  # fmt: skip
            comment = plaintext_comment(changed)
            done = True
        blocks.append(
            encode_pcapng_epb(packet.timestamp_ns // 1000, packet.data, comment=comment)
        )
    assert done
    out.write_bytes(b"".join(blocks))


def test_an_altered_write_gives_a_diff(recorded: Path, tmp_path: Path) -> None:
    changed = tmp_path / "altered.pcapng"
    altered(recorded, changed)
    code, doc, err = replay(changed, "--timing", "lockstep")
    assert code == 1, err
    assert doc["equal"] is False
    removed = [line for line in doc["diff"] if line.startswith("-MODE")]
    added = [line for line in doc["diff"] if line.startswith("+MODE")]
    assert len(removed) == len(added) == 1
    assert "d='off'" in removed[0]
    assert "d='glance'" in added[0]
    assert "differs" in err
    # Without --json the diff is what standard output carries.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["replay", str(changed), "--into-daemon", "--timing", "asap"]) == 1
    assert out.getvalue().splitlines()[:2] == ["--- recorded", "+++ daemon"]


def test_mistakes_are_one_line_and_exit_2(recorded: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.pcapng"
    w = CaptureWriter(glasses_services())
    w.connect(0x40, "C0:11:22:33:44:55", 1.0)
    w.discover(0x40, 1.01)
    w.att_notify(0x40, TX_CHAR_UUID, b"\xc0\x00" + bytes(20), 1.1)
    plain.write_bytes(w.getvalue())
    cases = [
        ([str(plain), "--into-daemon"], "no plaintext comments"),
        ([str(recorded), "--into-daemon", "--speed", "2"], "--speed is for"),
        ([str(recorded), "--into-daemon", "--connection", "7"], "--connection 7"),
        ([str(recorded), "--timing", "lockstep"], "need --into-daemon"),
        ([str(tmp_path / "missing.pcapng"), "--into-daemon"], "cannot read"),
    ]
    for args, words in cases:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            assert main(["replay", *args]) == 2, args
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1, lines
        assert words in lines[0]


def test_normalize_masks_ids_times_and_retransmission() -> None:
    from protocol.bodies import ClockSync, ResponseText

    a = Message(
        MessageKind.RESPONSE_TEXT,
        os.urandom(16),
        ResponseText(0, "It is 10:42 now.", "local").encode(),
        MessageFlags.RELIABLE | MessageFlags.FINAL,
        7,
    )
    b = Message(
        MessageKind.RESPONSE_TEXT,
        os.urandom(16),
        ResponseText(0, "It is 9:05 now.", "local").encode(),
        MessageFlags.RELIABLE | MessageFlags.FINAL | MessageFlags.RETRANSMIT,
        7,
    )
    assert normalize(a) == normalize(b)
    assert f"x='It is {MASK} now.'" in normalize(a)
    sync1 = Message(MessageKind.CLOCK_SYNC, os.urandom(16), ClockSync(1).encode())
    sync2 = Message(MessageKind.CLOCK_SYNC, os.urandom(16), ClockSync(99).encode())
    assert diff_messages([sync1, a], [sync2, b]) == []
    other = Message(a.kind, a.message_id, a.body, a.flags, 8)  # another request
    assert diff_messages([a], [other])
