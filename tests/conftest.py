"""Fixtures for real local servers (see ``tests/servers.py``).

- ``mosquitto``: a broker on a free loopback port (``url``, ``port``, ``start()``,
  ``restart()``, ``kill()``), persistence on in the test's ``tmp_path``.
- ``mosquitto_tls``: the same plus a TLS listener (``tls_url``, ``ca_file``, ``ca``).
- ``redis_server``: redis-server without persistence (``url``, ``port``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # pytest's default "prepend" import mode already adds it
    sys.path.insert(0, _HERE)

from servers import (  # noqa: E402
    Mosquitto,
    RedisServer,
    running_mosquitto,
    running_redis,
)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto broker, stopped at teardown."""
    with running_mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto broker with a second, TLS listener (trustme CA)."""
    with running_mosquitto(tmp_path / "mosquitto-tls", tls=True) as broker:
        yield broker


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server without persistence, killed at teardown."""
    with running_redis(tmp_path / "redis") as server:
        yield server
