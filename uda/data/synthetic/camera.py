"""The pinhole camera over a flat road: which pixels see the ground, a side
plane or a fronto-parallel plane, and at what depth (perspective for free)."""

from __future__ import annotations

import numpy as np


# Depth of pixels that miss a plane: finite so texture maths stays NaN-free.
_FAR = 1e7


class Camera:
    """Pinhole camera at height ``cam_h`` over a flat road, looking along +Z.

    World: X lateral (right +), Yw height above ground, Z depth (metres).
    """

    def __init__(self, w: int, h: int, focal: float, cam_h: float, x_v: float, y_h: float) -> None:
        self.w, self.h, self.f, self.cam_h = w, h, focal, cam_h
        self.x_v, self.y_h = x_v, y_h
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        self.xs, self.ys = xs + 0.5, ys + 0.5

    def ground(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mask, Z, X) of the pixels that see the ground plane."""
        dy = self.ys - self.y_h
        mask = dy > 0.25
        z = np.where(mask, self.f * self.cam_h / np.maximum(dy, 0.25), _FAR)
        x = (self.xs - self.x_v) * np.where(mask, z, 0) / self.f
        return mask, z.astype(np.float32), x.astype(np.float32)

    def side_plane(self, x0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mask, Z, Yw) where pixels see the vertical plane X = x0."""
        dx = self.xs - self.x_v
        mask = (dx * x0) > 1e-3
        z = np.where(mask, self.f * x0 / np.where(mask, dx, 1.0), _FAR)
        yw = self.cam_h - (self.ys - self.y_h) * np.where(mask, z, 0) / self.f
        return mask, z.astype(np.float32), yw.astype(np.float32)

    def front_plane(self, z0: float) -> tuple[np.ndarray, np.ndarray]:
        """(X, Yw) of every pixel on the fronto-parallel plane Z = z0."""
        x = (self.xs - self.x_v) * z0 / self.f
        yw = self.cam_h - (self.ys - self.y_h) * z0 / self.f
        return x, yw

    def project(self, x: float, yw: float, z: float) -> tuple[float, float]:
        """Pixel (x, y) of the world point (X, Yw, Z)."""
        return (self.x_v + self.f * x / z, self.y_h + self.f * (self.cam_h - yw) / z)
