"""Pictures a person looks at in the MLflow UI: label overlays, image grids, class charts.

Images are uint8 RGB numpy arrays (H, W, 3); label maps are trainId arrays
coloured with the Cityscapes palette from ``uda.data.labels``. Pillow draws
grids and captions; matplotlib (Agg) draws charts.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from uda.data.labels import CLASSES, IGNORE_INDEX, PALETTE, colorize


def denormalize(img, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised CHW float tensor/array back to a uint8 HWC RGB image."""
    arr = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    arr = arr.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(arr, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a coloured label map over an image; ignored pixels keep the image."""
    colours = colorize(train_ids).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    keep = (train_ids == IGNORE_INDEX)[..., None]
    return np.where(keep, image, blended.round()).astype(np.uint8)


def grid(
    rows: Sequence[Sequence[np.ndarray]],
    captions: Sequence[Sequence[str]] | None = None,
    pad: int = 2,
    caption_height: int = 12,
) -> np.ndarray:
    """Tile images row by row (each cell scaled to the first cell's size), with captions.

    Args:
        rows: Rows of uint8 RGB images (or trainId maps, which are coloured).
        captions: Optional text per cell, same shape as ``rows``.
        pad: White border between cells, in pixels.
        caption_height: Height of the caption strip above each cell.
    """
    cells = [[_as_rgb(c) for c in row] for row in rows]
    h, w = cells[0][0].shape[:2]
    ncols = max(len(r) for r in cells)
    top = caption_height if captions else 0
    canvas = Image.new("RGB", (ncols * (w + pad) + pad, len(cells) * (h + top + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            x, y = pad + j * (w + pad), pad + i * (h + top + pad)
            tile = Image.fromarray(cell)
            if tile.size != (w, h):
                tile = tile.resize((w, h), Image.NEAREST)
            canvas.paste(tile, (x, y + top))
            if captions:
                draw.text((x + 1, y), captions[i][j], fill=(0, 0, 0))
    return np.asarray(canvas)


def _as_rgb(cell: np.ndarray) -> np.ndarray:
    return colorize(cell) if cell.ndim == 2 else cell


def class_distribution_figure(pixel_fractions: Mapping[str, np.ndarray], title: str = "Class pixel share"):
    """Grouped bars of each class's pixel share, one group of bars per dataset/domain.

    Args:
        pixel_fractions: Name → array of 19 fractions (summing to ≤ 1).
        title: Figure title.

    Returns:
        A matplotlib Figure (log scale, so rare classes stay visible).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(pixel_fractions)
    x = np.arange(len(CLASSES))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(11, 4), dpi=100)
    for k, name in enumerate(names):
        ax.bar(
            x + (k - (len(names) - 1) / 2) * width, np.maximum(pixel_fractions[name], 1e-7), width, label=name
        )
    ax.set_yscale("log")
    ax.set_xticks(x, CLASSES, rotation=60, ha="right")
    for tick, colour in zip(ax.get_xticklabels(), PALETTE):
        tick.set_color(np.asarray(colour) / 255 * 0.8)
    ax.set_ylabel("share of labelled pixels")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def train_debug_image(debug: Mapping[str, Any], norm: Mapping[str, Any]) -> np.ndarray:
    """One training step's stages as a captioned grid (the ``train_debug`` image).

    Rows: source (image, label, student prediction); with pseudo-labels the
    target (image, pseudo-label, overlay) and the ClassMix batch (image,
    label, student prediction); with MIC masking the masked image (image,
    pseudo-label, overlay).

    Args:
        debug: First image of each stage (CPU tensors; see
            :class:`uda.train.trainer.StepOutput`).
        norm: ``data.img_norm_cfg`` (``mean``, ``std``).
    """
    mean, std = norm["mean"], norm["std"]

    def rgb(key: str) -> np.ndarray:
        return denormalize(debug[key], mean, std)

    def labels(key: str) -> np.ndarray:
        return debug[key].numpy().astype(np.int64)

    rows = [[rgb("source_img"), labels("source_gt"), labels("source_pred")]]
    captions = [["source", "source label", "student prediction"]]
    if "target_img" in debug:
        target = rgb("target_img")
        rows.append([target, labels("pseudo_label"), overlay(target, labels("pseudo_label"))])
        captions.append(["target", "pseudo-label", "pseudo-label overlay"])
        rows.append([rgb("mixed_img"), labels("mixed_label"), labels("mixed_pred")])
        captions.append(["mixed", "mixed label", "student prediction"])
    if "masked_img" in debug:
        masked = rgb("masked_img")
        rows.append([masked, labels("masked_label"), overlay(masked, labels("masked_label"))])
        captions.append(["masked target", "its pseudo-label", "overlay"])
    return grid(rows, captions)
