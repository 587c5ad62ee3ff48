"""The loss curve next to a trained artifact: ``loss_curve.csv`` and a small ``loss_curve.png``.

The PNG is drawn here with zlib (a few lines) rather than adding matplotlib as a dependency for one
plot: train loss in blue, eval loss in orange, both on one linear y axis starting at 0.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from pathlib import Path

from hotswap.fsutil import atomic_write_bytes

Point = tuple[int, float, float | None]  # (step, train loss, eval loss or None)
_W, _H, _M = 640, 360, 24  # size and margin in pixels
_COLORS = ((31, 119, 180), (255, 127, 14))


def write_csv(path: Path, curve: list[Point]) -> None:
    lines = ["step,train_loss,eval_loss"]
    lines += [f"{s},{t:.6f},{'' if e is None else f'{e:.6f}'}" for s, t, e in curve]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_png(path: Path, curve: list[Point]) -> None:
    pixels = [[(255, 255, 255)] * _W for _ in range(_H)]
    for x in range(_M, _W - _M):  # axes
        pixels[_H - _M][x] = (0, 0, 0)
    for y in range(_M, _H - _M + 1):
        pixels[y][_M] = (0, 0, 0)
    series = [[(s, t) for s, t, _ in curve], [(s, e) for s, _, e in curve if e is not None]]
    last_step = max((s for s, _, _ in curve), default=1) or 1
    top = max((v for points in series for _, v in points), default=1.0) or 1.0

    def at(step: int, value: float) -> tuple[int, int]:
        x = _M + round(step / last_step * (_W - 2 * _M - 1))
        y = _H - _M - round(min(value, top) / top * (_H - 2 * _M - 1))
        return x, y

    for points, color in zip(series, _COLORS, strict=True):
        xy = [at(s, v) for s, v in points]
        for (x0, y0), (x1, y1) in itertools.pairwise(xy):
            n = max(abs(x1 - x0), abs(y1 - y0), 1)
            for i in range(n + 1):
                x, y = x0 + (x1 - x0) * i // n, y0 + (y1 - y0) * i // n
                for dy in (0, 1):
                    pixels[min(y + dy, _H - 1)][x] = color
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", _W, _H, 8, 2, 0, 0, 0)  # 8-bit RGB
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    atomic_write_bytes(path, png)
