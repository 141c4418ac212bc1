"""Builds the daemon's uplink once the gateway's key is known."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from protocol.cloud import Channels, pseudonym_for
from relay.identity import GatewayKey
from relay.uplink.base import Uplink
from relay.uplink.mqtt import MqttConfig, MqttUplink
from relay.uplink.ws import WsConfig, WsUplink

__all__ = ["UplinkFactory", "uplink_factory"]

UplinkFactory = Callable[[GatewayKey, Channels], Uplink]


def uplink_factory(
    kind: str,
    *,
    device_id: bytes,
    broker: str | None = None,
    gateway: str | None = None,
    ca_file: Path | None = None,
    username: str | None = None,
    password: str | None = None,
    will: Callable[[], bytes] | None = None,
) -> UplinkFactory | None:
    """A factory for ``kind`` (``mqtt``, ``ws`` or ``none``: returns None).

    ``will`` makes the sealed last-will payload (MQTT) when the uplink is built.
    """
    pseudonym = pseudonym_for(device_id)
    if kind == "none":
        return None
    if kind == "ws":
        if gateway is None:
            raise ValueError("a WebSocket uplink needs a gateway URL")
        url = gateway.rstrip("/") + f"/v1/{pseudonym}"

        def make_ws(key: GatewayKey, channels: Channels) -> Uplink:
            del key, channels
            return WsUplink(WsConfig(url=url, ca_file=ca_file))

        return make_ws
    if broker is None:
        raise ValueError("an MQTT uplink needs a broker URL")

    def make_mqtt(key: GatewayKey, channels: Channels) -> Uplink:
        del key, channels
        return MqttUplink(
            MqttConfig(
                url=broker,
                client_id=f"gr-phone-{pseudonym}",
                pseudonym=pseudonym,
                will_payload=None if will is None else will(),
                username=username,
                password=password,
                ca_file=ca_file,
            )
        )

    return make_mqtt
