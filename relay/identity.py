"""The phone's identity and what it has pinned, kept in the state directory.

``<state>/phone/`` holds the phone's static X25519 key (Noise, towards the
glasses), its Ed25519 device key and X25519 envelope key (towards the cloud),
its device id, the pinned glasses keys (``glasses-<hex>``), the current
pairing code while pairing (``pairing.txt``, 0600, single use) and its
registration record for gateways (``device.json``). The gateway's record is
read from ``<state>/gateway/public.json`` unless configured explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocol.cloud import DeviceRecord, GatewayRecord
from protocol.envelope import DeviceKeys, GatewayPublicKeys
from protocol.errors import MalformedError
from protocol.pairing import PAIRING_ID_SIZE, SECRET_SIZE, PairingPayload
from protocol.session import Identity
from relay.keys import KeyStore

__all__ = ["PAIRING_FILE", "PhoneIdentity"]

_LOGGER: Final = logging.getLogger(__name__)

PAIRING_FILE: Final = "pairing.txt"
_STATIC: Final = "phone-static"
_DEVICE_SIGN: Final = "device-sign"
_DEVICE_ENC: Final = "device-enc"
_PIN_PREFIX: Final = "glasses-"
PAIRING_SECONDS: Final = 120.0


@dataclass(frozen=True, slots=True)
class GatewayKey:
    """A pinned gateway key epoch."""

    kid: int
    keys: GatewayPublicKeys


class PhoneIdentity:
    """Keys, pins and registration of this phone (created on first use)."""

    def __init__(self, state_dir: Path) -> None:
        """Load or create every key in ``<state_dir>/phone``.

        Raises:
            relay.keys.KeyStoreError: a key file is unsafe or corrupt.
        """
        self.state_dir = state_dir
        self.directory = state_dir / "phone"
        self.keys = KeyStore(self.directory)
        private, public = self.keys.load_or_create_x25519(_STATIC)
        self.static = Identity(private, public)
        sign_private, _ = self.keys.load_or_create_ed25519(_DEVICE_SIGN)
        enc_private, _ = self.keys.load_or_create_x25519(_DEVICE_ENC)
        self.device_keys = DeviceKeys(enc_private, sign_private)
        public_keys = self.device_keys.public()
        # The device id names the device key: it changes when the key does.
        self.device_id = hashlib.sha256(
            b"glasses-relay/device\x00" + public_keys.verify
        ).digest()[:16]
        self.record = DeviceRecord(
            self.device_id, public_keys.encryption, public_keys.verify
        )
        self._write_record()

    def _write_record(self) -> None:
        path = self.directory / "device.json"
        text = self.record.encode()
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8") == text:
                return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

    # -- glasses pins ------------------------------------------------------

    def pinned_glasses(self) -> frozenset[bytes]:
        """Static keys of every paired pair of glasses."""
        out = set()
        for name in self.keys.list_pins(_PIN_PREFIX):
            key = self.keys.load_public(name)
            if key is not None:
                out.add(key)
        return frozenset(out)

    def glasses_ids(self) -> dict[str, bytes]:
        """Paired glasses by id (the first 8 bytes of their key, in hex)."""
        out = {}
        for name in self.keys.list_pins(_PIN_PREFIX):
            key = self.keys.load_public(name)
            if key is not None:
                out[name.removeprefix(_PIN_PREFIX)] = key
        return out

    def pin_glasses(self, public: bytes) -> str:
        """Pin a pair of glasses; returns its id."""
        glasses_id = public[:8].hex()
        self.keys.save_public(_PIN_PREFIX + glasses_id, public)
        return glasses_id

    def forget_glasses(self, glasses_id: str) -> bool:
        """Unpin a pair of glasses; returns whether it was pinned."""
        return self.keys.delete(_PIN_PREFIX + glasses_id)

    # -- pairing -----------------------------------------------------------

    def pairing_payload(self, *, renew: bool = False) -> PairingPayload:
        """The current single-use pairing code, made (or renewed) as needed."""
        path = self.directory / PAIRING_FILE
        if not renew:
            with contextlib.suppress(OSError, UnicodeDecodeError, MalformedError):
                payload = PairingPayload.decode(path.read_text(encoding="ascii"))
                if not payload.is_expired(time.time() + 5) and (
                    payload.phone_public == self.static.public
                ):
                    return payload
        payload = PairingPayload(
            self.static.public,
            os.urandom(SECRET_SIZE),
            os.urandom(PAIRING_ID_SIZE),
            int(time.time() + PAIRING_SECONDS),
        )
        tmp = self.directory / (PAIRING_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(payload.encode())
        tmp.replace(path)
        return payload

    def end_pairing(self) -> None:
        """Destroy the pairing code (it is single use)."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / PAIRING_FILE).unlink()

    # -- the gateway -------------------------------------------------------

    def gateway_key(self, path: Path | None = None) -> GatewayKey | None:
        """The gateway's pinned key, from ``path`` or the state directory."""
        source = path or self.state_dir / "gateway" / "public.json"
        try:
            record = GatewayRecord.decode(source.read_bytes())
        except (OSError, MalformedError):
            return None
        return GatewayKey(
            record.kid, GatewayPublicKeys(record.encryption, record.verify)
        )
