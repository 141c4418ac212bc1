"""The glasses' GATT service: the identifiers both ends agree on (docs/protocol.md §2).

The glasses notify fragments on TX and take fragments on RX as write
without response. UUIDs are 128-bit, lower-case, as bleak normalises them.
"""

from __future__ import annotations

from typing import Final

__all__ = ["NAME_PREFIX", "RX_CHAR_UUID", "SERVICE_UUID", "TX_CHAR_UUID"]

SERVICE_UUID: Final = "7a3e5c10-94d2-4b8e-9f2a-3d6c8b1e4f70"
"""The glasses-relay service, advertised by the glasses."""
TX_CHAR_UUID: Final = "7a3e5c11-94d2-4b8e-9f2a-3d6c8b1e4f70"
"""Glasses to phone: NOTIFY (and READ)."""
RX_CHAR_UUID: Final = "7a3e5c12-94d2-4b8e-9f2a-3d6c8b1e4f70"
"""Phone to glasses: WRITE WITHOUT RESPONSE (and WRITE)."""
NAME_PREFIX: Final = "GR-Glasses"
"""Advertised local names start with this."""
