"""The relay's error tree.

::

    RelayError
    ├── ConfigError(RelayError, ValueError)   a user's configuration or flags
    ├── LinkError                              the BLE link is lost or unavailable
    │   └── LinkTimeoutError                   glasses absent or silent too long
    └── UplinkError                            the cloud connection failed
        └── UplinkConfigError(UplinkError, ConfigError)  permanent (bad URL, CA)

A :class:`ConfigError` reaches the user as one line naming what is wrong and
how to fix it, never as a traceback.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "LinkError",
    "LinkTimeoutError",
    "RelayError",
    "UplinkConfigError",
    "UplinkError",
]


class RelayError(Exception):
    """Base of the relay's own errors."""


class ConfigError(RelayError, ValueError):
    """A configuration value, flag or file the user must fix."""


class LinkError(RelayError):
    """The BLE link is lost or cannot be established."""


class LinkTimeoutError(LinkError):
    """The glasses were not found, or went silent, within the allowed time."""


class UplinkError(RelayError):
    """The uplink to the cloud failed."""


class UplinkConfigError(UplinkError, ConfigError):
    """A permanent uplink error: malformed URL, refused credentials, bad CA file."""
