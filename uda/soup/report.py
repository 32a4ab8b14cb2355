"""What a soup run shows: the comparison of the soup with its ingredients, the study's plots, the summary.

Every compared model (each ingredient, the uniform soup, the soup, and the
version serving now for ``promote=if-better``) has its mIoU on the same
splits; :func:`compare` makes the rows, metrics and table of them,
:func:`log_comparison` logs them (``soup/comparison.json`` as an MLflow
table, ``soup/comparison.md``), :func:`print_summary` prints them with
what was registered and where ``serving`` points. :func:`save_study_plots`
draws the Optuna study.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .mixing import format_weights

__all__ = ["Comparison", "compare", "log_comparison", "markdown", "print_summary", "save_study_plots"]


@dataclass(frozen=True)
class Comparison:
    """The compared models' scores.

    Attributes:
        splits: The splits compared (``agreement`` first for the label-free
            objective, then ``tune``, ``report``, ``val``).
        scores: Row name → split → mIoU.
        rows: The table: model, version, weights, each split's mIoU and the
            report split's mIoU per condition.
        metrics: ``<split>.mIoU.<row>`` and ``report.mIoU.soup.<condition>``
            (finite values only), for the run.
    """

    splits: list[str]
    scores: dict[str, dict[str, float]]
    rows: list[dict[str, Any]]
    metrics: dict[str, float]


def compare(
    rows: Mapping[str, Mapping[str, Any]], objective_subset: str, conditions: Sequence[str]
) -> Comparison:
    """The comparison of the models in ``rows``.

    Args:
        rows: Row name → ``dict(version=..., weights=..., tables=...)``,
            ``tables`` a split → :class:`~uda.metrics.ConditionTable`; the
            soup's row is named ``soup``.
        objective_subset: ``tune`` or ``agreement``.
        conditions: The target conditions, in table order.
    """
    splits = [objective_subset] if objective_subset == "agreement" else []
    splits += ["tune", "report", "val"]
    scores = {name: {split: row["tables"][split].miou for split in splits} for name, row in rows.items()}
    metrics = {
        f"{split}.mIoU.{name}": value
        for name, row in scores.items()
        for split, value in row.items()
        if math.isfinite(value)
    }
    metrics.update(
        {
            f"report.mIoU.soup.{c}": v
            for c, v in rows["soup"]["tables"]["report"].per_condition_miou.items()
            if math.isfinite(v)
        }
    )
    return Comparison(splits, scores, _comparison_rows(rows, splits, conditions), metrics)


def _comparison_rows(
    rows: Mapping[str, Mapping[str, Any]], splits: Sequence[str], conditions: Sequence[str]
) -> list[dict[str, Any]]:
    table = []
    for name, row in rows.items():
        entry: dict[str, Any] = {"model": name, "version": row["version"], "weights": row["weights"]}
        for split in splits:
            entry[f"{split} mIoU"] = row["tables"][split].miou
        for condition in conditions:
            entry[f"report mIoU {condition}"] = row["tables"]["report"].per_condition_miou.get(condition)
        table.append(entry)
    return table


def log_comparison(comparison: Comparison) -> None:
    """Logs the table on the active run: ``soup/comparison.json`` and ``soup/comparison.md``."""
    import mlflow
    import pandas as pd

    mlflow.log_table(pd.DataFrame(comparison.rows), "soup/comparison.json")
    mlflow.log_text(markdown(comparison.rows), "soup/comparison.md")


def markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` (the first row's keys are the columns; floats to 4 places)."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            cells.append(f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_summary(
    model_name: str,
    method: str,
    version: Any,
    weights: Sequence[float],
    comparison: Comparison,
    promotion: Any,
    seconds_per_trial: float,
    trials: int,
) -> None:
    """Prints the comparison (without per-condition columns), the registered version and ``serving``.

    Args:
        model_name: The registered model.
        method: How the weights were chosen.
        version: The registered soup version (``ModelVersion``).
        weights: The soup's weights.
        comparison: From :func:`compare`.
        promotion: A :class:`~uda.soup.promotion.Promotion`.
        seconds_per_trial: Mean time of a search trial.
        trials: Number of timed trials (0: no timing shown).
    """
    shown = []
    for row in comparison.rows:
        row = {
            k: v
            for k, v in row.items()
            if k in ("model", "version", "weights") or k in {f"{s} mIoU" for s in comparison.splits}
        }
        if row["model"] == "soup":
            row["version"] = str(version.version)
        shown.append(row)
    print(markdown(shown), end="")
    timing = f"; {seconds_per_trial:.2f} s per trial over {trials} trials" if trials else ""
    print(
        f"Registered {model_name} version {version.version} "
        f"(kind=soup, weights {format_weights(weights)}, method "
        f"{method}){timing}."
    )
    if promotion.promoted:
        moved = (
            f"moved from version {promotion.serving_before} to {version.version}"
            if promotion.serving_before
            else f"set to version {version.version}"
        )
    else:
        moved = "unchanged"
    print(f"serving: {moved} ({promotion.reason}).")


def save_study_plots(study, out_dir: str | Path) -> list[Path]:
    """Saves Optuna's optimisation-history and parameter-importance plots.

    Uses ``optuna.visualization.matplotlib`` on the Agg backend (selected only
    if pyplot is not imported yet, so an interactive session is left alone).
    The importance plot needs at least two completed trials with different
    parameters; when it cannot be computed it is skipped with a warning.

    Args:
        study: An ``optuna.Study`` (e.g. ``SearchResult.study``).
        out_dir: Folder for the PNG files (created if needed).

    Returns:
        Paths of the files written (``optuna_history.png``,
        ``optuna_importance.png``).
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    plots = [
        ("optuna_history.png", optuna_plots.plot_optimization_history, 1),
        ("optuna_importance.png", optuna_plots.plot_param_importances, 2),
    ]
    written = []
    for file_name, plot, min_trials in plots:
        if num_complete < min_trials:
            warnings.warn(
                f"{file_name}: skipped, needs {min_trials} completed trial(s), the study has {num_complete}"
            )
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except (RuntimeError, ValueError, ZeroDivisionError) as error:
            warnings.warn(f"{file_name}: skipped, Optuna could not draw it: {error}")
            continue
        figure = axes.figure
        path = out_dir / file_name
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
