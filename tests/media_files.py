"""Real media files made by the tests: images with Pillow, WAV with the stdlib, MP3 by hand.

The MP3 is a run of MPEG-1 Layer III frame headers (128 kbit/s, 44.1 kHz, 417-byte frames of
1152 samples) with silent payloads: a valid constant-bitrate stream that any MP3 parser reads,
written without an encoder so the tests stay offline and dependency-free.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

from PIL import Image

MP3_FRAME_HEADER = bytes([0xFF, 0xFB, 0x90, 0x00])  # sync, MPEG-1, Layer III, no CRC, 128 kbit/s, 44.1 kHz
MP3_FRAME_BYTES = 417  # 144 * 128000 / 44100, no padding
MP3_FRAME_SECONDS = 1152 / 44100


def image(path: Path, size: tuple[int, int] = (640, 800), fmt: str = "PNG", color: str = "#c08060") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    """Mono 8-bit PCM: 8 kB per second at 8 kHz, so lengths and sizes are easy to pick."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(rate)
        out.writeframes(bytes([128]) * int(seconds * rate))
    return path


def mp3(path: Path, seconds: float) -> Path:
    frames = int(seconds / MP3_FRAME_SECONDS) + 1
    frame = MP3_FRAME_HEADER + bytes(MP3_FRAME_BYTES - len(MP3_FRAME_HEADER))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(frame * frames)
    return path


def png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "#808080").save(buffer, format="PNG")
    return buffer.getvalue()
