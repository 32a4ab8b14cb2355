"""Image maths for the renderer: noise fields, blur, desaturation, hashing and
distances, in numpy and Pillow only (no scipy)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise with features ~``cell`` px."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def box_blur(a: np.ndarray, r: int, passes: int = 2) -> np.ndarray:
    """Separable box blur of radius r over the first two axes (edge-clamped)."""
    if r <= 0:
        return a
    out = a.astype(np.float32)
    for _ in range(passes):
        for axis in (0, 1):
            pad = [(0, 0)] * out.ndim
            pad[axis] = (r + 1, r)
            padded = np.pad(out, pad, mode="edge")
            csum = np.cumsum(padded, axis=axis, dtype=np.float64)
            n = out.shape[axis]
            hi = np.take(csum, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
            lo = np.take(csum, np.arange(0, n), axis=axis)
            out = ((hi - lo) / (2 * r + 1)).astype(np.float32)
    return out


def desaturate(rgb: np.ndarray, amount: float) -> np.ndarray:
    """Blends ``rgb`` toward its luma by ``amount`` (0: unchanged, 1: grey)."""
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return rgb * (1 - amount) + grey[..., None] * amount


def hash01(*keys: np.ndarray) -> np.ndarray:
    """Deterministic per-cell pseudo-random numbers in [0, 1)."""
    h = np.zeros_like(keys[0], dtype=np.int64)
    for i, k in enumerate(keys):
        h = h * 73856093 + k.astype(np.int64) * (19349663 + 83492791 * i)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF).astype(np.float32) / 65536.0


def textured(base, noise: np.ndarray, amount: float) -> np.ndarray:
    """Base colour modulated by a noise field, as an (H, W, 3) image."""
    base = np.asarray(base, dtype=np.float32)
    return base * (1 + amount * noise[..., None])


def segment_distance(
    x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    """Distance of each point (x, y) to the segment from ``a`` to ``b`` (thin strokes)."""
    ax, ay = a
    bx, by = b
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    return np.hypot(x - (ax + t * dx), y - (ay + t * dy))
