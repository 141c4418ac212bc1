"""A daemon and emulated glasses in this process, for the request-path tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from relay.ble.link import LinkConfig
from relay.daemon import Daemon, DaemonConfig
from relay.outbox import Outbox
from relay.sim.bed import Bed, in_process
from relay.sim.glasses import GlassesAppConfig
from relay.sim.profiles import UNSHAPED
from relay.uplink.factory import UplinkFactory


@contextlib.asynccontextmanager
async def daemon_on_bed(
    state: Path, make_uplink: UplinkFactory | None
) -> AsyncIterator[tuple[Daemon, Bed]]:
    """A daemon (not yet running) with its outbox in ``state``, and the bed.

    The glasses run no scenario: the test sends what it needs.
    """
    (state / "phone").mkdir(mode=0o700, parents=True, exist_ok=True)
    async with (
        await Outbox.open(state / "phone" / "outbox.sqlite3") as outbox,
        in_process(state, UNSHAPED, GlassesAppConfig(scenario=None)) as bed,
    ):
        daemon = Daemon(
            DaemonConfig(state_dir=state, link=LinkConfig(scan_timeout=5)),
            bed.backend,
            make_uplink,
            outbox=outbox,
        )
        yield daemon, bed
