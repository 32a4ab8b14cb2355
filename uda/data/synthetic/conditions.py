"""The appearance of each condition, applied to a painted canvas: clear
daylight for the source; fog (contrast loss toward grey with depth), night
(dark, sensor noise, lit windows, street lamps, headlights), rain (streaks,
wet dark road with reflections) and snow (white cover, flakes, low
saturation) for ACDC."""

from __future__ import annotations

import numpy as np

from .camera import Camera
from .canvas import (
    BUILDING,
    BUS,
    CAR,
    FENCE,
    LIGHT,
    ROAD,
    SIDEWALK,
    SIGN,
    SKY,
    TERRAIN,
    TRAIN,
    TRUCK,
    VEGETATION,
    WALL,
    Canvas,
)
from .imaging import box_blur, desaturate, smooth_noise


def daylight(c: Canvas, rng: np.random.Generator, hood: np.ndarray) -> np.ndarray:
    """The source's clear weather: exposure and white balance jitter, shadows, the dark ego hood."""
    h, w = c.label.shape
    img = c.rgb * rng.uniform(0.85, 1.12)
    img *= np.array([rng.uniform(0.95, 1.05), 1.0, rng.uniform(0.93, 1.05)])
    # Building shadows across the ground.
    ground = (c.label == ROAD) | (c.label == SIDEWALK) | (c.label == TERRAIN)
    shadow = smooth_noise(rng, h, w, 32) > rng.uniform(0.4, 1.2)
    img[ground & shadow] *= 0.75
    if hood is not None:
        shine = np.clip(1 - np.abs(np.linspace(-1, 1, w)), 0, 1)[None, :, None]
        img[hood] = (0.08 + 0.1 * shine * np.ones((h, 1, 1)))[hood]
    img += 0.012 * rng.standard_normal(img.shape).astype(np.float32)
    return img


def _fog(c: Canvas, rng: np.random.Generator, cam: Camera) -> np.ndarray:
    img = c.rgb * rng.uniform(0.8, 0.95)
    beta = rng.uniform(0.03, 0.07)  # extinction (1/m): visibility ~ 40-100 m
    airlight = np.array([0.72, 0.74, 0.76]) * rng.uniform(0.9, 1.08)
    t = np.exp(-beta * np.minimum(c.depth, 1e4))[..., None]
    img = img * t + airlight * (1 - t)
    img = desaturate(img, 0.35)
    img = box_blur(img, 1, passes=1) * 0.5 + img * 0.5
    img += 0.01 * rng.standard_normal(img.shape).astype(np.float32)
    return img


def _night(c: Canvas, rng: np.random.Generator, cam: Camera) -> np.ndarray:
    h, w = c.label.shape
    albedo = c.rgb
    ambient = rng.uniform(0.05, 0.12)
    img = albedo * ambient * np.array([0.8, 0.9, 1.25])
    sky = c.label == SKY
    glow = np.exp(-np.clip(cam.y_h - cam.ys, 0, None) / (0.25 * h))
    img[sky] = (np.array([0.02, 0.025, 0.05]) + np.array([0.12, 0.07, 0.03]) * glow[..., None])[sky]
    ground = (c.label == ROAD) | (c.label == SIDEWALK) | (c.label == TERRAIN)
    # Ego headlights light the road ahead.
    _, zg, xg = cam.ground()
    beam = np.exp(-zg / 14.0) * np.clip(1 - np.abs(xg) / (0.3 * zg + 2.0), 0, 1)
    img += albedo * (0.9 * beam)[..., None] * ground[..., None]
    # Street lamps: warm pools of light on what is below them.
    for gx, gy, radius in c.lamps:
        d2 = ((cam.xs - gx) / (2.0 * radius)) ** 2 + ((cam.ys - gy) / radius) ** 2
        pool = np.exp(-d2) * np.where(ground, 0.9, 0.35)
        img += albedo * pool[..., None] * np.array([1.0, 0.85, 0.6])
    # Emitters (windows, lamps, vehicle and traffic lights) and their glow.
    emit = c.emit * rng.uniform(0.8, 1.1)
    img = np.maximum(img, emit * 0.9)
    img += 0.6 * box_blur(emit, max(1, w // 80))
    # Low-light sensor noise, stronger in the dark.
    noise = rng.standard_normal((h, w, 1)).astype(np.float32) * 0.03
    noise = noise + rng.standard_normal((h, w, 3)).astype(np.float32) * 0.012
    img += noise
    return img


def _rain(c: Canvas, rng: np.random.Generator, cam: Camera) -> np.ndarray:
    h, w = c.label.shape
    img = desaturate(c.rgb * rng.uniform(0.55, 0.72), 0.4)
    sky = c.label == SKY
    img[sky] = (
        np.array([0.55, 0.57, 0.6]) * rng.uniform(0.85, 1.05) + 0.04 * smooth_noise(rng, h, w, 10)[..., None]
    )[sky]
    # Wet ground: darker, with blurred reflections of what stands above it.
    wet = (c.label == ROAD) | (c.label == SIDEWALK)
    rows = np.clip((2 * cam.y_h - cam.ys).astype(np.int64), 0, h - 1)
    mirrored = box_blur(img, 1)[rows, cam.xs.astype(np.int64)]
    puddles = np.clip(0.25 + 0.35 * smooth_noise(rng, h, w, 14), 0, 0.7)[..., None]
    img = np.where(wet[..., None], img * 0.6 * (1 - puddles) + mirrored * puddles, img)
    # Rain streaks: short slanted bright lines.
    streaks = np.zeros((h, w), np.float32)
    n = int(rng.integers(150, 400) * w * h / (256 * 144))
    slant = rng.uniform(-0.25, 0.25)
    x0, y0 = rng.uniform(0, w, n), rng.uniform(-10, h, n)
    length = rng.uniform(4, 12, n)
    for t in np.linspace(0, 1, 12):
        xi = (x0 + slant * length * t).astype(np.int64)
        yi = (y0 + length * t).astype(np.int64)
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        np.add.at(streaks, (yi[ok], xi[ok]), rng.uniform(0.08, 0.2))
    img += np.clip(streaks, 0, 0.35)[..., None] * np.array([0.9, 0.95, 1.0])
    img = box_blur(img, 1, passes=1) * 0.4 + img * 0.6
    img += 0.01 * rng.standard_normal(img.shape).astype(np.float32)
    return img


def _snow(c: Canvas, rng: np.random.Generator, cam: Camera) -> np.ndarray:
    h, w = c.label.shape
    img = desaturate(c.rgb, 0.5) * rng.uniform(0.8, 0.95)
    snow = np.array([0.92, 0.94, 0.97]) * rng.uniform(0.9, 1.02)
    flake_noise = 0.04 * rng.standard_normal((h, w, 1)).astype(np.float32)
    sky = c.label == SKY
    img[sky] = (np.array([0.82, 0.84, 0.87]) + 0.03 * smooth_noise(rng, h, w, 12)[..., None])[sky]
    # Snow cover: almost everywhere on terrain and sidewalks, on the road
    # except in the tyre tracks.
    cover = smooth_noise(rng, h, w, 10)
    _, zg, xg = cam.ground()
    tracks = np.zeros((h, w), bool)
    for lane in np.arange(-10.5, 10.6, 3.5):
        tracks |= np.abs(np.abs(xg - lane) - 0.8) < 0.35
    ground_cover = np.select(
        [c.label == TERRAIN, c.label == SIDEWALK, (c.label == ROAD) & tracks, c.label == ROAD],
        [cover > -1.2, cover > -0.5, cover > 1.2, cover > -0.2],
        False,
    )
    # Snow on top surfaces: rows just below an edge of a vegetation/structure/vehicle.
    tops = np.isin(c.label, [BUILDING, WALL, FENCE, VEGETATION, CAR, TRUCK, BUS, TRAIN, SIGN, LIGHT])
    k = max(1, h // 60)
    above = np.zeros_like(c.label)
    above[k:] = c.label[:-k]
    top_cover = tops & (above != c.label) & (cover > -0.8)
    leafy = (c.label == VEGETATION) & (smooth_noise(rng, h, w, 2) > 0.3)
    covered = ground_cover | top_cover | leafy
    img = np.where(covered[..., None], snow + flake_noise, img)
    # Falling flakes.
    flakes = np.zeros((h, w), np.float32)
    n = int(rng.integers(200, 600) * w * h / (256 * 144))
    xi, yi = rng.integers(0, w, n), rng.integers(0, h, n)
    np.add.at(flakes, (yi, xi), rng.uniform(0.4, 1.0, n))
    flakes = box_blur(flakes[..., None], 1, passes=1)[..., 0] * 3.0
    img = img * (1 - np.clip(flakes, 0, 0.8)[..., None]) + np.clip(flakes, 0, 0.8)[..., None] * 0.97
    img = img * 0.85 + 0.12  # hazy, low contrast
    img += 0.012 * rng.standard_normal(img.shape).astype(np.float32)
    return img


#: ACDC condition -> its appearance, ``f(canvas, rng, camera) -> float RGB``.
CONDITION_RENDERERS = {"fog": _fog, "night": _night, "rain": _rain, "snow": _snow}
