"""Broker and gateway URLs: ``mqtt://``, ``mqtts://``, ``ws://``, ``wss://``.

A malformed URL is a permanent error: :class:`relay.errors.UplinkConfigError` with
one line naming the problem. Credentials never go in a URL (they would end up in
logs and process listings); they have their own configuration fields.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, urlsplit

from relay.errors import UplinkConfigError

__all__ = [
    "BROKER_SCHEMES",
    "GATEWAY_SCHEMES",
    "Endpoint",
    "parse_broker_url",
    "parse_gateway_url",
]

#: Scheme -> default port for MQTT brokers.
BROKER_SCHEMES: Final = {"mqtt": 1883, "mqtts": 8883}
#: Scheme -> default port for WebSocket gateways.
GATEWAY_SCHEMES: Final = {"ws": 80, "wss": 443}
_TLS_SCHEMES: Final = frozenset({"mqtts", "wss"})
_MAX_URL_LEN: Final = 2048


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an uplink connects.

    Attributes:
        scheme: ``mqtt``, ``mqtts``, ``ws`` or ``wss``.
        host: Host name or IP address (IPv6 without brackets).
        port: TCP port, explicit or the scheme's default.
        path: Request path and query (gateways only; ``""`` for brokers).
    """

    scheme: str
    host: str
    port: int
    path: str = ""

    @property
    def tls(self) -> bool:
        """Whether the scheme requires TLS."""
        return self.scheme in _TLS_SCHEMES

    def url(self) -> str:
        """Return the URL in canonical form (safe to log: it holds no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_broker_url(url: str) -> Endpoint:
    """Parse an MQTT broker URL such as ``mqtts://broker.example:8883``.

    Args:
        url: ``mqtt://HOST[:PORT]`` (default port 1883) or ``mqtts://HOST[:PORT]``
            (8883). No path, query, fragment or credentials.

    Returns:
        The endpoint.

    Raises:
        UplinkConfigError: the URL is malformed or uses another scheme.
    """
    parts = _split("broker", url, BROKER_SCHEMES)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UplinkConfigError(
            f"broker URL {_shown(url)} must not have a path, query or fragment"
        )
    host, port = _host_port("broker", url, parts, BROKER_SCHEMES[parts.scheme])
    return Endpoint(parts.scheme, host, port)


def parse_gateway_url(url: str) -> Endpoint:
    """Parse a WebSocket gateway URL such as ``wss://gw.example/v1/uplink``.

    Args:
        url: ``ws://HOST[:PORT][/PATH][?QUERY]`` (default port 80) or ``wss://``
            (443). No fragment or credentials.

    Returns:
        The endpoint; ``path`` is ``/`` when the URL has none.

    Raises:
        UplinkConfigError: the URL is malformed or uses another scheme.
    """
    parts = _split("gateway", url, GATEWAY_SCHEMES)
    if parts.fragment:
        raise UplinkConfigError(f"gateway URL {_shown(url)} must not have a fragment")
    host, port = _host_port("gateway", url, parts, GATEWAY_SCHEMES[parts.scheme])
    path = parts.path or "/"
    if not path.startswith("/"):
        raise UplinkConfigError(f"gateway URL {_shown(url)} has a malformed path")
    if parts.query:
        path = f"{path}?{parts.query}"
    return Endpoint(parts.scheme, host, port, path)


def _shown(url: str) -> str:
    """The URL for an error message: shortened, printable, credentials removed."""
    text = url if len(url) <= 80 else url[:77] + "..."
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        text = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return repr(text)


def _split(kind: str, url: str, schemes: dict[str, int]) -> SplitResult:
    expected = " or ".join(f"{s}://" for s in schemes)
    if not url:
        raise UplinkConfigError(f"{kind} URL is empty; expected {expected}HOST[:PORT]")
    if len(url) > _MAX_URL_LEN:
        raise UplinkConfigError(f"{kind} URL is longer than {_MAX_URL_LEN} characters")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise UplinkConfigError(
            f"{kind} URL {_shown(url)} contains spaces or control characters"
        )
    if "://" not in url:
        raise UplinkConfigError(
            f"{kind} URL {_shown(url)} has no scheme; use {expected}"
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise UplinkConfigError(
            f"{kind} URL {_shown(url)} is malformed: {exc}"
        ) from exc
    if parts.scheme not in schemes:
        raise UplinkConfigError(
            f"{kind} URL {_shown(url)} has scheme {parts.scheme!r}; use {expected}"
        )
    if "@" in parts.netloc:
        raise UplinkConfigError(
            f"{kind} URL {_shown(url)} contains credentials; "
            "set username/password in the configuration instead"
        )
    return parts


def _host_port(
    kind: str, url: str, parts: SplitResult, default_port: int
) -> tuple[str, int]:
    host = parts.hostname
    if not host:
        raise UplinkConfigError(f"{kind} URL {_shown(url)} has no host")
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise UplinkConfigError(
                f"{kind} URL {_shown(url)} has a malformed IPv6 address"
            ) from exc
    elif not all(label and _is_host_label(label) for label in host.split(".")):
        raise UplinkConfigError(
            f"{kind} URL {_shown(url)} has a malformed host {host!r}"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise UplinkConfigError(
            f"{kind} URL {_shown(url)} has a malformed port (expected 1-65535)"
        ) from exc
    if port is None:
        if parts.netloc.endswith(":"):
            raise UplinkConfigError(f"{kind} URL {_shown(url)} has an empty port")
        return host, default_port
    if port == 0:
        raise UplinkConfigError(
            f"{kind} URL {_shown(url)} has port 0 (expected 1-65535)"
        )
    return host, port


def _is_host_label(label: str) -> bool:
    return (
        len(label) <= 63
        and label.isascii()
        and all(c.isalnum() or c in "-_" for c in label)
        and not label.startswith("-")
        and not label.endswith("-")
    )
