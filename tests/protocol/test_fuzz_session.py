"""100,000 random and mutated inputs into the session: fragments and handshakes."""

from __future__ import annotations

import random

from tools.fuzz import SessionTarget, mutations

INPUTS = 100_000


def test_session_receive_path_raises_nothing_but_remote_errors() -> None:
    target = SessionTarget()
    fed = 0
    for data in mutations([], INPUTS, random.Random(5)):
        target(data)  # RemoteProtocolError is caught inside; anything else fails
        fed += 1
    assert fed == INPUTS
    # The inputs really reached the handshake: sessions failed and were replaced.
    assert target.failures > 1000
