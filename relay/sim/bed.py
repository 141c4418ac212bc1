"""Emulated glasses ready to use: in this process, or served over HCI/TCP.

- :func:`in_process`: glasses and the phone's radio on one virtual link in
  this event loop; yields a :class:`Bed` whose :attr:`Bed.backend` is what
  the daemon hands to bleak (``backend=`` and ``bumble_adapter=``).
- :func:`serve`: the glasses in their own process (``glasses-relay sim``):
  the phone's controller is exposed as HCI over TCP, and a daemon connects
  with :func:`connect_backend` (``tcp-client:HOST:PORT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from relay.ble.link import BackendSpec
from relay.sim.bleak_bumble import BumbleAdapter, BumbleBleakClient, BumbleBleakScanner
from relay.sim.glasses import GlassesApp, GlassesAppConfig
from relay.sim.peripheral import GlassesConfig, GlassesHciServer, GlassesPeripheral
from relay.sim.profiles import LinkProfile
from relay.sim.shaped_link import ShapedLink, make_link

__all__ = ["Bed", "connect_backend", "in_process", "serve"]


@dataclass(slots=True)
class Bed:
    """Running emulated glasses and how to reach them."""

    peripheral: GlassesPeripheral
    app: GlassesApp
    backend: BackendSpec
    task: asyncio.Task[None]
    server: GlassesHciServer | None = None


def _glasses_config(
    profile: LinkProfile, config: GlassesConfig | None
) -> GlassesConfig:
    config = config or GlassesConfig()
    if profile.shaped:
        config = dataclasses.replace(config, max_mtu=profile.att_mtu)
    return config


def backend_for(adapter: BumbleAdapter) -> BackendSpec:
    """The bleak backend that reaches glasses through ``adapter``."""
    return BackendSpec(
        BumbleBleakClient, BumbleBleakScanner, {"bumble_adapter": adapter}
    )


@contextlib.asynccontextmanager
async def in_process(
    state_dir: Path,
    profile: LinkProfile,
    app_config: GlassesAppConfig,
    glasses_config: GlassesConfig | None = None,
) -> AsyncIterator[Bed]:
    """Glasses and the phone radio in this loop; torn down on exit."""
    link = make_link(profile)
    peripheral = GlassesPeripheral(link, _glasses_config(profile, glasses_config))
    adapter = BumbleAdapter.on_link(link)
    app = GlassesApp(peripheral, state_dir, app_config)
    await peripheral.start()
    task = asyncio.create_task(app.run(), name="glasses app")
    try:
        yield Bed(peripheral, app, backend_for(adapter), task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.close()
        await adapter.close()
        await peripheral.stop()
        if isinstance(link, ShapedLink):
            link.close()


@contextlib.asynccontextmanager
async def serve(
    state_dir: Path,
    profile: LinkProfile,
    app_config: GlassesAppConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    glasses_config: GlassesConfig | None = None,
) -> AsyncIterator[Bed]:
    """Glasses served over HCI/TCP for a daemon in another process."""
    server = GlassesHciServer(
        host=host,
        port=port,
        profile=profile,
        config=_glasses_config(profile, glasses_config),
    )
    await server.start()
    assert server.glasses is not None  # noqa: S101  (set by start)
    app = GlassesApp(server.glasses, state_dir, app_config)
    task = asyncio.create_task(app.run(), name="glasses app")
    try:
        yield Bed(server.glasses, app, BackendSpec(), task, server)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.close()
        await server.close()


async def connect_backend(
    spec: str, *, attempts: int = 50
) -> tuple[BumbleAdapter, BackendSpec]:
    """Open the phone radio at ``tcp-client:HOST:PORT``, retrying while it listens.

    Raises:
        OSError: nothing listened after ``attempts`` tries (about 10 s).
    """
    delay = 0.05
    for attempt in range(attempts):
        try:
            adapter = await BumbleAdapter.open(spec)
        except OSError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 1.5)
            continue
        return adapter, backend_for(adapter)
    raise OSError(f"cannot open {spec}")  # pragma: no cover
