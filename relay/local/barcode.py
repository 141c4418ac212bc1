"""Retail barcodes (EAN-13, EAN-8, UPC-A, UPC-E) read from a JPEG on the phone.

Pillow decodes the JPEG (to greyscale, shrunk by the JPEG decoder itself
when the photo is large) and zxing-cpp finds the barcodes. The photo comes
from the glasses and is untrusted: its size and pixel count are bounded
before it is decoded, and any decoding failure means "no barcode".

Measured on the development machine (2 shared cores): a 100 KB 1024 x 768
photo from :func:`relay.sim.media.barcode_photo` is read in about 10 ms
(JPEG decoding included; 7-12 ms over 20-200 KB photos), far below the
0.3 s the skill table declares for it.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
from typing import Final

import zxingcpp
from PIL import Image

__all__ = ["DECODE_PIXELS", "MAX_PHOTO_BYTES", "MAX_PHOTO_PIXELS", "read_product_codes"]

_LOGGER = logging.getLogger(__name__)

MAX_PHOTO_BYTES: Final = 4 * 1024 * 1024
"""Larger photos are not decoded on the phone (the cloud gets them)."""
MAX_PHOTO_PIXELS: Final = 24_000_000
"""Photos declaring more pixels are not decoded (decompression bombs)."""
DECODE_PIXELS: Final = 4_000_000
"""Larger photos are shrunk by the JPEG decoder (1/2, 1/4 or 1/8) to about this."""

_FORMATS: Final = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.EANUPC)

# What Pillow may raise on hostile or broken JPEG bytes (UnidentifiedImageError
# is an OSError; a truncated file raises OSError on load).
_DECODE_ERRORS: Final = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def read_product_codes(
    jpeg: bytes,
    *,
    max_bytes: int = MAX_PHOTO_BYTES,
    max_pixels: int = MAX_PHOTO_PIXELS,
) -> tuple[str, ...]:
    """The retail barcodes in a JPEG photo, decoded on the phone.

    Args:
        jpeg: The photo.
        max_bytes: Bigger photos are not decoded.
        max_pixels: Photos declaring more pixels are not decoded.

    Returns:
        The codes' digits in the order found, without duplicates; empty when
        there is none, the photo is not a readable JPEG or is over a limit.
    """
    if not jpeg or len(jpeg) > max_bytes:
        return ()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(jpeg), formats=("JPEG",)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return ()
                shrink = max(1.0, math.sqrt(width * height / DECODE_PIXELS))
                image.draft("L", (int(width / shrink), int(height / shrink)))
                grey = image.convert("L")
    except _DECODE_ERRORS as exc:
        _LOGGER.debug("photo not decoded: %s", type(exc).__name__)
        return ()
    found = zxingcpp.read_barcodes(grey, formats=_FORMATS)
    return tuple(dict.fromkeys(code.text for code in found if code.valid))
