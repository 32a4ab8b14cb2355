"""One random street scene, composed: the road cross-section, sky, skyline,
facades with walls, fences and hedges, then the objects placed along it (nearest
last), in the source's or the target's style, and the source's ego-vehicle hood.

Which optional elements a scene holds is drawn per domain; rare classes
(train, motorcycle, bus, truck, rider, wall) stay rare, and a forced class
guarantees that every class occurs in a split.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .camera import Camera
from .canvas import (
    BICYCLE,
    BUILDING,
    BUS,
    FENCE,
    LIGHT,
    MOTORCYCLE,
    PERSON,
    RIDER,
    ROAD,
    SIDEWALK,
    TERRAIN,
    TRAIN,
    TRUCK,
    VEGETATION,
    WALL,
    Canvas,
)
from .imaging import hash01, smooth_noise, textured
from .objects import StreetObjects
from .palette import FACADES, GLASS

# Per-scene probabilities of optional elements, by domain. Rare classes
# (train, motorcycle, bus, truck, rider, wall) stay rare.
_PROBS = {
    "cityscapes": dict(
        truck=0.25,
        bus=0.15,
        train=0.06,
        motorcycle=0.15,
        rider=0.25,
        bicycle=0.35,
        wall=0.3,
        fence=0.45,
        light=0.65,
        terrain=0.5,
        gap=0.2,
        person=0.85,
    ),
    "acdc": dict(
        truck=0.3,
        bus=0.12,
        train=0.05,
        motorcycle=0.1,
        rider=0.2,
        bicycle=0.25,
        wall=0.35,
        fence=0.55,
        light=0.45,
        terrain=0.8,
        gap=0.4,
        person=0.6,
    ),
}
#: The optional classes a scene can be made to contain, and their element in ``_PROBS``.
FORCEABLE = {
    TRUCK: "truck",
    BUS: "bus",
    TRAIN: "train",
    MOTORCYCLE: "motorcycle",
    RIDER: "rider",
    BICYCLE: "bicycle",
    WALL: "wall",
    FENCE: "fence",
    LIGHT: "light",
    TERRAIN: "terrain",
    PERSON: "person",
}


class SceneBuilder(StreetObjects):
    """Draws one random street scene (daylight albedo) onto a canvas."""

    def __init__(
        self, rng: np.random.Generator, w: int, h: int, domain: str, force_class: int | None
    ) -> None:
        self.rng, self.w, self.h, self.domain = rng, w, h, domain
        probs = dict(_PROBS[domain])
        if force_class in FORCEABLE:
            probs[FORCEABLE[force_class]] = 1.0
        if force_class == RIDER:  # riders come with a bicycle
            probs["bicycle"] = 1.0
        self.force_class = force_class
        self.probs = probs
        focal = w * (
            rng.uniform(0.95, 1.15) if domain == "cityscapes" else rng.uniform(0.75, 0.9)
        )  # GoPro (ACDC) is wider
        y_h = h * rng.uniform(0.38, 0.48)
        x_v = w * rng.uniform(0.42, 0.58)
        self.cam = Camera(w, h, focal, rng.uniform(1.3, 1.7), x_v, y_h)
        self.canvas = Canvas(h, w)
        self.noise_fine = rng.standard_normal((h, w)).astype(np.float32)
        self.noise_mid = smooth_noise(rng, h, w, 3)
        self.noise_big = smooth_noise(rng, h, w, 14)
        # Road cross-section (metres): road [-left, right], then sidewalks.
        self.road_l = rng.uniform(3.0, 7.5)
        self.road_r = rng.uniform(3.0, 7.5)
        self.walk_l = rng.uniform(1.8, 4.0)
        self.walk_r = rng.uniform(1.8, 4.0)
        self.z_far = rng.uniform(70, 160)

    def chance(self, key: str) -> bool:
        return bool(self.rng.random() < self.probs[key])

    # -- background ------------------------------------------------------
    def sky(self) -> None:
        cam, c = self.cam, self.canvas
        t = np.clip(self.cam.ys / max(cam.y_h, 1.0), 0, 1)[..., None]
        top = np.array([0.36, 0.56, 0.86]) * self.u(0.9, 1.1)
        bottom = np.array([0.74, 0.82, 0.92])
        sky = top * (1 - t) + bottom * t
        clouds = np.clip(self.noise_big * 0.6 + self.u(-0.6, 0.2), 0, 1)
        c.rgb[:] = sky * (1 - clouds[..., None]) + 0.93 * clouds[..., None]

    def ground(self) -> None:
        cam, c, rng = self.cam, self.canvas, self.rng
        mask, z, x = cam.ground()
        asphalt = self.u(0.30, 0.42)
        road = textured((asphalt, asphalt, asphalt * 1.03), self.noise_mid, 0.08)
        road += 0.025 * self.noise_fine[..., None]
        # Lane markings: dashed lane separators and solid edge lines.
        lane_w = 3.5
        marks = np.zeros_like(mask)
        for k in range(-3, 4):
            xl = k * lane_w + self.u(-0.3, 0.3)
            if -self.road_l + 1 < xl < self.road_r - 1:
                marks |= (np.abs(x - xl) < 0.08) & ((z % 9.0) < 3.0)
        marks |= np.abs(x + self.road_l - 0.3) < 0.07
        marks |= np.abs(x - self.road_r + 0.3) < 0.07
        if rng.random() < 0.3:  # zebra crossing
            z0 = self.u(8, 25)
            marks |= (z > z0) & (z < z0 + 3) & ((x % 1.0) < 0.5)
        road[marks] = 0.85
        in_road = mask & (x > -self.road_l) & (x < self.road_r)
        c.paint(in_road, ROAD, road, z)

        tile = self.u(0.50, 0.66)
        walk = textured((tile, tile * 0.97, tile * 0.93), self.noise_mid, 0.06)
        grout = ((x % 0.6) < 0.04) | ((z % 0.6) < 0.04)
        walk[grout] *= 0.8
        curb_l = (x > -self.road_l - 0.25) & (x <= -self.road_l)
        curb_r = (x < self.road_r + 0.25) & (x >= self.road_r)
        walk[curb_l | curb_r] = tile * 1.15
        side = mask & (
            ((x <= -self.road_l) & (x > -self.road_l - self.walk_l))
            | ((x >= self.road_r) & (x < self.road_r + self.walk_r))
        )
        grass = textured((0.42, 0.52, 0.26), self.noise_mid, 0.18)
        grass += 0.05 * self.noise_fine[..., None]
        if self.chance("terrain"):  # grass verge between road and sidewalk
            verge = self.u(0.8, 2.0)
            verge_mask = side & (
                (np.abs(x + self.road_l + verge / 2 + 0.3) < verge / 2)
                | (np.abs(x - self.road_r - verge / 2 - 0.3) < verge / 2)
            )
            c.paint(verge_mask, TERRAIN, grass, z)
        c.paint(side, SIDEWALK, walk, z)
        # Beyond the sidewalks: terrain (visible in gaps between buildings).
        c.paint(mask & (z < self.z_far * 1.5), TERRAIN, grass, z + 0.01)

    def skyline(self) -> None:
        """A row of distant buildings and trees across the end of the street."""
        cam, c = self.cam, self.canvas
        x, yw = cam.front_plane(self.z_far)
        pos = -200.0
        while pos < 200:
            width = self.u(8, 30)
            veg = self.rng.random() < (0.35 if self.domain == "cityscapes" else 0.6)
            height = self.u(4, 12) if veg else self.u(8, 28)
            seg = (x >= pos) & (x < pos + width) & (yw >= 0)
            if veg:
                top = height + 2.5 * self.noise_mid
                c.paint(seg & (yw < top), VEGETATION, self._leaves(), self.z_far)
            else:
                col = self.choice(FACADES[self.domain])
                c.paint(seg & (yw < height), BUILDING, textured(col, self.noise_mid, 0.05), self.z_far)
            pos += width

    def facades(self, side: int) -> None:
        """Buildings, walls, fences and hedges along one side (-1 left, +1 right)."""
        cam, c = self.cam, self.canvas
        edge = (self.road_l + self.walk_l) if side < 0 else (self.road_r + self.walk_r)
        x0 = side * edge
        mask, z, yw = cam.side_plane(x0)
        pos = self.u(0.0, 6.0)
        while pos < self.z_far:
            length = self.u(8, 28)
            seg = mask & (z >= pos) & (z < pos + length) & (yw >= 0)
            if self.chance("gap"):
                pos += length  # open lot: terrain and the skyline show
                if self.rng.random() < 0.6:
                    self.tree(side * (edge + self.u(1, 5)), pos - length / 2)
                continue
            height = self.u(7, 24) if self.domain == "cityscapes" else self.u(5, 16)
            col = np.array(self.choice(FACADES[self.domain]))
            color = textured(col, self.noise_mid, 0.06)
            # Windows on a regular grid in facade coordinates (perspective-correct).
            win_w, floor_h = self.u(2.2, 3.5), self.u(2.8, 3.4)
            fz = (z - pos) % win_w
            fy = yw % floor_h
            window = (
                (fz > 0.25 * win_w)
                & (fz < 0.75 * win_w)
                & (fy > 0.35 * floor_h)
                & (fy < 0.85 * floor_h)
                & (yw > floor_h)
                & (yw < height - 0.6)
            )
            shop = (yw > 0.4) & (yw < floor_h * 0.8) & (fz > 0.1 * win_w) & (fz < 0.9 * win_w)
            if self.rng.random() < 0.5:
                window |= shop
            color[window] = np.array(GLASS) + 0.08 * self.noise_mid[window, None]
            zf = np.where(seg, z, 0.0)
            lit = (hash01(np.floor(zf / win_w), np.floor(yw / floor_h)) < self.u(0.25, 0.6)) & window
            emit = np.zeros((self.h, self.w, 3), np.float32)
            emit[lit] = (1.0, 0.82, 0.5)
            c.paint(seg & (yw < height), BUILDING, color, z, emit)
            # Low structures in front of the facade.
            front_x = x0 - side * self.u(0.15, 0.6)
            if self.chance("wall"):
                self.low_structure(front_x, pos, length, WALL)
            elif self.chance("fence"):
                self.low_structure(front_x, pos, length, FENCE)
            elif self.rng.random() < 0.45:
                self.low_structure(front_x, pos, length, VEGETATION)
            pos += length

    def low_structure(self, x0: float, z0: float, length: float, cls: int) -> None:
        cam, c = self.cam, self.canvas
        mask, z, yw = cam.side_plane(x0)
        start = z0 + self.u(0, length * 0.3)
        end = min(z0 + length, start + self.u(4, 20))
        height = self.u(1.0, 2.6)
        seg = mask & (z >= start) & (z < end) & (yw >= 0)
        if cls == WALL:
            grey = self.u(0.5, 0.7)
            color = textured((grey, grey * 0.98, grey * 0.94), self.noise_mid, 0.1)
            color[(yw % 0.5) < 0.05] *= 0.75  # block courses
            c.paint(seg & (yw < height), WALL, color, z)
        elif cls == FENCE:
            wood = self.rng.random() < 0.5
            base = (0.55, 0.40, 0.26) if wood else (0.35, 0.37, 0.38)
            bars = (
                ((z % 0.35) < (0.22 if wood else 0.08))
                | (np.abs(yw - height * 0.85) < 0.06)
                | (np.abs(yw - 0.25) < 0.06)
            )
            color = textured(base, self.noise_mid, 0.1)
            c.paint(seg & (yw < height) & bars, FENCE, color, z)
        else:
            top = height + 0.3 * self.noise_mid
            c.paint(seg & (yw < top), VEGETATION, self._leaves(), z)

    # -- composition ----------------------------------------------------------
    def build(self) -> Canvas:
        rng = self.rng
        self.sky()
        self.skyline()
        self.ground()
        self.facades(-1)
        self.facades(+1)
        objects: list[tuple[float, Callable[[], None]]] = []

        def add(z: float, fn: Callable[[], None]) -> None:
            objects.append((z, fn))

        walk_x = lambda side: side * ((self.road_l if side < 0 else self.road_r) + self.u(0.4, 1.5))
        # Poles with signs, lights and lamps along the curbs.
        n_poles = int(rng.integers(2, 6))
        for i in range(n_poles):
            side = self.choice([-1, 1])
            kind = self.choice(["sign", "sign", "lamp"])
            if i == 0 and self.chance("light"):
                kind = "light"
            # Lights hang high: near the camera they would be above the image.
            z = self.u(14, 40) if kind == "light" else self.u(6, 45)
            add(z, lambda x=walk_x(side), z=z, k=kind: self.pole(x, z, k))
        # Trees on the sidewalks.
        for _ in range(int(rng.integers(1, 6 if self.domain == "cityscapes" else 8))):
            side = self.choice([-1, 1])
            z = self.u(5, 60)
            add(z, lambda x=walk_x(side) * 1.1, z=z: self.tree(x, z))
        # People on the sidewalks (near ones big).
        if self.chance("person"):
            for _ in range(int(rng.integers(1, 5))):
                side = self.choice([-1, 1])
                z = self.u(6, 35)
                add(z, lambda x=walk_x(side), z=z: self.person(x, z))
        # Cars in lanes and parked along the curb.
        lanes = [lx for lx in np.arange(-self.road_l + 1.75, self.road_r - 1.0, 3.5)]
        for _ in range(int(rng.integers(1, 6))):
            x = float(self.choice(lanes)) + self.u(-0.3, 0.3)
            z = self.u(5, 50)
            add(z, lambda x=x, z=z: self.vehicle(x, z, "car", oncoming=x < -1.0))
        for kind in ("truck", "bus", "train"):
            if self.chance(kind):
                x = 0.0 + self.u(-0.5, 0.5) if kind == "train" else float(self.choice(lanes))
                z = self.u(8, 30)
                add(z, lambda x=x, z=z, k=kind: self.vehicle(x, z, k, x < -1.0))
        for kind in ("bicycle", "motorcycle"):
            if self.chance(kind):
                rider = self.chance("rider")
                x = float(self.choice(lanes)) if rider else walk_x(self.choice([-1, 1]))
                z = self.u(5, 25)
                add(z, lambda x=x, z=z, m=(kind == "motorcycle"), r=rider: self.two_wheeler(x, z, m, r))
        for _, fn in sorted(objects, key=lambda o: -o[0]):
            fn()
        return self.canvas


def ego_hood(cam: Camera, rng: np.random.Generator) -> np.ndarray:
    """Cityscapes' ego-vehicle bonnet at the bottom of the image (ignored)."""
    height = cam.h * rng.uniform(0.06, 0.1)
    curve = (cam.xs - cam.w / 2) / (cam.w / 2)
    return cam.ys > cam.h - height * (1 - 0.5 * curve**2)
