"""Reporting an evaluation: its metrics, tables, figures and panels logged to
the active MLflow run, and the plain-text table the evaluate entry point prints.

mlflow is imported inside the ``log_*`` functions only, so the rest of
:mod:`uda.evaluation` works without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from uda import visualize
from uda.data.layouts import Sample
from uda.metrics import ConditionTable

from .scoring import EvaluationResult
from .submission import SubmissionResult


def format_table(table: ConditionTable) -> str:
    """A plain-text summary: overall and per-condition mIoU/aAcc, per-class IoU (%)."""

    def pct(value: float) -> str:
        return "  n/a" if math.isnan(value) else f"{100 * value:5.1f}"

    lines = [
        f"{'':14s} {'mIoU':>5s} {'aAcc':>5s} {'mAcc':>5s}",
        f"{'all':14s} {pct(table.miou)} {pct(table.overall.pixel_accuracy)} "
        f"{pct(table.overall.mean_accuracy)}",
    ]
    for condition, metrics in table.per_condition.items():
        lines.append(
            f"{condition:14s} {pct(metrics.miou)} {pct(metrics.pixel_accuracy)} {pct(metrics.mean_accuracy)}"
        )
    lines.append("")
    lines.append(f"{'class':14s} {'IoU':>5s}  " + " ".join(f"{c[:5]:>5s}" for c in table.per_condition))
    for class_id, name in enumerate(table.class_names):
        per_condition = " ".join(pct(m.iou[class_id]) for m in table.per_condition.values())
        lines.append(f"{name:14s} {pct(table.overall.iou[class_id])}  {per_condition}")
    return "\n".join(lines)


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Row dicts → column lists (NaN → None, so the JSON table stays valid)."""
    columns: dict[str, list] = {key: [] for key in rows[0]} if rows else {}
    for row in rows:
        for key, value in row.items():
            is_nan = isinstance(value, float) and math.isnan(value)
            columns[key].append(None if is_nan else value)
    return columns


def _condition_rows(result: EvaluationResult) -> list[dict[str, Any]]:
    """One row for all images, then one per condition."""
    named = [("all", result.table.overall)] + list(result.table.per_condition.items())
    return [
        {
            "condition": condition,
            "mIoU": m.miou,
            "aAcc": m.pixel_accuracy,
            "mAcc": m.mean_accuracy,
            "pixels": m.num_pixels,
        }
        for condition, m in named
    ]


def log_evaluation(
    result: EvaluationResult, prefix: str = "", artifact_dir: str = "evaluation", model_id: str | None = None
) -> dict[str, float]:
    """Log an :class:`~uda.evaluation.EvaluationResult` to the active MLflow run.

    Metrics (fractions in [0, 1]; NaN ones left out): ``mIoU``, ``aAcc``,
    ``mAcc``, ``IoU.<class>``, ``mIoU.<condition>``, ``aAcc.<condition>``,
    ``images_per_second``, ``num_images``, each with ``prefix``. Artifacts under
    ``artifact_dir``: ``per_class.json`` and ``per_condition.json`` (tables),
    ``confusion_matrix.json`` (raw counts, overall and per condition),
    ``confusion_matrix.png``, ``per_class_iou.png``, ``overlays/*.png``.

    Args:
        result: From :func:`~uda.evaluation.evaluate`.
        prefix: Metric-name prefix (e.g. ``val.``).
        artifact_dir: Artifact folder.
        model_id: MLflow 3 logged-model id (``check_model_uri(uri).model_id``): the
            metrics are linked to that model too.

    Returns:
        The logged metrics.
    """
    import mlflow

    metrics = result.table.to_flat_dict(prefix)
    metrics[f"{prefix}images_per_second"] = result.images_per_second
    metrics[f"{prefix}num_images"] = float(result.num_images)
    metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
    mlflow.log_metrics(metrics, model_id=model_id)
    mlflow.log_table(_columns(result.table.rows()), f"{artifact_dir}/per_class.json")
    mlflow.log_table(_columns(_condition_rows(result)), f"{artifact_dir}/per_condition.json")
    mlflow.log_dict(
        {
            "classes": list(result.table.class_names),
            "rows": "ground truth",
            "columns": "prediction",
            "overall": result.confusion.matrix.cpu().tolist(),
            "per_condition": {name: m.matrix.cpu().tolist() for name, m in result.metrics.matrices.items()},
        },
        f"{artifact_dir}/confusion_matrix.json",
    )
    figures = {
        "confusion_matrix": visualize.confusion_matrix_figure(result.confusion, result.table.class_names),
        "per_class_iou": visualize.per_class_iou_figure(result.table),
    }
    import matplotlib.pyplot as plt  # after visualize chose the Agg backend

    for name, figure in figures.items():
        mlflow.log_figure(figure, f"{artifact_dir}/{name}.png")
        plt.close(figure)
    _log_overlays(result.overlays, artifact_dir)
    return metrics


def _log_overlays(overlays: Sequence[tuple[Sample, np.ndarray]], artifact_dir: str) -> None:
    import mlflow

    for k, (sample, panel) in enumerate(overlays):
        mlflow.log_image(panel, f"{artifact_dir}/overlays/{k:02d}_{sample.condition}_{sample.name}.png")


def log_submission(result: SubmissionResult, artifact_dir: str = "submission") -> None:
    """Log the submission zip, its throughput and a few image | prediction panels."""
    import mlflow

    mlflow.log_artifact(str(result.zip_path), artifact_dir)
    mlflow.log_metrics(
        {"num_images": float(result.num_images), "images_per_second": result.images_per_second}
    )
    mlflow.set_tag("submission.encoding", result.folder.name)
    _log_overlays(result.overlays, artifact_dir)
