"""Pictures a person looks at in the MLflow UI: label overlays, image grids,
prediction panels, class charts and the evaluation's figures.

Images are uint8 RGB numpy arrays (H, W, 3); label maps are trainId arrays
coloured with the Cityscapes palette from ``uda.data.labels``. Pillow draws
grids and captions; matplotlib (Agg, imported by the figures only) draws charts.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from uda.data.labels import CLASSES, IGNORE_INDEX, PALETTE, colorize
from uda.metrics import ConditionTable, ConfusionMatrix

#: Long edge of the images in the prediction panels (pixels).
PANEL_WIDTH = 480


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


def thumbnail(image: np.ndarray, width: int = PANEL_WIDTH) -> np.ndarray:
    """``image`` shrunk (bilinear, ratio kept) to ``width`` pixels, if it is wider."""
    if image.shape[1] <= width:
        return image
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def prediction_panel(
    image: np.ndarray, prediction: np.ndarray, label: np.ndarray | None = None, caption: str = ""
) -> np.ndarray:
    """image | ground truth | prediction (Cityscapes colours) in one row, with captions.

    Args:
        image: uint8 RGB image, shrunk to :data:`PANEL_WIDTH` (the label maps follow it).
        prediction: ``(H, W)`` trainIds.
        label: ``(H, W)`` ground-truth trainIds (255 = ignore); None leaves its cell out.
        caption: Caption of the image (e.g. ``condition: name``).
    """
    cells, captions = [thumbnail(image)], [caption]
    if label is not None:
        cells.append(colorize(label.astype(np.uint8)))
        captions.append("ground truth")
    cells.append(colorize(prediction.astype(np.uint8)))
    captions.append("prediction")
    return grid([cells], [captions])


def panel_indices(conditions: Sequence[str], count: int) -> list[int]:
    """Which of the images (by their conditions) get a panel: the first image of
    each condition, then the next ones, ``count`` in all, in order."""
    if count <= 0:
        return []
    chosen, seen = [], set()
    for i, condition in enumerate(conditions):
        if condition not in seen:
            seen.add(condition)
            chosen.append(i)
    first = set(chosen)
    rest = [i for i in range(len(conditions)) if i not in first]
    return sorted((chosen + rest)[:count])


def _pyplot():
    """matplotlib's pyplot on the Agg backend (figures for files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def class_distribution_figure(pixel_fractions: Mapping[str, np.ndarray], title: str = "Class pixel share"):
    """Grouped bars of each class's pixel share, one group of bars per dataset/domain.

    Args:
        pixel_fractions: Name → array of 19 fractions (summing to ≤ 1).
        title: Figure title.

    Returns:
        A matplotlib Figure (log scale, so rare classes stay visible).
    """
    plt = _pyplot()
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


def confusion_matrix_figure(
    confusion: ConfusionMatrix | torch.Tensor | np.ndarray,
    class_names: Sequence[str] = CLASSES,
    title: str = "Confusion matrix (rows: ground truth, share of its pixels)",
):
    """Row-normalised confusion matrix (each row sums to 1: recall on the
    diagonal); rows of classes without ground-truth pixels stay blank.

    Args:
        confusion: A :class:`ConfusionMatrix` or its ``(C, C)`` counts
            (rows = ground truth, columns = prediction).
        class_names: Tick labels.
        title: Figure title.

    Returns:
        A matplotlib Figure.
    """
    plt = _pyplot()
    counts = confusion.matrix if isinstance(confusion, ConfusionMatrix) else confusion
    counts = torch.as_tensor(counts).detach().cpu().double().numpy()
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(0.45 * n + 3, 0.45 * n + 2), dpi=100)
    image = ax.imshow(np.ma.masked_invalid(shares), cmap="Blues", vmin=0, vmax=1)
    for (row, col), share in np.ndenumerate(shares):
        if np.isfinite(share) and share >= 0.005:
            ax.text(
                col,
                row,
                f"{100 * share:.0f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if share > 0.5 else "black",
            )
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="share of the row")
    fig.tight_layout()
    return fig


def per_class_iou_figure(table: ConditionTable, title: str | None = None):
    """Per-class IoU bars (all images; Cityscapes colours) with each
    condition's IoU as markers; classes absent from prediction and ground
    truth (NaN) are marked ``n/a``.

    Returns:
        A matplotlib Figure.
    """
    plt = _pyplot()
    names = list(table.class_names)
    x = np.arange(len(names))
    overall = np.asarray(table.overall.iou, dtype=float)
    colours = [np.asarray(c) / 255 for c in PALETTE] if len(names) == len(PALETTE) else None
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=100)
    ax.bar(
        x,
        np.nan_to_num(overall),
        color=colours,
        edgecolor="black",
        linewidth=0.5,
        label=f"all (mIoU {100 * table.miou:.1f})",
    )
    markers = "ov^sDP*X"
    for k, (condition, metrics) in enumerate(table.per_condition.items()):
        ax.scatter(
            x,
            np.asarray(metrics.iou, dtype=float),
            marker=markers[k % len(markers)],
            s=22,
            zorder=3,
            label=f"{condition} ({100 * metrics.miou:.1f})",
        )
    for i in np.flatnonzero(np.isnan(overall)):
        ax.text(i, 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title(title or "Per-class IoU (bars: all images; markers: per condition)")
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
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
