"""Client TLS contexts for the uplinks: verification always on, files checked once."""

from __future__ import annotations

import ssl
from pathlib import Path

from relay.errors import UplinkConfigError

__all__ = ["client_tls_context"]


def client_tls_context(
    *,
    ca_file: Path | None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> ssl.SSLContext:
    """Build a verifying client ``SSLContext``; this reads files, so call it off-loop.

    Args:
        ca_file: PEM file of the CA(s) to trust; ``None`` trusts the system store.
        cert_file: PEM client certificate (chain), for mutual TLS.
        key_file: PEM private key of ``cert_file``, unencrypted; ``None`` when the
            key is inside ``cert_file``.

    Returns:
        A context with hostname checking and certificate verification on.

    Raises:
        UplinkConfigError: a file is missing, unreadable or holds no usable PEM data.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(ca_file) if ca_file is not None else None
        )
    except OSError as exc:
        raise UplinkConfigError(
            f"cannot use CA file {str(ca_file)!r}: {_reason(exc)}"
        ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            # An empty password makes an encrypted key fail instead of prompting.
            context.load_cert_chain(
                str(cert_file), str(key_file) if key_file is not None else None, b""
            )
        except OSError as exc:
            raise UplinkConfigError(
                f"cannot use client certificate {str(cert_file)!r}: {_reason(exc)}"
            ) from exc
    return context


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"no usable PEM data ({exc.reason or exc.__class__.__name__})"
    return exc.strerror or exc.__class__.__name__
