"""Long-lived keys on disk, and process hardening (SECURITY.md §1 "Key storage").

The phone's static X25519 key (Noise), its Ed25519 device key (cloud
signatures) and the pinned public keys of paired glasses live in one state
directory, OpenSSH-style:

* the directory is ``0700`` (created so; refused if group or others have any
  access, or if another user owns it);
* every file is ``0600``, written to a temporary file opened with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``, fsynced, moved into place atomically
  (``os.replace`` for updates, ``link`` for create-if-absent) and followed by
  a directory fsync;
* a file is loaded only if it is a regular file (``O_NOFOLLOW``: never a
  symlink), ``st_uid == geteuid()`` and ``mode & 0o077 == 0``; otherwise
  :class:`KeyFilePermissionError` names the file and the command that fixes it.

Every operation goes through a descriptor of the checked directory
(``dir_fd``), so a directory swapped after the check is not followed. File
modes are set explicitly (``fchmod``), whatever the umask;
:func:`harden_process` also sets umask ``077`` for the rest of the process.
Temporary files left by a crash are removed when a :class:`KeyStore` opens.

Files hold raw 32-byte keys. Where an OS keystore exists (Android Keystore,
iOS Keychain, Secret Service through ``keyring``) the design wraps them with a
non-exportable keystore key: pass a :class:`KeyWrapper` that does so. None is
bundled (``keyring`` is not a dependency: on headless Linux and Termux it only
offers the failing backend), so here the files themselves are the protection.

Error messages and logs carry paths, modes, uids and short public-key
fingerprints, never key bytes.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import shlex
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = [
    "KEY_SIZE",
    "KeyFileCorruptError",
    "KeyFilePermissionError",
    "KeyKind",
    "KeyStore",
    "KeyStoreError",
    "KeyWrapper",
    "ProcessHardening",
    "harden_process",
]

logger = logging.getLogger(__name__)

KEY_SIZE: Final = 32
"""Bytes in every key this store holds (X25519 and Ed25519, private or public)."""
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
MAX_FILE_SIZE: Final = 4096
"""Larger files are refused unread (a raw key is 32 bytes, a wrapped one a few more)."""

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_PREFIX: Final = re.compile(r"[A-Za-z0-9_-]{0,64}")
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS: Final = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
_TMP_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
_DIR_FLAGS: Final = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
_SYMLINK_ERRNOS: Final = frozenset({errno.ELOOP, errno.EMLINK})
_NO_LINK_ERRNOS: Final = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
)
_CREATE_ATTEMPTS: Final = 3
_TMP_SUFFIX: Final = ".tmp"
STALE_TMP_AGE: Final = 300.0
"""Seconds after which a leftover temporary file is a crash's, and removed."""
_PR_SET_DUMPABLE: Final = 4


class KeyStoreError(Exception):
    """A key could not be stored or loaded; the message says which file."""


class KeyFilePermissionError(KeyStoreError):
    """A key file or the state directory is not private to us, or a symlink.

    The message names the path and the command that fixes it; the file is
    not read.
    """


class KeyFileCorruptError(KeyStoreError):
    """A key file exists but does not hold a valid key."""


class KeyKind(enum.StrEnum):
    """What a stored file holds; also its file-name suffix."""

    X25519 = "x25519"
    """A private X25519 key (Noise static)."""
    ED25519 = "ed25519"
    """A private Ed25519 key (signing)."""
    PUBLIC = "pub"
    """A pinned peer public key."""


class KeyWrapper(Protocol):
    """Seals private-key files under a key that never leaves an OS keystore.

    The seam for Android Keystore / iOS Keychain / ``keyring``: an
    implementation encrypts with a non-exportable keystore key (an AEAD, with
    ``label`` as associated data so a file cannot be moved to another name).
    Pinned public keys are not wrapped.
    """

    def wrap(self, label: str, secret: bytes) -> bytes:
        """Return the sealed form of ``secret`` for the file named ``label``."""
        ...

    def unwrap(self, label: str, blob: bytes) -> bytes:
        """Return the secret sealed in ``blob``.

        Raises:
            KeyStoreError: ``blob`` does not open under the keystore key.
        """
        ...


def _fingerprint(public: bytes) -> str:
    """A short, loggable public-key fingerprint."""
    return hashlib.sha256(public).hexdigest()[:16]


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(
            "key names are 1-64 characters of letters, digits, '_' and '-', "
            "starting with a letter or digit"
        )


def _fix(command: str, path: Path) -> str:
    return f"{command} {shlex.quote(str(path))}"


def _check_private(path: Path, st: os.stat_result, *, what: str) -> None:
    """Refuse a file or directory another user owns or may access."""
    euid = os.geteuid()
    if st.st_uid != euid:
        raise KeyFilePermissionError(
            f"{what} {path} is owned by uid {st.st_uid}, not {euid}; fix: "
            f"{_fix(f'chown {euid}', path)} (or delete it)"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        wanted = "700" if what == "state directory" else "600"
        raise KeyFilePermissionError(
            f"{what} {path} has mode {mode:04o}, open to group/others; fix: "
            f"{_fix(f'chmod {wanted}', path)}"
        )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _generate_x25519() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def _generate_ed25519() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes_raw()


def _public_x25519(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _public_ed25519(private: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


_GENERATORS: Final[dict[KeyKind, Callable[[], bytes]]] = {
    KeyKind.X25519: _generate_x25519,
    KeyKind.ED25519: _generate_ed25519,
}
_PUBLIC_OF: Final[dict[KeyKind, Callable[[bytes], bytes]]] = {
    KeyKind.X25519: _public_x25519,
    KeyKind.ED25519: _public_ed25519,
}


class KeyStore:
    """Private keys and pinned public keys in one private state directory.

    Safe to use from several threads or processes at once: creation is
    create-if-absent (the loser of a race loads the winner's key) and updates
    are atomic replacements. POSIX only (``dir_fd``, ``O_NOFOLLOW``).
    """

    __slots__ = ("_path", "_wrapper")

    def __init__(
        self, directory: str | os.PathLike[str], *, wrapper: KeyWrapper | None = None
    ) -> None:
        """Open the state directory, creating it ``0700`` if missing.

        Args:
            directory: The state directory (app-private storage, outside
                cloud backups).
            wrapper: Optional keystore wrapping of private-key files.

        Raises:
            KeyFilePermissionError: the directory exists but another user owns
                it or group/others have access; it is not changed.
            KeyStoreError: it cannot be created or opened.
        """
        self._path = Path(directory)
        self._wrapper = wrapper
        try:
            self._path.mkdir(mode=DIR_MODE, parents=True)
        except FileExistsError:
            pass
        except OSError as exc:
            raise KeyStoreError(
                f"cannot create state directory {self._path}: {exc.strerror}"
            ) from exc
        else:
            self._path.chmod(DIR_MODE)  # whatever the umask took away or left
            logger.info("created key directory %s", self._path)
        with self._directory() as dfd:
            self._remove_stale_tmp(dfd)

    @property
    def directory(self) -> Path:
        """The state directory."""
        return self._path

    # -- private keys ----------------------------------------------------------

    def load_or_create_x25519(self, name: str) -> tuple[bytes, bytes]:
        """Return the X25519 key pair ``name``, creating it on first use.

        Returns:
            ``(private, public)``, 32 raw bytes each. Keep the private bytes
            only as long as needed (``bytes`` cannot be wiped).

        Raises:
            ValueError: ``name`` is not a valid key name.
            KeyFilePermissionError: the file is a symlink, not a regular file,
                owned by another user or open to group/others.
            KeyFileCorruptError: the file does not hold a valid key.
            KeyStoreError: it cannot be read or written.
        """
        return self._load_or_create(name, KeyKind.X25519)

    def load_or_create_ed25519(self, name: str) -> tuple[bytes, bytes]:
        """Return the Ed25519 key pair ``name``, creating it on first use.

        Returns:
            ``(private, public)``: the 32-byte seed and the 32-byte public key.

        Raises:
            ValueError: ``name`` is not a valid key name.
            KeyFilePermissionError: see :meth:`load_or_create_x25519`.
            KeyFileCorruptError: the file does not hold a valid key.
            KeyStoreError: it cannot be read or written.
        """
        return self._load_or_create(name, KeyKind.ED25519)

    def _load_or_create(self, name: str, kind: KeyKind) -> tuple[bytes, bytes]:
        _check_name(name)
        filename = f"{name}.{kind}"
        with self._directory() as dfd:
            for _ in range(_CREATE_ATTEMPTS):
                blob = self._read(dfd, filename)
                if blob is not None:
                    return self._key_pair(filename, kind, self._unwrap(filename, blob))
                private = _GENERATORS[kind]()
                if self._create(dfd, filename, self._wrap(filename, private)):
                    public = _PUBLIC_OF[kind](private)
                    logger.info(
                        "created %s key %s (fingerprint %s)",
                        kind,
                        self._path / filename,
                        _fingerprint(public),
                    )
                    return private, public
                logger.debug("lost the race to create %s; loading it", filename)
        raise KeyStoreError(
            f"key file {self._path / filename} keeps disappearing while created; "
            "check for another process deleting it"
        )

    def _key_pair(
        self, filename: str, kind: KeyKind, private: bytes
    ) -> tuple[bytes, bytes]:
        if len(private) != KEY_SIZE:
            path = self._path / filename
            raise KeyFileCorruptError(
                f"key file {path} holds {len(private)} bytes, not {KEY_SIZE}; fix: "
                f"restore it from a backup or {_fix('rm', path)} to make a new key "
                "(peers must pair again)"
            )
        return private, _PUBLIC_OF[kind](private)

    def _wrap(self, filename: str, secret: bytes) -> bytes:
        return secret if self._wrapper is None else self._wrapper.wrap(filename, secret)

    def _unwrap(self, filename: str, blob: bytes) -> bytes:
        return blob if self._wrapper is None else self._wrapper.unwrap(filename, blob)

    # -- pinned public keys ----------------------------------------------------

    def save_public(self, name: str, public: bytes) -> None:
        """Pin a peer's 32-byte public key as ``name``, replacing any old pin.

        Raises:
            ValueError: bad ``name``, or ``public`` is not 32 bytes.
            KeyStoreError: it cannot be written.
        """
        _check_name(name)
        if len(public) != KEY_SIZE:
            raise ValueError(f"a public key is {KEY_SIZE} bytes")
        filename = f"{name}.{KeyKind.PUBLIC}"
        with self._directory() as dfd:
            self._replace(dfd, filename, bytes(public))
        logger.info("pinned %s (fingerprint %s)", name, _fingerprint(public))

    def load_public(self, name: str) -> bytes | None:
        """Return the pinned public key ``name``, or ``None`` if not pinned.

        Raises:
            ValueError: bad ``name``.
            KeyFilePermissionError: see :meth:`load_or_create_x25519`.
            KeyFileCorruptError: the file is not 32 bytes.
            KeyStoreError: it cannot be read.
        """
        _check_name(name)
        filename = f"{name}.{KeyKind.PUBLIC}"
        with self._directory() as dfd:
            public = self._read(dfd, filename)
        if public is not None and len(public) != KEY_SIZE:
            path = self._path / filename
            raise KeyFileCorruptError(
                f"pin file {path} holds {len(public)} bytes, not {KEY_SIZE}; fix: "
                f"{_fix('rm', path)} and pair again"
            )
        return public

    def matches_pin(self, name: str, public: bytes) -> bool:
        """Return whether ``public`` equals the pin ``name`` (constant time).

        Raises:
            ValueError, KeyStoreError: as :meth:`load_public`.
        """
        pinned = self.load_public(name)
        return pinned is not None and hmac.compare_digest(pinned, public)

    def list_pins(self, prefix: str = "") -> list[str]:
        """Return the names of pinned keys starting with ``prefix``, sorted.

        Raises:
            ValueError: ``prefix`` has characters no name can have.
            KeyStoreError: the directory cannot be read.
        """
        if not _PREFIX.fullmatch(prefix):
            raise ValueError("a prefix holds letters, digits, '_' and '-' only")
        suffix = f".{KeyKind.PUBLIC}"
        with self._directory() as dfd:
            entries = self._listdir(dfd)
        names = (e.removesuffix(suffix) for e in entries if e.endswith(suffix))
        return sorted(n for n in names if n.startswith(prefix) and _NAME.fullmatch(n))

    # -- removal ---------------------------------------------------------------

    def delete(self, name: str, kind: KeyKind | None = None) -> bool:
        """Delete key ``name`` of ``kind`` (every kind if ``None``).

        The bytes may survive on flash; rely on storage encryption for that.

        Returns:
            Whether anything was deleted.

        Raises:
            ValueError: bad ``name``.
            KeyStoreError: a file cannot be removed.
        """
        _check_name(name)
        kinds = list(KeyKind) if kind is None else [kind]
        removed = False
        with self._directory() as dfd:
            for each in kinds:
                filename = f"{name}.{each}"
                try:
                    os.unlink(filename, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise KeyStoreError(
                        f"cannot delete key file {self._path / filename}: "
                        f"{exc.strerror}"
                    ) from exc
                removed = True
                logger.info("deleted key file %s", self._path / filename)
            if removed:
                self._sync(dfd)
        return removed

    # -- file primitives, all relative to a checked directory descriptor ------

    @contextmanager
    def _directory(self) -> Iterator[int]:
        try:
            dfd = os.open(self._path, _DIR_FLAGS)
        except OSError as exc:
            raise KeyStoreError(
                f"cannot open state directory {self._path}: {exc.strerror}"
            ) from exc
        try:
            st = os.fstat(dfd)
            if not stat.S_ISDIR(st.st_mode):
                raise KeyStoreError(f"state directory {self._path} is not a directory")
            _check_private(self._path, st, what="state directory")
            yield dfd
        finally:
            os.close(dfd)

    def _read(self, dfd: int, filename: str) -> bytes | None:
        path = self._path / filename
        try:
            fd = os.open(filename, _READ_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in _SYMLINK_ERRNOS:
                raise KeyFilePermissionError(
                    f"key file {path} is a symlink, refused; fix: replace it with "
                    f"the real file or {_fix('rm', path)}"
                ) from exc
            raise KeyStoreError(f"cannot open key file {path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFilePermissionError(
                    f"key file {path} is not a regular file; fix: {_fix('rm', path)}"
                )
            _check_private(path, st, what="key file")
            if st.st_size > MAX_FILE_SIZE:
                raise KeyFileCorruptError(
                    f"key file {path} is {st.st_size} bytes, too large for a key; "
                    f"fix: {_fix('rm', path)} or restore it"
                )
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, MAX_FILE_SIZE + 1 - size):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_FILE_SIZE:
                    raise KeyFileCorruptError(f"key file {path} grew while read")
            return b"".join(chunks)
        except OSError as exc:
            raise KeyStoreError(f"cannot read key file {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _write_tmp(self, dfd: int, filename: str, data: bytes) -> str:
        """Write ``data`` to a new fsynced ``0600`` temporary file; return its name."""
        tmp = f".{filename}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, _TMP_FLAGS, FILE_MODE, dir_fd=dfd)
        except OSError as exc:
            raise KeyStoreError(
                f"cannot create a file in {self._path}: {exc.strerror}"
            ) from exc
        try:
            os.fchmod(fd, FILE_MODE)
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self._discard(dfd, tmp)
            raise KeyStoreError(
                f"cannot write key file {self._path / filename}: {exc.strerror}"
            ) from exc
        os.close(fd)
        return tmp

    def _create(self, dfd: int, filename: str, data: bytes) -> bool:
        """Create ``filename`` holding ``data`` unless it exists; atomic.

        Returns:
            False if the file already existed (another creator won).
        """
        tmp = self._write_tmp(dfd, filename, data)
        try:
            os.link(
                tmp, filename, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False
            )
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise KeyStoreError(
                    f"cannot create key file {self._path / filename}: {exc.strerror}"
                ) from exc
            return self._create_exclusive(dfd, filename, data)
        finally:
            self._discard(dfd, tmp)
            self._sync(dfd)
        return True

    def _create_exclusive(self, dfd: int, filename: str, data: bytes) -> bool:
        """Fallback where hard links are refused: ``O_EXCL`` on the final name.

        Not atomic for readers: one racing this may see a short file.
        """
        path = self._path / filename
        try:
            fd = os.open(filename, _TMP_FLAGS, FILE_MODE, dir_fd=dfd)
        except FileExistsError:
            return False
        except OSError as exc:
            raise KeyStoreError(
                f"cannot create key file {path}: {exc.strerror}"
            ) from exc
        try:
            os.fchmod(fd, FILE_MODE)
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self._discard(dfd, filename)
            raise KeyStoreError(
                f"cannot write key file {path}: {exc.strerror}"
            ) from exc
        os.close(fd)
        return True

    def _replace(self, dfd: int, filename: str, data: bytes) -> None:
        tmp = self._write_tmp(dfd, filename, data)
        try:
            os.replace(tmp, filename, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            self._discard(dfd, tmp)
            raise KeyStoreError(
                f"cannot replace key file {self._path / filename}: {exc.strerror}"
            ) from exc
        self._sync(dfd)

    def _listdir(self, dfd: int) -> list[str]:
        try:
            return os.listdir(dfd)
        except OSError as exc:
            raise KeyStoreError(
                f"cannot list state directory {self._path}: {exc.strerror}"
            ) from exc

    def _remove_stale_tmp(self, dfd: int) -> None:
        """Delete temporary files a crashed writer left (they may hold keys)."""
        cutoff = time.time() - STALE_TMP_AGE
        removed = 0
        for entry in self._listdir(dfd):
            if not (entry.startswith(".") and entry.endswith(_TMP_SUFFIX)):
                continue
            try:
                st = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
                if st.st_mtime < cutoff:
                    os.unlink(entry, dir_fd=dfd)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning(
                    "cannot remove stale file %s: %s", self._path / entry, exc.strerror
                )
        if removed:
            logger.info("removed %d stale temporary files in %s", removed, self._path)
            self._sync(dfd)

    def _discard(self, dfd: int, filename: str) -> None:
        with suppress(FileNotFoundError):
            os.unlink(filename, dir_fd=dfd)

    def _sync(self, dfd: int) -> None:
        try:
            os.fsync(dfd)
        except OSError as exc:
            raise KeyStoreError(
                f"cannot sync state directory {self._path}: {exc.strerror}"
            ) from exc

    def __repr__(self) -> str:
        """The directory only."""
        return f"KeyStore({str(self._path)!r})"


# -- process hardening ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessHardening:
    """What :func:`harden_process` managed to apply."""

    core_dumps_disabled: bool
    """``RLIMIT_CORE`` is 0 (soft and hard)."""
    not_dumpable: bool
    """Linux ``PR_SET_DUMPABLE`` is 0: no core dumps, no ptrace by same-uid peers."""
    umask_set: bool
    """The process umask is ``077``."""


def harden_process(*, set_umask: bool = True) -> ProcessHardening:
    """Keep key material out of core dumps and other processes; never raises.

    Call once at daemon start, before loading keys. Sets ``RLIMIT_CORE`` to 0,
    on Linux (and Android) ``prctl(PR_SET_DUMPABLE, 0)`` through ``ctypes``,
    and, unless ``set_umask`` is false, umask ``077`` for every file the
    process creates. Each step that fails is logged as a warning and skipped.
    ``PR_SET_DUMPABLE`` 0 also stops debuggers such as py-spy attaching
    without root.
    """
    umask_set = False
    if set_umask:
        os.umask(0o077)
        umask_set = True
    return ProcessHardening(_disable_core_dumps(), _set_not_dumpable(), umask_set)


def _disable_core_dumps() -> bool:
    try:
        import resource  # POSIX only
    except ImportError:
        logger.warning("no resource module: core dumps left as they are")
        return False
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        logger.warning("cannot set RLIMIT_CORE to 0: %s", exc)
        return False
    return True


def _set_not_dumpable() -> bool:
    if not sys.platform.startswith(("linux", "android")):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
        prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        prctl.restype = ctypes.c_int
        result = prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (ImportError, OSError, AttributeError) as exc:
        logger.warning("cannot call prctl(PR_SET_DUMPABLE): %s", exc)
        return False
    if result != 0:
        logger.warning(
            "prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(ctypes.get_errno())
        )
        return False
    return True
