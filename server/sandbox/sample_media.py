"""A drawn portrait for the sandbox: a PNG whose face sits where the fake's detection puts the face box.

The sandbox's image URLs point at the loopback fake, so the viewer can show a real picture with
the detected boxes on it, with no network and no third-party imaging library (plain zlib PNG).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

RGB = tuple[int, int, int]

SKIN: RGB = (236, 196, 164)
HAIR: RGB = (72, 52, 42)
SHIRT: RGB = (44, 112, 122)
FEATURE: RGB = (60, 40, 36)
TOP: RGB = (228, 232, 240)
BOTTOM: RGB = (170, 186, 208)


@dataclass(frozen=True)
class _Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float
    color: RGB

    def span(self, y: int) -> tuple[int, int] | None:
        dy = (y + 0.5 - self.cy) / self.ry
        if abs(dy) >= 1:
            return None
        dx = self.rx * math.sqrt(1 - dy * dy)
        return round(self.cx - dx), round(self.cx + dx)


def png(width: int, height: int, rows: Iterable[bytes]) -> bytes:
    """Encode 8-bit RGB rows (each `3 * width` bytes) as a PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def portrait_png(face: Sequence[int], size: tuple[int, int]) -> bytes:
    """A flat-coloured head and shoulders whose face fills `face` ([x1, y1, x2, y2]) on a `size` canvas."""
    width, height = size
    x1, y1, x2, y2 = face
    cx, fw, fh = (x1 + x2) / 2, x2 - x1, y2 - y1
    cy = (y1 + y2) / 2
    shapes = [
        _Ellipse(cx, y2 + 0.05 * fh, 0.2 * fw, 0.32 * fh, SKIN),  # neck
        _Ellipse(cx, y2 + 1.4 * fh, 1.35 * fw, 1.12 * fh, SHIRT),  # shoulders
        _Ellipse(cx, cy - 0.08 * fh, 0.56 * fw, 0.58 * fh, HAIR),
        _Ellipse(cx, cy + 0.04 * fh, 0.46 * fw, 0.48 * fh, SKIN),
        _Ellipse(cx - 0.18 * fw, cy - 0.04 * fh, 0.05 * fw, 0.04 * fh, FEATURE),  # eyes
        _Ellipse(cx + 0.18 * fw, cy - 0.04 * fh, 0.05 * fw, 0.04 * fh, FEATURE),
        _Ellipse(cx, cy + 0.24 * fh, 0.12 * fw, 0.025 * fh, FEATURE),  # mouth
    ]

    def rows() -> Iterable[bytes]:
        for y in range(height):
            t = y / max(height - 1, 1)
            background = bytes(round(a + (b - a) * t) for a, b in zip(TOP, BOTTOM, strict=True))
            row = bytearray(background * width)
            for shape in shapes:
                span = shape.span(y)
                if span is None:
                    continue
                left, right = max(span[0], 0), min(span[1], width)
                if right > left:
                    row[3 * left : 3 * right] = bytes(shape.color) * (right - left)
            yield bytes(row)

    return png(width, height, rows())
