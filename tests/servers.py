"""Real servers for tests: mosquitto and redis-server on free loopback ports.

The fixtures in ``tests/conftest.py`` wrap the context managers here; test modules
may also import the classes directly (``from servers import Mosquitto``).

Every wait is bounded. A server that does not come up in time fails the test with
the tail of its log, never a hang. Process control is blocking (``subprocess``), so
the coroutine methods (:meth:`ServerProcess.start`, ``restart``, ``kill``) run it in
a worker thread and never block the event loop; the ``*_sync`` twins are for fixture
set-up and teardown, where no loop runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

if TYPE_CHECKING:
    import trustme

__all__ = [
    "LOOPBACK",
    "Mosquitto",
    "RedisServer",
    "ServerProcess",
    "TcpProxy",
    "free_port",
    "running_mosquitto",
    "running_redis",
]

LOOPBACK: Final = "127.0.0.1"
START_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 5.0
_POLL_S: Final = 0.02
_LOG_TAIL_LINES: Final = 30


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free ports (held open together while chosen)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(
                socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            )
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerProcess:
    """One server process, restartable on the same ports with the same files.

    Args:
        name: Short name for messages ("mosquitto", "redis").
        argv: The command line.
        ports: TCP ports that must accept connections before the server counts as up.
        workdir: Directory for the server's files; created if missing.
        log_file: The server's own log file, quoted when start-up fails.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        ports: Sequence[int],
        workdir: Path,
        log_file: Path,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ports = list(ports)
        self.workdir = workdir
        self.log_file = log_file
        self.stderr_file = workdir / f"{name}.stderr"
        self._proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id, or None when stopped."""
        return self._proc.pid if self.running and self._proc is not None else None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last lines of the server's log and standard error."""
        parts: list[str] = []
        for path in (self.log_file, self.stderr_file):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {path.name} (last {lines} lines) ---\n{tail}")
        return "\n".join(parts) if parts else "(no log written)"

    def _fail(self, what: str) -> AssertionError:
        return AssertionError(f"{self.name}: {what}\n{self.log_tail()}")

    def start_sync(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the process and wait until every port accepts TCP connections.

        Raises:
            AssertionError: it exited or did not listen within ``timeout`` seconds;
                the message carries the tail of its log.
        """
        if self.running:
            raise self._fail("start() while already running")
        with self.stderr_file.open("ab") as err:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        waiting = list(self.ports)
        while waiting:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise self._fail(f"exited with status {code} during start-up")
            if time.monotonic() > deadline:
                self.kill_sync()
                raise self._fail(f"port(s) {waiting} not listening after {timeout} s")
            if _accepts_tcp(waiting[0]):
                waiting.pop(0)
            else:
                time.sleep(_POLL_S)

    def stop_sync(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the process and wait for it; SIGKILL it if it takes too long.

        Raises:
            AssertionError: it ignored SIGTERM for ``timeout`` seconds (it is then
                killed, so nothing is left running).
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_sync()
                raise self._fail(
                    f"did not exit within {timeout} s of SIGTERM"
                ) from None
        self._proc = None

    def kill_sync(self) -> None:
        """SIGKILL the process and reap it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        self._proc = None

    async def start(self) -> None:
        """Start the server again on the same ports (see :meth:`start_sync`)."""
        await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        """Stop the server gracefully (see :meth:`stop_sync`)."""
        await asyncio.to_thread(self.stop_sync)

    async def restart(self) -> None:
        """SIGTERM the server, then start it again on the same ports and files."""
        await asyncio.to_thread(self._restart_sync)

    def _restart_sync(self) -> None:
        self.stop_sync()
        self.start_sync()

    async def kill(self) -> None:
        """SIGKILL the server (no clean shutdown: unsaved state is lost)."""
        await asyncio.to_thread(self.kill_sync)


class Mosquitto(ServerProcess):
    """A mosquitto broker with persistence, on a free loopback port.

    Args:
        workdir: Directory for the configuration, persistence, certificates, log.
        tls: Add a TLS listener with a server certificate from a throwaway CA.
        allow_anonymous: False refuses every client (no password file).

    Attributes:
        port: The plain MQTT listener.
        url: ``mqtt://127.0.0.1:PORT``.
        tls_port: The TLS listener, when created with ``tls=True``.
        tls_url: ``mqtts://127.0.0.1:PORT2``, when created with ``tls=True``.
        ca: The throwaway ``trustme`` CA that signed the server certificate.
        ca_file: PEM file of that CA, for clients.
    """

    def __init__(
        self, workdir: Path, *, tls: bool = False, allow_anonymous: bool = True
    ) -> None:
        ports = _free_ports(2 if tls else 1)
        self.port = ports[0]
        self.url = f"mqtt://{LOOPBACK}:{self.port}"
        self.tls_port: int | None = None
        self.tls_url: str | None = None
        self.ca: trustme.CA | None = None
        self.ca_file: Path | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        persistence = workdir / "persistence"
        persistence.mkdir(exist_ok=True)
        log_file = workdir / "mosquitto.log"
        lines = [
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "per_listener_settings false",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {persistence}/",
            "persistence_file mosquitto.db",
            "autosave_interval 60",
            "max_inflight_messages 20",
            "max_queued_messages 1000",
            "max_keepalive 120",
            f"log_dest file {log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            f"listener {self.port} {LOOPBACK}",
        ]
        if tls:
            import trustme  # only the TLS fixture needs it

            self.tls_port = ports[1]
            self.tls_url = f"mqtts://{LOOPBACK}:{self.tls_port}"
            self.ca = trustme.CA()
            server_cert = self.ca.issue_cert(LOOPBACK, "localhost")
            self.ca_file = workdir / "ca.pem"
            cert_file = workdir / "server.pem"
            key_file = workdir / "server.key"
            self.ca.cert_pem.write_to_path(str(self.ca_file))
            cert_file.write_bytes(
                b"".join(p.bytes() for p in server_cert.cert_chain_pems)
            )
            server_cert.private_key_pem.write_to_path(str(key_file))
            lines += [
                f"listener {self.tls_port} {LOOPBACK}",
                f"cafile {self.ca_file}",
                f"certfile {cert_file}",
                f"keyfile {key_file}",
            ]
        config = workdir / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        super().__init__(
            "mosquitto",
            ["/usr/sbin/mosquitto", "-c", str(config)],
            ports,
            workdir,
            log_file,
        )


class RedisServer(ServerProcess):
    """A redis-server without persistence on a free loopback port.

    Attributes:
        port: The port.
        url: ``redis://127.0.0.1:PORT``.
    """

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}"
        log_file = workdir / "redis.log"
        super().__init__(
            "redis",
            [
                "/usr/bin/redis-server",
                "--port",
                str(self.port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(workdir),
                "--logfile",
                str(log_file),
            ],
            [self.port],
            workdir,
            log_file,
        )


@contextlib.contextmanager
def running_mosquitto(workdir: Path, *, tls: bool = False) -> Iterator[Mosquitto]:
    """Run a :class:`Mosquitto` for the duration of the block, then stop it."""
    broker = Mosquitto(workdir, tls=tls)
    broker.start_sync()
    try:
        yield broker
    finally:
        try:
            broker.stop_sync()
        finally:
            broker.kill_sync()


@contextlib.contextmanager
def running_redis(workdir: Path) -> Iterator[RedisServer]:
    """Run a :class:`RedisServer` for the duration of the block, then kill it."""
    server = RedisServer(workdir)
    server.start_sync()
    try:
        yield server
    finally:
        server.kill_sync()


class TcpProxy:
    """A loopback TCP relay in front of a server whose connections can be cut.

    :meth:`cut` aborts every relayed connection at once (both sides see the
    connection die without a goodbye, as when a phone loses its network) and stops
    listening, so new connections are refused until :meth:`resume`. Use as
    ``async with TcpProxy(port) as proxy`` and connect to ``proxy.port``.
    """

    def __init__(self, target_port: int, target_host: str = LOOPBACK) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        await self.resume()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.cut()
        if self._handlers:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await asyncio.wait(self._handlers)

    async def resume(self) -> None:
        """Listen (again, on the same port) and relay new connections."""
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, LOOPBACK, self.port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and abort every relayed connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if server is not None:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await server.wait_closed()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            upstream = await self._connect_upstream()
            if upstream is None:
                return
            up_reader, up_writer = upstream
            self._writers.add(up_writer)
            self.connections += 1
            pipes = (
                asyncio.create_task(self._pipe(reader, up_writer)),
                asyncio.create_task(self._pipe(up_reader, writer)),
            )
            try:
                await asyncio.wait(pipes)
            finally:
                up_writer.transport.abort()
                self._writers.discard(up_writer)
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.wait(pipes)
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self._handlers.discard(task)

    async def _connect_upstream(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                return await asyncio.open_connection(*self.target)
        except (OSError, TimeoutError):
            return None

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Copy until EOF or error, then abort the writer so the other pipe ends too."""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
