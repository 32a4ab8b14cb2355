"""The objects of a street scene: trees, poles with signs, traffic lights and
street lamps, people and riders, two-wheelers and box vehicles, drawn as
fronto-parallel billboards and boxes."""

from __future__ import annotations

import numpy as np

from .camera import Camera
from .canvas import (
    BICYCLE,
    BUS,
    CAR,
    LIGHT,
    MOTORCYCLE,
    PERSON,
    POLE,
    RIDER,
    ROAD,
    SIGN,
    TRAIN,
    TRUCK,
    VEGETATION,
    Canvas,
)
from .imaging import segment_distance, textured
from .palette import CAR_COLORS, CLOTHES, GLASS, SKIN, TYRE


class StreetObjects:
    """The objects' drawing methods, mixed into :class:`~.street.SceneBuilder`.

    They paint with its camera, canvas and noise fields and draw from its
    random stream: one stream per scene, so the order of the draws fixes the
    bytes of the image.
    """

    rng: np.random.Generator
    w: int
    h: int
    cam: Camera
    canvas: Canvas
    noise_fine: np.ndarray
    noise_mid: np.ndarray

    def u(self, a: float, b: float) -> float:
        return float(self.rng.uniform(a, b))

    def choice(self, options):
        return options[int(self.rng.integers(len(options)))]

    def _leaves(self, base=None) -> np.ndarray:
        base = base or (self.u(0.16, 0.26), self.u(0.30, 0.42), self.u(0.08, 0.16))
        leaves = textured(base, self.noise_mid, 0.35)
        return leaves * (1 + 0.3 * self.noise_fine[..., None])

    # -- objects (fronto-parallel billboards and boxes) -------------------
    def tree(self, x: float, z: float) -> None:
        cam, c = self.cam, self.canvas
        if z <= 1.0:
            return
        px, yw = cam.front_plane(z)
        trunk_h = self.u(1.8, 3.2)
        radius = self.u(1.4, 3.2)
        trunk = (np.abs(px - x) < 0.18) & (yw >= 0) & (yw < trunk_h + radius)
        bark = textured((0.30, 0.22, 0.15), self.noise_fine, 0.15)
        c.paint(trunk, VEGETATION, bark, z)
        cy = trunk_h + radius * 0.8
        wobble = np.clip(0.15 * radius * self.noise_mid, -0.5, 0.5)
        crown = ((px - x) / radius) ** 2 + ((yw - cy) / (radius * 1.1)) ** 2 < (1 + wobble) ** 2
        c.paint(crown, VEGETATION, self._leaves(), z - 0.2)

    def pole(self, x: float, z: float, kind: str) -> None:
        """A pole carrying a sign, a traffic light or a street lamp."""
        cam, c = self.cam, self.canvas
        px, yw = cam.front_plane(z)
        height = self.u(3.0, 4.5) if kind == "sign" else self.u(4.5, 7.0)
        metal = self.u(0.35, 0.55)
        shade = np.clip(1 - 0.25 * np.abs(px - x) / 0.12, 0.6, 1)[..., None]
        color = np.broadcast_to(np.array([metal, metal, metal * 1.05]), (self.h, self.w, 3)) * shade
        c.paint((np.abs(px - x) < 0.11) & (yw >= 0) & (yw < height), POLE, color, z)
        toward_road = -np.sign(x) if x != 0 else 1.0
        if kind == "sign":
            self.sign(x, height - 0.4, z - 0.05)
            if self.rng.random() < 0.4:
                self.sign(x, height - 1.2, z - 0.05)
        elif kind == "light":
            arm_end = x + toward_road * self.u(0.0, 3.0)
            arm = (
                (np.minimum(x, arm_end) - 0.05 <= px)
                & (px <= np.maximum(x, arm_end) + 0.05)
                & (np.abs(yw - height + 0.1) < 0.07)
            )
            c.paint(arm, POLE, color, z)
            self.traffic_light(arm_end, height - 0.1, z - 0.05)
        else:  # street lamp: arm and a lamp head, lit at night
            arm_end = x + toward_road * self.u(0.8, 2.0)
            arm = (
                (np.minimum(x, arm_end) <= px) & (px <= np.maximum(x, arm_end)) & (np.abs(yw - height) < 0.07)
            )
            c.paint(arm, POLE, color, z)
            head = (np.abs(px - arm_end) < 0.3) & (np.abs(yw - height + 0.08) < 0.1)
            c.paint(head, POLE, (0.7, 0.7, 0.68), z - 0.01, (1.2, 1.0, 0.7))
            # Remember the lit ground spot below the lamp for night scenes.
            gx, gy = cam.project(arm_end, 0.0, z)
            c.lamps.append((gx, gy, cam.f * 1.5 / z))

    def sign(self, x: float, yc: float, z: float) -> None:
        cam, c = self.cam, self.canvas
        px, yw = cam.front_plane(z)
        r = self.u(0.3, 0.45)
        dx, dy = px - x, yw - yc
        kind = self.choice(["circle", "square", "triangle", "diamond"])
        if kind == "circle":
            d = np.hypot(dx, dy)
            plate = d < r
            color = np.where((d > 0.75 * r)[..., None], (0.8, 0.1, 0.1), (0.95, 0.95, 0.95))
        elif kind == "square":
            plate = (np.abs(dx) < r) & (np.abs(dy) < r)
            inner = (np.abs(dx) < 0.5 * r) & (np.abs(dy) < 0.6 * r)
            color = np.where(inner[..., None], (0.95, 0.95, 0.95), (0.1, 0.3, 0.7))
        elif kind == "triangle":
            plate = (dy > -0.8 * r) & (dy < r - 1.7 * np.abs(dx))
            inner = (dy > -0.5 * r) & (dy < 0.6 * r - 1.7 * np.abs(dx))
            color = np.where(inner[..., None], (0.95, 0.95, 0.92), (0.8, 0.1, 0.1))
        else:
            plate = np.abs(dx) + np.abs(dy) < r
            color = np.where(
                (np.abs(dx) + np.abs(dy) < 0.8 * r)[..., None], (0.95, 0.8, 0.1), (0.95, 0.95, 0.95)
            )
        c.paint(plate, SIGN, color.astype(np.float32), z)

    def traffic_light(self, x: float, top: float, z: float) -> None:
        cam, c = self.cam, self.canvas
        px, yw = cam.front_plane(z)
        hw, height = 0.22, 1.0
        box = (np.abs(px - x) < hw) & (yw < top) & (yw > top - height)
        color = np.full((self.h, self.w, 3), 0.08, np.float32)
        emit = np.zeros_like(color)
        on = int(self.rng.integers(3))
        for i, lamp_col in enumerate([(1.0, 0.1, 0.05), (1.0, 0.7, 0.05), (0.1, 1.0, 0.4)]):
            lamp = np.hypot(px - x, yw - (top - 0.18 - 0.31 * i)) < 0.12
            color[lamp] = np.array(lamp_col) * (0.9 if i == on else 0.25)
            if i == on:
                emit[lamp] = lamp_col
        c.paint(box, LIGHT, color, z, emit)

    def person(self, x: float, z: float, cls: int = PERSON, seated: bool = False) -> None:
        cam, c = self.cam, self.canvas
        px, yw = cam.front_plane(z)
        hp = self.u(1.55, 1.9)
        base = 0.55 if seated else 0.0
        dx, skin = px - x, self.choice(SKIN)
        shirt, pants = self.choice(CLOTHES), self.choice(CLOTHES[:3])
        stride = self.u(0.0, 0.12)
        color = np.empty((self.h, self.w, 3), np.float32)
        color[:] = pants
        leg_top = base + 0.47 * hp
        legs = (
            (yw >= base)
            & (yw < leg_top)
            & (
                (np.abs(dx + 0.1 + stride * (yw < base + 0.25 * hp)) < 0.08)
                | (np.abs(dx - 0.1 - stride * (yw < base + 0.25 * hp)) < 0.08)
            )
        )
        if seated:  # thighs forward, shins down to the pedals
            legs = (yw >= base - 0.45) & (yw < leg_top) & (np.abs(dx) < 0.2)
        torso = (yw >= leg_top - 0.03) & (yw < base + 0.82 * hp) & (np.abs(dx) < 0.21)
        arms = (yw >= base + 0.5 * hp) & (yw < base + 0.8 * hp) & (np.abs(np.abs(dx) - 0.26) < 0.055)
        head_c = base + 0.9 * hp
        head = (dx / 0.1) ** 2 + ((yw - head_c) / 0.12) ** 2 < 1
        color[torso | arms] = shirt
        color[head] = skin
        hair = head & (yw > head_c + 0.04)
        color[hair] = (0.9, 0.9, 0.9) if cls == RIDER else (0.12, 0.09, 0.07)
        color *= 1 + 0.08 * self.noise_fine[..., None]
        c.paint(legs | torso | arms | head, cls, color, z)

    def two_wheeler(self, x: float, z: float, motor: bool, with_rider: bool) -> None:
        """Side view of a bicycle or motorcycle crossing or parked (billboard)."""
        cam, c = self.cam, self.canvas
        px, yw = cam.front_plane(z + 0.05)
        length = 1.9 if motor else 1.7
        r = 0.31 if motor else 0.34
        flip = 1 if self.rng.random() < 0.5 else -1
        wa, wb = x - flip * length / 2 + flip * r, x + flip * length / 2 - flip * r
        cls = MOTORCYCLE if motor else BICYCLE
        da, db = np.hypot(px - wa, yw - r), np.hypot(px - wb, yw - r)
        if motor:
            wheels = (da < r) | (db < r)
            body = ((px - x) / (length * 0.33)) ** 2 + ((yw - 0.65) / 0.25) ** 2 < 1
            body_col = self.choice(CAR_COLORS)
            color = np.where(wheels[..., None], TYRE, body_col).astype(np.float32)
            color[wheels & ((da < 0.4 * r) | (db < 0.4 * r))] = 0.6  # rims
            shape = wheels | body
        else:
            t = 0.045
            wheels = (np.abs(da - r) < t) | (np.abs(db - r) < t)
            seat = (x - flip * 0.15, 0.95)
            crank = (x, r)
            bar = (wb - flip * 0.1, 1.0)
            frame = np.zeros_like(wheels)
            for a, b in [
                ((wa, r), crank),
                (crank, seat),
                (seat, (wa, r)),
                (crank, (wb, r)),
                ((wb, r), bar),
                (seat, bar),
            ]:
                frame |= segment_distance(px, yw, a, b) < t
            color = np.where(wheels[..., None], TYRE, self.choice(CAR_COLORS)).astype(np.float32)
            shape = wheels | frame
        c.paint(shape, cls, color, z + 0.05)
        if with_rider:
            self.person(x - flip * 0.1, z, RIDER, seated=True)

    def vehicle(self, x: float, z: float, kind: str, oncoming: bool) -> None:
        """A box vehicle: rear (or front) face plus the side facing the camera."""
        cam, c = self.cam, self.canvas
        dims = {  # width, height, length, body colour choices
            "car": (1.8, self.u(1.4, 1.6), self.u(4.0, 4.8)),
            "truck": (2.5, self.u(3.2, 3.8), self.u(7, 10)),
            "bus": (2.55, self.u(3.0, 3.3), self.u(11, 13)),
            "train": (2.65, self.u(3.4, 3.7), self.u(22, 30)),
        }
        width, height, length = dims[kind]
        cls = {"car": CAR, "truck": TRUCK, "bus": BUS, "train": TRAIN}[kind]
        if kind == "car":
            body = np.array(self.choice(CAR_COLORS))
        elif kind == "truck":
            body = np.array(self.choice([(0.9, 0.9, 0.88), (0.75, 0.75, 0.72), (0.2, 0.3, 0.5)]))
        elif kind == "bus":
            body = np.array(
                self.choice([(0.85, 0.15, 0.1), (0.95, 0.8, 0.2), (0.2, 0.4, 0.7), (0.9, 0.9, 0.88)])
            )
        else:
            body = np.array(self.choice([(0.92, 0.92, 0.9), (0.9, 0.75, 0.1), (0.15, 0.35, 0.6)]))
        clear = 0.12 if kind != "train" else 0.25  # ground clearance
        if kind == "train":  # a tram: its rails run along the road (still road)
            mask, zg, xg = cam.ground()
            rails = mask & (c.label == ROAD) & (np.abs(np.abs(xg - x) - 0.72) < 0.05)
            c.rgb[rails] = (0.62, 0.62, 0.64)

        # Side face (the one the camera sees), drawn first: it is farther.
        side_x = x - np.sign(x) * width / 2
        if abs(x) > width / 2:
            mask, zs, yw = cam.side_plane(side_x)
            seg = mask & (zs >= z) & (zs < z + length) & (yw >= 0) & (yw < height)
            along = zs - z
            color = textured(body, self.noise_mid, 0.05)
            if kind == "car":
                cabin = (yw > 0.55 * height) & ~((along > 0.9) & (along < length - 0.6))
                seg &= ~cabin
                windows = (yw > 0.6 * height) & (yw < 0.92 * height) & (along > 1.1) & (along < length - 0.8)
            else:
                windows = (yw > 0.45 * height) & (yw < 0.85 * height) & ((along % 1.6) > 0.25)
                if kind == "truck":
                    windows &= along > length - 2.0  # only the cab
            color[windows] = GLASS
            color[yw < clear + 0.15] *= 0.4
            r = 0.33 if kind == "car" else 0.5
            for wz in (0.8, length - 0.9):
                wheel = np.hypot(along - wz, yw - r) < r
                color[wheel] = TYRE
                seg |= mask & wheel
            c.paint(seg, cls, color, zs)

        # Rear/front face at depth z.
        px, yw = cam.front_plane(z)
        dx = px - x
        face = (np.abs(dx) < width / 2) & (yw >= clear) & (yw < height)
        if kind == "car":
            face &= (yw < 0.58 * height) | (np.abs(dx) < width / 2 - 0.12)
        color = textured(body, self.noise_mid, 0.05)
        glass = (
            (np.abs(dx) < width / 2 - 0.2)
            & (yw > (0.6 if kind == "car" else 0.5) * height)
            & (yw < 0.92 * height)
        )
        color[glass] = GLASS
        if kind == "train":  # wide windscreen, livery stripe, pantograph
            color[(yw > 0.25 * height) & (yw < 0.35 * height)] = body * 0.35
            for a_, b_ in (
                ((x - 0.6, height), (x, height + 0.7)),
                ((x, height + 0.7), (x + 0.6, height)),
                ((x - 0.7, height + 0.7), (x + 0.7, height + 0.7)),
            ):
                face_extra = segment_distance(px, yw, a_, b_) < 0.04
                color[face_extra] = (0.2, 0.2, 0.2)
                face = face | face_extra
        emit = np.zeros((self.h, self.w, 3), np.float32)
        lamp = (np.abs(np.abs(dx) - (width / 2 - 0.2)) < 0.13) & (
            np.abs(yw - (0.45 if kind == "car" else 0.6)) < 0.08
        )
        lamp_col = (1.0, 0.95, 0.8) if oncoming else (0.9, 0.05, 0.05)
        color[lamp] = lamp_col
        emit[lamp] = lamp_col
        wheels = (np.abs(np.abs(dx) - (width / 2 - 0.25)) < 0.16) & (yw >= 0) & (yw < clear + 0.2)
        color[wheels] = TYRE
        c.paint(face | wheels, cls, color, z, emit)
        # Soft shadow under the vehicle.
        mask, zg, xg = cam.ground()
        under = (
            mask & (np.abs(xg - x) < width / 2 + 0.2) & (zg > z - 0.3) & (zg < z + length) & (c.label == ROAD)
        )
        c.rgb[under] *= 0.55
