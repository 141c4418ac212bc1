"""Media the emulated glasses send: real codec frames and real JPEG photos.

- Voice: a synthesised, speech-like clip (a voiced source with a moving pitch,
  shaped by formant resonances syllable by syllable, with pauses and
  fricative noise), 16 kHz mono, encoded with LC3 (the LE Audio codec, via
  Google's liblc3 in ``lc3py``) in 10 ms frames at 32 kbit/s by default:
  40-byte frames at 100 per second, as glasses stream them.
- Photos: real baseline JPEGs made with Pillow from a generated scene (a shop
  shelf with price tags), sized to a target between 20 and 200 KB; and the
  same scene with a product label carrying a real EAN-13 barcode
  (:func:`barcode_photo`), for the phone's barcode skill.

Everything is deterministic for a seed, and cached per process.
"""

from __future__ import annotations

import array
import functools
import io
import math
import random
from typing import Final

import lc3
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "LC3_BITRATE",
    "LC3_FRAME_US",
    "SAMPLE_RATE",
    "barcode_photo",
    "encode_lc3",
    "photo",
    "synth_speech",
    "voice_frames",
]

SAMPLE_RATE: Final = 16_000
LC3_FRAME_US: Final = 10_000
LC3_BITRATE: Final = 32_000

# Formant pairs (F1, F2) of a few vowels, Hz.
_VOWELS: Final = ((730, 1090), (270, 2290), (530, 1840), (570, 840), (300, 870))


def synth_speech(seconds: float, seed: int = 0) -> array.array[int]:
    """A speech-like 16-bit mono clip of ``seconds`` at 16 kHz."""
    return array.array("h", _synth(round(seconds * 100), seed))


@functools.lru_cache(maxsize=16)
def _synth(centis: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    n = centis * SAMPLE_RATE // 100
    out = [0] * n
    phase = 0.0
    i = 0
    while i < n:
        syllable = int(SAMPLE_RATE * rng.uniform(0.12, 0.25))
        f1, f2 = rng.choice(_VOWELS)
        pitch0 = rng.uniform(100, 170)
        voiced = rng.random() > 0.15
        fricative = int(syllable * rng.uniform(0.0, 0.25))
        for j in range(min(syllable, n - i)):
            t = j / syllable
            env = math.sin(math.pi * t) ** 0.6
            if j < fricative:
                sample = rng.uniform(-1, 1) * 0.15
            elif voiced:
                pitch = pitch0 * (1.0 + 0.08 * math.sin(2 * math.pi * t))
                phase += 2 * math.pi * pitch / SAMPLE_RATE
                sample = 0.0
                for h in range(1, 9):
                    freq = h * pitch
                    gain = 1.0 / (1.0 + ((freq - f1) / 90) ** 2) + 0.6 / (
                        1.0 + ((freq - f2) / 120) ** 2
                    )
                    sample += gain * math.sin(h * phase) / h
                sample *= 0.5
            else:
                sample = 0.0
            out[i + j] = int(max(-1.0, min(1.0, sample * env)) * 12_000)
        i += syllable
        if rng.random() < 0.3:
            i += int(SAMPLE_RATE * rng.uniform(0.05, 0.15))  # a pause
    return tuple(out)


def encode_lc3(
    pcm: array.array[int],
    *,
    frame_us: int = LC3_FRAME_US,
    bitrate: int = LC3_BITRATE,
) -> list[bytes]:
    """Encode 16 kHz 16-bit PCM into LC3 frames (the last one zero-padded)."""
    encoder = lc3.Encoder(frame_us, SAMPLE_RATE)
    samples = encoder.get_frame_samples()
    frame_bytes = encoder.get_frame_bytes(bitrate)
    frames = []
    for start in range(0, len(pcm), samples):
        chunk = pcm[start : start + samples]
        if len(chunk) < samples:
            chunk.extend([0] * (samples - len(chunk)))
        frames.append(encoder.encode(chunk.tobytes(), frame_bytes, bit_depth=16))
    return frames


@functools.lru_cache(maxsize=16)
def voice_frames(seconds: float, seed: int = 0) -> tuple[bytes, ...]:
    """LC3 frames of a synthesised utterance of ``seconds`` (cached)."""
    return tuple(encode_lc3(synth_speech(seconds, seed)))


@functools.lru_cache(maxsize=16)
def photo(target_bytes: int = 100_000, seed: int = 0) -> bytes:
    """A real JPEG of a shop shelf with price tags, close to ``target_bytes``.

    Raises:
        ValueError: ``target_bytes`` outside 20,000..200,000.
    """
    _check_photo_size(target_bytes)
    return _to_jpeg(_shelf(random.Random(seed)), target_bytes)


@functools.lru_cache(maxsize=16)
def barcode_photo(code: str, size: int = 100_000, seed: int = 0) -> bytes:
    """A real JPEG of a product label carrying the EAN-13 barcode ``code``.

    The shop-shelf scene of :func:`photo` with a white label in front, on
    which the bars are drawn from the EAN-13 tables (GS1 General
    Specifications §5.2.1; not by a barcode library, so a decoder test is
    not circular): 3 px per module, a 10-module quiet zone each side, the
    digits printed below, then the whole image blurred a little and JPEG
    compressed down to about ``size`` bytes, as a phone camera would. A
    decoder such as zxing-cpp reads it back at every size in range (tested
    at 20 KB and 100 KB).

    Args:
        code: 13 digits, the last one a valid EAN-13 check digit.
        size: Target JPEG size in bytes (20,000..200,000).
        seed: Seed of the scene and of the label position.

    Returns:
        The JPEG bytes, at most ``size`` long.

    Raises:
        ValueError: ``code`` is not a valid EAN-13 or ``size`` out of range.
    """
    _check_photo_size(size)
    modules = _ean13_modules(code)
    rng = random.Random(seed)
    image = _shelf(rng)
    module_px = _BARCODE_MODULE_PX
    bars_h = 60 * module_px
    label_w = (len(modules) + 2 * _EAN_QUIET_MODULES) * module_px
    label_h = bars_h + 40
    left = rng.randint(20, image.width - label_w - 20)
    top = rng.randint(20, image.height - label_h - 20)
    label = Image.new("L", (label_w, label_h), 250)
    draw = ImageDraw.Draw(label)
    x0 = _EAN_QUIET_MODULES * module_px
    for i, bit in enumerate(modules):
        if bit == "1":
            x = x0 + i * module_px
            draw.rectangle([x, 10, x + module_px - 1, 10 + bars_h], fill=20)
    draw.text((x0, 15 + bars_h), f"{code[0]} {code[1:7]} {code[7:]}", fill=20)
    image.paste(label.filter(ImageFilter.SMOOTH).convert("RGB"), (left, top))
    return _to_jpeg(image, size)


# EAN-13 symbol tables (GS1 General Specifications §5.2.1.2): the L-set codes
# of each digit; R codes are their complements and G codes the reversed R
# codes. The first digit is encoded in the L/G parity of the left half.
_EAN_L: Final = (
    "0001101", "0011001", "0010011", "0111101", "0100011",
    "0110001", "0101111", "0111011", "0110111", "0001011",
)  # fmt: skip
_EAN_PARITY: Final = (
    "LLLLLL", "LLGLGG", "LLGGLG", "LLGGGL", "LGLLGG",
    "LGGLLG", "LGGGLG", "LGLGGL", "LGLGLG", "LGGLGL",
)  # fmt: skip
_EAN_QUIET_MODULES: Final = 10
_BARCODE_MODULE_PX: Final = 3


def _ean13_modules(code: str) -> str:
    """The 95 modules (``"1"`` = bar) of the EAN-13 symbol of ``code``."""
    if len(code) != 13 or not code.isascii() or not code.isdigit():
        raise ValueError("an EAN-13 code is 13 digits")
    digits = [int(c) for c in code]
    weighted = sum(d * (3 if i % 2 else 1) for i, d in enumerate(digits[:12]))
    if (10 - weighted % 10) % 10 != digits[12]:
        raise ValueError("bad EAN-13 check digit")
    left = ""
    for d, parity in zip(digits[1:7], _EAN_PARITY[digits[0]], strict=True):
        code_l = _EAN_L[d]
        left += code_l if parity == "L" else _complement(code_l)[::-1]
    right = "".join(_complement(_EAN_L[d]) for d in digits[7:])
    return "101" + left + "01010" + right + "101"


def _complement(bits: str) -> str:
    return bits.translate(str.maketrans("01", "10"))


def _check_photo_size(target_bytes: int) -> None:
    if not 20_000 <= target_bytes <= 200_000:
        raise ValueError("photos are 20 to 200 KB")


def _shelf(rng: random.Random) -> Image.Image:
    """The shop-shelf scene (1024 x 768) with price tags, noise and blur."""
    width, height = 1024, 768
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        shade = 200 - y * 120 // height
        draw.line([(0, y), (width, y)], fill=(shade, shade - 10, shade - 30))
    for shelf in range(4):
        top = 60 + shelf * 180
        draw.rectangle([0, top + 150, width, top + 165], fill=(90, 70, 50))
        x = 10
        while x < width - 60:
            w = rng.randint(50, 140)
            color = (rng.randint(40, 250), rng.randint(40, 250), rng.randint(40, 250))
            draw.rectangle([x, top + rng.randint(10, 60), x + w, top + 150], fill=color)
            draw.rectangle([x + 8, top + 160, x + 70, top + 185], fill=(250, 250, 240))
            draw.text(
                (x + 12, top + 165),
                f"{rng.randint(1, 49)}.{rng.randint(0, 99):02d}",
                fill=(0, 0, 0),
            )
            x += w + rng.randint(4, 20)
    noise = Image.effect_noise((width, height), 40).convert("RGB")
    return Image.blend(image, noise, 0.18).filter(ImageFilter.SMOOTH)


def _to_jpeg(image: Image.Image, target_bytes: int) -> bytes:
    """The best-quality JPEG of ``image`` of at most ``target_bytes``."""
    best = b""
    for quality in range(95, 5, -5):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        best = buffer.getvalue()
        if len(best) <= target_bytes:
            break
    if len(best) > target_bytes:
        scale = math.sqrt(target_bytes / len(best))
        small = image.resize((int(image.width * scale), int(image.height * scale)))
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=10)
        best = buffer.getvalue()
    return best
