"""The gateway's own keys, created on first start (docs/cloud.md "Registration").

Key epoch 1: an X25519 key (uplinks are sealed to it) and an Ed25519 key
(acks and downlinks are signed with it), kept by :class:`relay.keys.KeyStore`
in ``<state>/gateway/`` (0700 directory, 0600 files, exclusive creation, so
several gateways started at once on one state directory end up with the same
keys). The public half is written to ``<state>/gateway/public.json``
(:class:`protocol.cloud.GatewayRecord`), atomically, for the phone to pin.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Final

from protocol.cloud import GatewayRecord
from protocol.envelope import GatewayKeys
from relay.errors import ConfigError
from relay.keys import KeyStore, KeyStoreError

__all__ = ["KID", "PUBLIC_RECORD", "load_gateway_keys", "write_public_record"]

logger = logging.getLogger(__name__)

KID: Final = 1
"""The key epoch this gateway signs with and accepts."""
PUBLIC_RECORD: Final = "public.json"
_KEY_NAME: Final = f"cloud-kid{KID}"
_RECORD_MODE: Final = 0o644


def load_gateway_keys(gateway_dir: Path) -> GatewayKeys:
    """Load the gateway's keys of epoch :data:`KID`, creating them if missing.

    Blocking (file I/O): call it from a worker thread.

    Raises:
        ConfigError: the key files or their directory are unusable (the
            message names the file and the fix).
    """
    try:
        store = KeyStore(gateway_dir)
        encryption, _ = store.load_or_create_x25519(_KEY_NAME)
        signing, _ = store.load_or_create_ed25519(_KEY_NAME)
    except KeyStoreError as exc:
        raise ConfigError(str(exc)) from exc
    return GatewayKeys(encryption, signing)


def write_public_record(gateway_dir: Path, keys: GatewayKeys) -> Path:
    """Write ``public.json`` for ``keys`` unless it already says the same.

    Atomic: a temporary file, fsynced, renamed over the old one. Blocking.

    Returns:
        The record's path.

    Raises:
        ConfigError: it cannot be written.
    """
    public = keys.public()
    text = GatewayRecord(KID, public.encryption, public.verify).encode() + "\n"
    path = gateway_dir / PUBLIC_RECORD
    try:
        if path.read_text() == text:
            return path
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    tmp = gateway_dir / f".{PUBLIC_RECORD}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _RECORD_MODE)
        try:
            os.fchmod(fd, _RECORD_MODE)
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    logger.info("wrote the gateway's public keys to %s", path)
    return path
