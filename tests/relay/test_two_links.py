"""A device profile with two links (one per arm, as some glasses have)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from protocol.bodies import Telemetry
from protocol.constants import MessageFlags, MessageKind
from protocol.message import Message
from relay.ble.link import LinkConfig
from relay.ble.manager import LinkState
from relay.daemon import Daemon, DaemonConfig
from relay.identity import PhoneIdentity
from relay.outbox import Outbox
from relay.sim.bed import backend_for
from relay.sim.bleak_bumble import BumbleAdapter
from relay.sim.glasses import PHONE_PIN, GlassesApp, GlassesAppConfig
from relay.sim.peripheral import GlassesConfig, GlassesPeripheral
from relay.sim.profiles import UNSHAPED
from relay.sim.shaped_link import make_link

ARMS = {"L": "F0:F0:F0:F0:F0:01", "R": "F0:F0:F0:F0:F0:02"}


async def test_both_arms_connect_and_each_is_acknowledged_on_its_own_link(
    tmp_path: Path,
) -> None:
    phone_state = tmp_path / "phone-state"
    phone_state.mkdir(mode=0o700)
    identity = PhoneIdentity(phone_state)
    link = make_link(UNSHAPED)
    adapter = BumbleAdapter.on_link(link)
    apps: dict[str, GlassesApp] = {}
    async with contextlib.AsyncExitStack() as stack:
        tasks = []
        for arm, address in ARMS.items():
            peripheral = GlassesPeripheral(
                link, GlassesConfig(name=f"GR-Glasses-{arm}", address=address)
            )
            await peripheral.start()
            stack.push_async_callback(peripheral.stop)
            arm_state = tmp_path / f"arm-{arm}"
            arm_state.mkdir(mode=0o700)
            app = GlassesApp(peripheral, arm_state, GlassesAppConfig(scenario=None))
            # Paired before (each arm has its own key; both trust the phone).
            app._keys.save_public(PHONE_PIN, identity.static.public)
            identity.pin_glasses(app.identity.public)
            apps[arm] = app
            tasks.append(asyncio.create_task(app.run()))
        stack.push_async_callback(adapter.close)
        (phone_state / "phone").mkdir(exist_ok=True)
        outbox = await Outbox.open(phone_state / "phone" / "outbox.sqlite3")
        stack.push_async_callback(outbox.close)
        config = DaemonConfig(
            state_dir=phone_state,
            links=tuple(LinkConfig(address=a, scan_timeout=5) for a in ARMS.values()),
        )
        daemon = Daemon(config, backend_for(adapter), None, outbox=outbox)
        daemon_task = asyncio.create_task(daemon.run())
        try:
            async with asyncio.timeout(30):
                for app in apps.values():
                    await app._established.wait()
                for manager in daemon.links:
                    await manager.connected.wait()
                assert all(m.state is LinkState.CONNECTED for m in daemon.links)
                for arm, app in apps.items():
                    body = Telemetry(50 if arm == "L" else 60, False, 1).encode()
                    await app._send(
                        Message(
                            MessageKind.TELEMETRY,
                            os.urandom(16),
                            body,
                            MessageFlags.RELIABLE,
                        )
                    )
                for _ in range(300):
                    if all(
                        a.delivery.sender.stats.messages == 0 for a in apps.values()
                    ):
                        break
                    await asyncio.sleep(0.05)
                assert all(a.stats.messages_acked == 1 for a in apps.values())
                assert daemon.stats.messages_in >= 2
                assert (await outbox.stats()).rows == 2
                assert len(daemon.status()["links"]) == 2  # type: ignore[arg-type]
        finally:
            daemon_task.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(daemon_task, *tasks, return_exceptions=True)
            await daemon.close()
