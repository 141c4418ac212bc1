"""relay.keys: key files, permissions, races, atomic writes, process hardening.

SECURITY.md §1 "Key storage".
"""

from __future__ import annotations

import base64
import ctypes
import errno
import logging
import os
import resource
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay import keys
from relay.keys import (
    KeyFileCorruptError,
    KeyFilePermissionError,
    KeyKind,
    KeyStore,
    KeyStoreError,
    ProcessHardening,
    harden_process,
)

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keys"


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Files must come out 0600 even when the umask would allow more."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def assert_no_key_material(text: str, *secrets: bytes) -> None:
    assert "\n" not in text
    for secret in secrets:
        for form in (
            secret.hex(),
            secret.hex().upper(),
            base64.b64encode(secret).decode(),
            secret.decode("latin-1"),
            repr(secret)[2:-1],
        ):
            assert form not in text


# -- round trip ---------------------------------------------------------------


@pytest.mark.usefixtures("permissive_umask")
def test_create_load_round_trip_and_modes(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    assert mode(state_dir) == 0o700
    private, public = store.load_or_create_x25519("phone-static")
    assert len(private) == len(public) == 32
    derived = X25519PrivateKey.from_private_bytes(private).public_key()
    assert derived.public_bytes_raw() == public
    assert store.load_or_create_x25519("phone-static") == (private, public)
    assert KeyStore(state_dir).load_or_create_x25519("phone-static") == (
        private,
        public,
    )
    seed, verify = store.load_or_create_ed25519("device")
    signature = Ed25519PrivateKey.from_private_bytes(seed).sign(b"m")
    again = KeyStore(state_dir).load_or_create_ed25519("device")
    assert again == (seed, verify)
    Ed25519PublicKey.from_public_bytes(verify).verify(signature, b"m")
    files = sorted(state_dir.iterdir())
    assert [p.name for p in files] == ["device.ed25519", "phone-static.x25519"]
    for path in files:
        assert mode(path) == 0o600
        assert path.stat().st_uid == os.geteuid()
    assert (state_dir / "phone-static.x25519").read_bytes() == private
    assert leftovers(state_dir) == []


def test_same_name_different_kinds_are_separate(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    x_private, _ = store.load_or_create_x25519("k")
    ed_private, _ = store.load_or_create_ed25519("k")
    assert x_private != ed_private


@pytest.mark.usefixtures("permissive_umask")
def test_existing_directory_with_group_or_other_bits_is_refused(
    tmp_path: Path,
) -> None:
    for bits in (0o750, 0o705, 0o777, 0o710):
        directory = tmp_path / f"d{bits:o}"
        directory.mkdir()
        directory.chmod(bits)
        with pytest.raises(KeyFilePermissionError) as info:
            KeyStore(directory)
        message = str(info.value)
        assert str(directory) in message
        assert f"chmod 700 {directory}" in message
        assert mode(directory) == bits  # refused, not silently "fixed"


def test_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    with pytest.raises(KeyStoreError, match="state directory"):
        KeyStore(path)


def test_directory_made_unsafe_later_is_refused(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    store.load_or_create_x25519("a")
    state_dir.chmod(0o755)
    with pytest.raises(KeyFilePermissionError, match="chmod 700"):
        store.load_or_create_x25519("a")


# -- refused key files ------------------------------------------------------------


@pytest.mark.parametrize("bits", [0o644, 0o640, 0o604, 0o660, 0o666, 0o601])
def test_group_or_world_accessible_key_file_refused(state_dir: Path, bits: int) -> None:
    store = KeyStore(state_dir)
    private, public = store.load_or_create_x25519("phone-static")
    path = state_dir / "phone-static.x25519"
    path.chmod(bits)
    with pytest.raises(KeyFilePermissionError) as info:
        store.load_or_create_x25519("phone-static")
    message = str(info.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message
    assert_no_key_material(message, private, public)
    assert_no_key_material(repr(info.value), private, public)
    assert path.read_bytes() == private  # untouched
    path.chmod(0o600)
    assert store.load_or_create_x25519("phone-static") == (private, public)


def test_world_readable_pin_refused(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    store.save_public("glasses-1", bytes(range(32)))
    path = state_dir / "glasses-1.pub"
    path.chmod(0o644)
    with pytest.raises(KeyFilePermissionError, match="chmod 600"):
        store.load_public("glasses-1")


@pytest.mark.skipif(not IS_ROOT, reason="chown to another uid needs root")
def test_key_file_owned_by_another_uid_refused(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    private, public = store.load_or_create_ed25519("device")
    path = state_dir / "device.ed25519"
    os.chown(path, 1, -1)
    try:
        with pytest.raises(KeyFilePermissionError) as info:
            store.load_or_create_ed25519("device")
        message = str(info.value)
        assert str(path) in message
        assert "uid 1" in message
        assert f"chown {os.geteuid()}" in message
        assert_no_key_material(message, private, public)
    finally:
        os.chown(path, os.geteuid(), -1)
    assert store.load_or_create_ed25519("device") == (private, public)


@pytest.mark.skipif(not IS_ROOT, reason="chown to another uid needs root")
def test_directory_owned_by_another_uid_refused(state_dir: Path) -> None:
    KeyStore(state_dir)
    os.chown(state_dir, 1, -1)
    try:
        with pytest.raises(KeyFilePermissionError, match="uid 1"):
            KeyStore(state_dir)
    finally:
        os.chown(state_dir, os.geteuid(), -1)


def test_symlinked_key_file_refused(state_dir: Path, tmp_path: Path) -> None:
    store = KeyStore(state_dir)
    elsewhere = tmp_path / "attacker-key"
    elsewhere.write_bytes(bytes(32))
    elsewhere.chmod(0o600)
    link = state_dir / "phone-static.x25519"
    link.symlink_to(elsewhere)
    with pytest.raises(KeyFilePermissionError) as info:
        store.load_or_create_x25519("phone-static")
    assert str(link) in str(info.value)
    assert "symlink" in str(info.value)
    assert elsewhere.read_bytes() == bytes(32)  # never written through
    assert link.is_symlink()
    (state_dir / "glasses.pub").symlink_to(elsewhere)
    with pytest.raises(KeyFilePermissionError, match="symlink"):
        store.load_public("glasses")


def test_dangling_symlink_is_not_followed_on_create(
    state_dir: Path, tmp_path: Path
) -> None:
    store = KeyStore(state_dir)
    target = tmp_path / "would-be-created"
    (state_dir / "phone-static.x25519").symlink_to(target)
    with pytest.raises(KeyFilePermissionError, match="symlink"):
        store.load_or_create_x25519("phone-static")
    assert not target.exists()
    assert leftovers(state_dir) == []


def test_fifo_and_directory_refused_without_blocking(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    os.mkfifo(state_dir / "a.x25519", 0o600)
    with pytest.raises(KeyFilePermissionError, match="not a regular file"):
        store.load_or_create_x25519("a")
    (state_dir / "b.pub").mkdir(mode=0o700)
    with pytest.raises(KeyFilePermissionError, match="not a regular file"):
        store.load_public("b")


def test_corrupt_and_oversize_files_refused(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    secret = b"\xaa" * 31
    path = state_dir / "short.x25519"
    path.write_bytes(secret)
    path.chmod(0o600)
    with pytest.raises(KeyFileCorruptError) as info:
        store.load_or_create_x25519("short")
    assert str(path) in str(info.value)
    assert_no_key_material(str(info.value), secret)
    big = state_dir / "big.pub"
    big.write_bytes(bytes(keys.MAX_FILE_SIZE + 1))
    big.chmod(0o600)
    with pytest.raises(KeyFileCorruptError, match="too large"):
        store.load_public("big")
    odd = state_dir / "odd.pub"
    odd.write_bytes(bytes(33))
    odd.chmod(0o600)
    with pytest.raises(KeyFileCorruptError, match="33 bytes"):
        store.load_public("odd")


# -- races and atomic writes ---------------------------------------------------------


def test_second_creator_gets_the_first_creators_key(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loser of the create race (O_EXCL / link EEXIST) reloads the winner's key."""
    first, second = KeyStore(state_dir), KeyStore(state_dir)
    original = keys._GENERATORS[KeyKind.X25519]
    winner: list[tuple[bytes, bytes]] = []

    def racing() -> bytes:
        if not winner:  # the other process creates the file in between
            winner.append((b"", b""))
            winner[0] = first.load_or_create_x25519("phone-static")
        return original()

    monkeypatch.setitem(keys._GENERATORS, KeyKind.X25519, racing)
    assert second.load_or_create_x25519("phone-static") == winner[0]
    assert (state_dir / "phone-static.x25519").read_bytes() == winner[0][0]
    assert leftovers(state_dir) == []


def create_concurrently(directory: Path, name: str, workers: int) -> list[object]:
    """Start ``workers`` threads at once on ``load_or_create_ed25519(name)``."""
    barrier = threading.Barrier(workers)
    results: list[object] = []

    def work() -> None:
        try:
            barrier.wait()
            results.append(KeyStore(directory).load_or_create_ed25519(name))
        except BaseException as exc:  # noqa: BLE001 - compared below
            results.append(exc)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_creators_all_get_one_key(state_dir: Path) -> None:
    KeyStore(state_dir)
    for name in ("a", "b", "c", "d"):
        results = create_concurrently(state_dir, name, 8)
        assert len(results) == 8
        assert all(isinstance(r, tuple) for r in results), results
        assert len(set(map(repr, results))) == 1
    assert leftovers(state_dir) == []


def test_create_without_hard_links_falls_back_to_o_excl(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = KeyStore(state_dir)
    pair = store.load_or_create_x25519("k")
    assert mode(state_dir / "k.x25519") == 0o600
    assert store.load_or_create_x25519("k") == pair
    assert leftovers(state_dir) == []


def test_replace_is_atomic_and_leaves_no_tmp_files(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(state_dir)
    old, new = bytes([1]) * 32, bytes([2]) * 32
    store.save_public("glasses-1", old)
    inode = (state_dir / "glasses-1.pub").stat().st_ino
    store.save_public("glasses-1", new)
    assert store.load_public("glasses-1") == new
    assert (state_dir / "glasses-1.pub").stat().st_ino != inode  # renamed over
    assert mode(state_dir / "glasses-1.pub") == 0o600
    assert leftovers(state_dir) == []

    def failing_replace(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyStoreError, match=r"glasses-1\.pub"):
        store.save_public("glasses-1", old)
    assert store.load_public("glasses-1") == new  # old content intact
    assert leftovers(state_dir) == []


def test_failed_write_leaves_no_tmp_files(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(state_dir)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(KeyStoreError, match="No space left"):
        store.load_or_create_x25519("k")
    monkeypatch.undo()
    assert list(state_dir.iterdir()) == []


def test_stale_tmp_files_from_a_crash_are_removed(state_dir: Path) -> None:
    KeyStore(state_dir)
    stale = state_dir / ".phone-static.x25519.0123456789ab.tmp"
    fresh = state_dir / ".device.ed25519.ba9876543210.tmp"
    keep = state_dir / ".notes"
    for path in (stale, fresh, keep):
        path.write_bytes(bytes(32))
    old = time.time() - keys.STALE_TMP_AGE - 10
    os.utime(stale, (old, old))
    os.utime(keep, (old, old))
    KeyStore(state_dir)
    assert leftovers(state_dir) == [fresh.name, keep.name]


# -- pins, listing, deletion ---------------------------------------------------------


def test_pins_list_delete(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    assert store.load_public("glasses-a") is None
    pins = {f"glasses-{c}": bytes([i]) * 32 for i, c in enumerate("cab")}
    for name, public in pins.items():
        store.save_public(name, public)
    store.save_public("cloud-k1", bytes(32))
    store.load_or_create_x25519("glasses-x")  # a private key, not a pin
    assert store.list_pins("glasses-") == ["glasses-a", "glasses-b", "glasses-c"]
    assert store.list_pins() == ["cloud-k1", "glasses-a", "glasses-b", "glasses-c"]
    assert store.load_public("glasses-b") == pins["glasses-b"]
    assert store.matches_pin("glasses-b", pins["glasses-b"])
    assert not store.matches_pin("glasses-b", pins["glasses-a"])
    assert not store.matches_pin("nobody", pins["glasses-a"])
    assert store.delete("glasses-b")
    assert not store.delete("glasses-b")
    assert store.load_public("glasses-b") is None
    assert store.delete("glasses-x", KeyKind.X25519)
    assert store.list_pins("glasses-") == ["glasses-a", "glasses-c"]
    assert sorted(p.name for p in state_dir.iterdir()) == [
        "cloud-k1.pub",
        "glasses-a.pub",
        "glasses-c.pub",
    ]


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a.b", ".hidden", "-x", "a" * 65])
def test_bad_names_refused(state_dir: Path, name: str) -> None:
    store = KeyStore(state_dir)
    with pytest.raises(ValueError, match="key names"):
        store.load_or_create_x25519(name)
    with pytest.raises(ValueError, match="key names"):
        store.save_public(name, bytes(32))


def test_bad_public_key_and_prefix_refused(state_dir: Path) -> None:
    store = KeyStore(state_dir)
    with pytest.raises(ValueError, match="32 bytes"):
        store.save_public("g", bytes(31))
    with pytest.raises(ValueError, match="prefix"):
        store.list_pins("../")


# -- keystore wrapping seam ---------------------------------------------------------


class AesGcmWrapper:
    """Stands in for a keystore-backed wrapper (the key would never leave it)."""

    def __init__(self, kek: bytes) -> None:
        self._aead = AESGCM(kek)

    def wrap(self, label: str, secret: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, secret, label.encode())

    def unwrap(self, label: str, blob: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], label.encode())
        except InvalidTag as exc:
            raise KeyStoreError(
                f"{label} does not open under the keystore key"
            ) from exc


def test_wrapped_key_files(state_dir: Path) -> None:
    store = KeyStore(state_dir, wrapper=AesGcmWrapper(bytes(16)))
    private, public = store.load_or_create_x25519("phone-static")
    on_disk = (state_dir / "phone-static.x25519").read_bytes()
    assert private not in on_disk
    assert len(on_disk) == 12 + 32 + 16
    assert store.load_or_create_x25519("phone-static") == (private, public)
    other = KeyStore(state_dir, wrapper=AesGcmWrapper(bytes([1]) * 16))
    with pytest.raises(KeyStoreError, match="keystore key"):
        other.load_or_create_x25519("phone-static")


def test_logs_and_repr_carry_no_key_material(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="relay.keys"):
        store = KeyStore(state_dir)
        private, public = store.load_or_create_x25519("phone-static")
        store.save_public("glasses", public)
        store.delete("glasses")
    assert caplog.records
    for record in caplog.records:
        assert_no_key_material(record.getMessage(), private, public)
    assert_no_key_material(repr(store), private, public)


# -- process hardening ----------------------------------------------------------


def test_harden_process_in_a_subprocess() -> None:
    code = (
        "import ctypes, os, resource\n"
        "from relay.keys import harden_process\n"
        "r = harden_process()\n"
        "print(r.core_dumps_disabled, r.not_dumpable, r.umask_set)\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE))\n"
        "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))\n"
        "print(oct(os.umask(0)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split("\n")
    if sys.platform.startswith("linux"):
        assert out[0] == "True True True"
        assert out[2] == "0"  # PR_GET_DUMPABLE
    assert out[1] == "(0, 0)"
    assert out[3] == "0o77"


def test_harden_process_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(resource, "setrlimit", refuse)
    monkeypatch.setattr(ctypes, "CDLL", refuse)
    assert harden_process(set_umask=False) == ProcessHardening(False, False, False)
