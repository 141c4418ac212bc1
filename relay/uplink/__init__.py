"""Uplinks to the cloud gateway: MQTT 5 (aiomqtt) or WebSocket (aiohttp).

Both carry opaque payloads (sealed envelopes) and implement :class:`Uplink`:
``send`` returns once the transport accepted the payloads, ``incoming()`` yields
the gateway's payloads, and the connection comes back by itself after any outage.
"""

from __future__ import annotations

from relay.uplink.base import (
    BACKOFF_CAP_S,
    BACKOFF_INITIAL_S,
    CHANNEL_UP,
    Backoff,
    PayloadTooLargeError,
    Uplink,
    UplinkState,
    UplinkStats,
    UplinkUnavailableError,
)
from relay.uplink.mqtt import DEFAULT_TOPIC_PREFIX, MqttConfig, MqttUplink
from relay.uplink.url import Endpoint, parse_broker_url, parse_gateway_url
from relay.uplink.ws import WsConfig, WsUplink

__all__ = [
    "BACKOFF_CAP_S",
    "BACKOFF_INITIAL_S",
    "CHANNEL_UP",
    "DEFAULT_TOPIC_PREFIX",
    "Backoff",
    "Endpoint",
    "MqttConfig",
    "MqttUplink",
    "PayloadTooLargeError",
    "Uplink",
    "UplinkState",
    "UplinkStats",
    "UplinkUnavailableError",
    "WsConfig",
    "WsUplink",
    "parse_broker_url",
    "parse_gateway_url",
]
