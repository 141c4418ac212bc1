"""The state directory: where every component keeps keys, pins, outbox, sockets.

Resolved once, in this order: the ``--state-dir`` flag, the
``GLASSES_RELAY_STATE_DIR`` environment variable, platformdirs' user state
directory for ``glasses-relay``. Created with mode 0700.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

import platformdirs

from relay.errors import ConfigError

__all__ = ["ENV_STATE_DIR", "ensure_state_dir", "resolve_state_dir"]

ENV_STATE_DIR: Final = "GLASSES_RELAY_STATE_DIR"
APP_NAME: Final = "glasses-relay"


def resolve_state_dir(flag: str | None, environ: dict[str, str] | None = None) -> Path:
    """Return the state directory the flag, environment or platform names."""
    env = os.environ if environ is None else environ
    if flag:
        return Path(flag).expanduser()
    if value := env.get(ENV_STATE_DIR):
        return Path(value).expanduser()
    return Path(platformdirs.user_state_dir(APP_NAME))


def ensure_state_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 if missing; refuse one others can enter.

    Raises:
        ConfigError: it is not a directory, or group/other have access.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise ConfigError(
            f"state directory {path} cannot be created: {exc.strerror}; "
            "choose another with --state-dir"
        ) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"state directory {path} is not a directory")
    if info.st_mode & 0o077:
        raise ConfigError(
            f"state directory {path} is open to other users "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); fix it with: chmod 700 {path}"
        )
    return path
