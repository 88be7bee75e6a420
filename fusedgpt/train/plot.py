"""The loss-curve PNG of a run, drawn without a plotting library: training loss (blue)
and validation loss (orange, with a dot per evaluation) against the step, on a grid with
labelled ticks, encoded as an RGB PNG with ``zlib``."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Sequence, Union

import numpy as np

WIDTH, HEIGHT = 800, 480
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50
SCALE = 2  # font pixels per glyph pixel
TRAIN_COLOR = (31, 119, 180)
VAL_COLOR = (255, 127, 14)
GRID_COLOR = (225, 225, 225)
INK = (40, 40, 40)

# 3x5 bitmap glyphs, rows top to bottom, for tick labels and the legend.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", "a": "000011101101011", "e": "010101111100011", "i": "010000010010010",
    "l": "110010010010111", "n": "000110101101101", "o": "000010101101010", "p": "000110101110100",
    "r": "000011100100100", "s": "000011110001110", "t": "010111010010011", "v": "000101101101010",
}

PathLike = Union[str, Path]


def write_png(path: PathLike, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image as a PNG file."""
    height, width, _ = image.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)))
        f.write(chunk(b"IEND", b""))


def _text(image: np.ndarray, x: int, y: int, text: str, color=INK) -> None:
    """Draw ``text`` with its top-left corner at (x, y)."""
    for i, char in enumerate(text):
        bits = np.array([int(b) for b in _GLYPHS.get(char, _GLYPHS[" "])], bool).reshape(5, 3)
        block = np.kron(bits, np.ones((SCALE, SCALE), bool))
        x0 = x + i * 4 * SCALE
        region = image[y : y + block.shape[0], x0 : x0 + block.shape[1]]
        region[block[: region.shape[0], : region.shape[1]]] = color


def _line(image: np.ndarray, p: tuple[float, float], q: tuple[float, float], color, width: int = 2) -> None:
    """Draw a segment by sampling it densely (cheaper to get right than Bresenham here)."""
    n = int(max(abs(q[0] - p[0]), abs(q[1] - p[1]))) + 1
    xs = np.rint(np.linspace(p[0], q[0], n + 1)).astype(int)
    ys = np.rint(np.linspace(p[1], q[1], n + 1)).astype(int)
    for dx in range(width):
        for dy in range(width):
            ok = (xs + dx < image.shape[1]) & (ys + dy < image.shape[0]) & (xs + dx >= 0) & (ys + dy >= 0)
            image[ys[ok] + dy, xs[ok] + dx] = color


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    span = max(high - low, 1e-9)
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


def plot_losses(
    path: PathLike,
    train: Sequence[tuple[int, float]],
    val: Sequence[tuple[int, float]],
) -> None:
    """Plot ``(step, loss)`` series to a PNG at ``path``; non-finite points are skipped."""
    train = [(s, v) for s, v in train if math.isfinite(v)]
    val = [(s, v) for s, v in val if math.isfinite(v)]
    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    points = train + val
    if points:
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        x_low, x_high = min(steps), max(max(steps), min(steps) + 1)
        pad = 0.05 * max(max(losses) - min(losses), 1e-3)
        y_low, y_high = min(losses) - pad, max(losses) + pad
        plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

        def to_pixel(step: float, loss: float) -> tuple[float, float]:
            return (LEFT + (step - x_low) / (x_high - x_low) * plot_w,
                    TOP + (y_high - loss) / (y_high - y_low) * plot_h)

        y_ticks = _ticks(y_low, y_high)
        for value in y_ticks:
            _, y = to_pixel(x_low, value)
            _line(image, (LEFT, y), (WIDTH - RIGHT, y), GRID_COLOR, width=1)
            text = _label(value, y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0)
            _text(image, LEFT - 8 - len(text) * 4 * SCALE, int(y) - 5, text)
        x_ticks = [t for t in _ticks(x_low, x_high) if t == int(t)]
        for value in x_ticks:
            x, _ = to_pixel(value, y_low)
            _line(image, (x, TOP), (x, HEIGHT - BOTTOM), GRID_COLOR, width=1)
            text = str(int(value))
            _text(image, int(x) - len(text) * 2 * SCALE, HEIGHT - BOTTOM + 8, text)
        for series, color in ((train, TRAIN_COLOR), (val, VAL_COLOR)):
            pixels = [to_pixel(s, v) for s, v in series]
            for p, q in zip(pixels, pixels[1:]):
                _line(image, p, q, color)
        for s, v in val:
            x, y = to_pixel(s, v)
            image[max(0, int(y) - 3) : int(y) + 4, max(0, int(x) - 3) : int(x) + 4] = VAL_COLOR
    _line(image, (LEFT, TOP), (LEFT, HEIGHT - BOTTOM), INK, width=1)
    _line(image, (LEFT, HEIGHT - BOTTOM), (WIDTH - RIGHT, HEIGHT - BOTTOM), INK, width=1)
    _text(image, WIDTH // 2 - 16 * SCALE, HEIGHT - 20, "step")
    _text(image, 8, 12, "loss")
    _line(image, (WIDTH - 200, 18), (WIDTH - 175, 18), TRAIN_COLOR)
    _text(image, WIDTH - 168, 13, "train", TRAIN_COLOR)
    _line(image, (WIDTH - 100, 18), (WIDTH - 75, 18), VAL_COLOR)
    _text(image, WIDTH - 68, 13, "val", VAL_COLOR)
    write_png(path, image)


def plot_metrics(metrics: PathLike, path: PathLike) -> None:
    """Plot a run's ``metrics.jsonl`` (``train_loss`` and ``val_loss`` records) to ``path``."""
    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    plot_losses(path, train, val)
