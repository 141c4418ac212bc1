"""Media the emulated glasses send: real codec frames and real JPEG photos.

- Voice: a synthesised, speech-like clip (a voiced source with a moving pitch,
  shaped by formant resonances syllable by syllable, with pauses and
  fricative noise), 16 kHz mono, encoded with LC3 (the LE Audio codec, via
  Google's liblc3 in ``lc3py``) in 10 ms frames at 32 kbit/s by default:
  40-byte frames at 100 per second, as glasses stream them.
- Photos: real baseline JPEGs made with Pillow from a generated scene (a shop
  shelf with price tags), sized to a target between 20 and 200 KB.

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
    if not 20_000 <= target_bytes <= 200_000:
        raise ValueError("photos are 20 to 200 KB")
    rng = random.Random(seed)
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
    image = Image.blend(image, noise, 0.18).filter(ImageFilter.SMOOTH)
    best = b""
    for quality in range(95, 5, -5):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        best = buffer.getvalue()
        if len(best) <= target_bytes:
            break
    if len(best) > target_bytes:
        scale = math.sqrt(target_bytes / len(best))
        small = image.resize((int(width * scale), int(height * scale)))
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=10)
        best = buffer.getvalue()
    return best
