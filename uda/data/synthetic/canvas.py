"""The layered canvas a scene is painted on (label, colour, depth, light
emission), z-buffered, and the trainIds it labels with, named for readability."""

from __future__ import annotations

import numpy as np

# trainIds, named for readability.
(
    ROAD,
    SIDEWALK,
    BUILDING,
    WALL,
    FENCE,
    POLE,
    LIGHT,
    SIGN,
    VEGETATION,
    TERRAIN,
    SKY,
    PERSON,
    RIDER,
    CAR,
    TRUCK,
    BUS,
    TRAIN,
    MOTORCYCLE,
    BICYCLE,
) = range(19)


class Canvas:
    """Label, colour, depth (z-buffer) and light-emission layers of a scene."""

    def __init__(self, h: int, w: int) -> None:
        self.label = np.full((h, w), SKY, dtype=np.uint8)
        self.rgb = np.zeros((h, w, 3), dtype=np.float32)
        self.depth = np.full((h, w), np.inf, dtype=np.float32)
        self.emit = np.zeros((h, w, 3), dtype=np.float32)  # lit at night
        self.lamps: list[tuple[float, float, float]] = []  # (x, y, radius px)

    def paint(self, mask: np.ndarray, cls: int, color, depth, emit=None) -> np.ndarray:
        """Paints where ``mask`` is nearer than what is there; returns that."""
        depth = np.broadcast_to(np.asarray(depth, np.float32), mask.shape)
        vis = mask & (depth < self.depth)
        if not vis.any():
            return vis
        self.label[vis] = cls
        color = np.asarray(color, dtype=np.float32)
        self.rgb[vis] = color[vis] if color.ndim == 3 else color
        self.depth[vis] = depth[vis]
        if emit is None:
            self.emit[vis] = 0
        else:
            emit = np.asarray(emit, dtype=np.float32)
            self.emit[vis] = emit[vis] if emit.ndim == 3 else emit
        return vis
