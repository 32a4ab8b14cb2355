"""What ``main`` says at the end: the method's table on target val, then what serves and why.

The rows come from the child runs' own metrics, so the table and the runs in
``mlflow ui`` always agree:

* **source-only**: the baseline's last validation (``val.mIoU`` at its final
  iteration), the teacher's architecture trained on the source alone;
* **MIC teacher**: the teacher run's last validation (the version that was
  distilled);
* **distilled student**: the distill run's last validation (its last
  checkpoint, the newest soup ingredient);
* **soup**: the evaluate run of the soup (``mIoU``), the model ``serving``
  points at.

The report-split line compares the soup with its ingredients on the images
that did not tune its weights (the soup run's ``report.mIoU.<row>``), so a
soup that is worse than its best ingredient is said plainly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import mlflow

from uda.data.layouts import ACDC_CONDITIONS

__all__ = [
    "MethodRow",
    "MethodSummary",
    "last_miou",
    "registered_as",
    "summarize_workflow",
    "log_summary",
    "format_summary",
]

#: The rows, in the order of the story, with the run metric prefix that holds each one's score.
_ROWS = (
    ("source_only", "source-only", "val."),
    ("teacher", "MIC teacher", "val."),
    ("distill", "distilled student", "val."),
    ("evaluate", "soup (serving)", ""),
)
#: Rows of the soup's report split that are not ingredients.
_NOT_INGREDIENTS = frozenset({"soup", "uniform", "serving"})


@dataclass
class MethodRow:
    """One model of the table: target-val mIoU overall and per condition (fractions)."""

    key: str
    label: str
    run_id: str
    model: str
    miou: float
    per_condition: dict[str, float] = field(default_factory=dict)


@dataclass
class MethodSummary:
    rows: list[MethodRow]
    soup_report: float | None = None  #: the soup's report-split mIoU
    best_ingredient: tuple[str, float] | None = None  #: (alias, report-split mIoU)
    promote_reason: str | None = None

    def row(self, key: str) -> MethodRow | None:
        return next((r for r in self.rows if r.key == key), None)


def last_miou(client: Any, run_id: str, prefix: str) -> dict[str, float]:
    """A run's last validation: ``{"all": mIoU, <condition>: mIoU, …}`` (fractions), each
    metric ``<prefix>mIoU[.<condition>]`` at its highest step; missing ones are left out."""
    values = {}
    for key, name in [("all", f"{prefix}mIoU")] + [(c, f"{prefix}mIoU.{c}") for c in ACDC_CONDITIONS]:
        history = client.get_metric_history(run_id, name)
        if history:
            values[key] = max(history, key=lambda m: (m.step, m.timestamp)).value
    return values


def registered_as(steps: Mapping[str, Any]) -> dict[str, str]:
    """``row → "model vN"``: the registered version each row of the table stands for."""
    from uda.registry import SOURCE_ONLY_MODEL_NAME, STUDENT_MODEL_NAME, TEACHER_MODEL_NAME

    rows = {
        "source_only": (SOURCE_ONLY_MODEL_NAME, "source_only"),
        "teacher": (TEACHER_MODEL_NAME, "teacher"),
        "distill": (STUDENT_MODEL_NAME, "distill"),
        "evaluate": (STUDENT_MODEL_NAME, "soup"),
    }
    shown = {}
    for row, (name, step) in rows.items():
        version = getattr(steps.get(step), "version", None)
        if version:
            shown[row] = f"{name} v{version}"
    return shown


def summarize_workflow(
    steps: Mapping[str, Any], models: Mapping[str, str], client: Any = None
) -> MethodSummary:
    """Read the table from the child runs.

    Args:
        steps: :class:`~uda.workflow.StepResult` by label (``source_only``,
            ``teacher``, ``distill``, ``soup``, ``evaluate``).
        models: ``label → "name vN"`` shown in the model column.
        client: An ``MlflowClient`` (default: a new one).
    """
    client = client or mlflow.MlflowClient()
    rows = []
    for key, label, prefix in _ROWS:
        step = steps.get(key)
        if step is None:
            continue
        values = last_miou(client, step.run_id, prefix)
        rows.append(
            MethodRow(
                key,
                label,
                step.run_id,
                models.get(key, ""),
                values.get("all", math.nan),
                {c: values[c] for c in ACDC_CONDITIONS if c in values},
            )
        )
    summary = MethodSummary(rows)
    soup = steps.get("soup")
    if soup is not None:
        run = client.get_run(soup.run_id)
        report = {
            k[len("report.mIoU.") :]: v
            for k, v in run.data.metrics.items()
            if k.startswith("report.mIoU.") and "." not in k[len("report.mIoU.") :]
        }
        summary.soup_report = report.get("soup")
        ingredients = {k: v for k, v in report.items() if k not in _NOT_INGREDIENTS}
        if ingredients:
            summary.best_ingredient = max(ingredients.items(), key=lambda kv: kv[1])
        summary.promote_reason = run.data.tags.get("soup.promote_reason")
    return summary


def _points(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{100 * value:.1f}"


def markdown_table(summary: MethodSummary) -> str:
    conditions = [c for c in ACDC_CONDITIONS if any(c in r.per_condition for r in summary.rows)]
    lines = [
        "| model | registered as | target val mIoU | " + " | ".join(conditions) + " |",
        "|---|---|---:|" + "---:|" * len(conditions),
    ]
    for row in summary.rows:
        cells = [_points(row.per_condition.get(c, math.nan)) for c in conditions]
        lines.append(f"| {row.label} | {row.model} | {_points(row.miou)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _difference(summary: MethodSummary, a: str, b: str) -> float | None:
    ra, rb = summary.row(a), summary.row(b)
    if ra is None or rb is None or not (math.isfinite(ra.miou) and math.isfinite(rb.miou)):
        return None
    return 100 * (ra.miou - rb.miou)


def format_summary(summary: MethodSummary, serving_version: str | None, model_name: str) -> str:
    """The printout: the table (mIoU in %), the gains, then ``serving`` and why."""
    lines = [
        "",
        "The method on target val (mIoU %, each model's own run):",
        "",
        markdown_table(summary).rstrip(),
    ]
    gains = []
    for a, b, text in (
        ("teacher", "source_only", "adaptation (MIC teacher − source-only)"),
        ("distill", "teacher", "distillation (student − teacher)"),
        ("evaluate", "distill", "soup (soup − student)"),
    ):
        value = _difference(summary, a, b)
        if value is not None:
            gains.append(f"{text} {value:+.1f}")
    if gains:
        lines += ["", "Points: " + "; ".join(gains) + "."]
    if serving_version is not None:
        why = f" ({summary.promote_reason})" if summary.promote_reason else ""
        lines += [
            "",
            f"serving → {model_name} version {serving_version}, the soup{why}: the recipe "
            "serves its final soup.",
        ]
    if summary.soup_report is not None and summary.best_ingredient is not None:
        alias, best = summary.best_ingredient
        if summary.soup_report < best:
            lines.append(
                f"On the report split (target-val images that did not tune the weights) the soup "
                f"scores {100 * summary.soup_report:.2f} and its best ingredient {alias} "
                f"{100 * best:.2f}: the soup is not the best model there. To move `serving` only "
                "when a soup beats the model serving now, run the soup step with "
                "-P promote=if-better."
            )
        else:
            lines.append(
                f"On the report split (target-val images that did not tune the weights) the soup "
                f"scores {100 * summary.soup_report:.2f}, its best ingredient {alias} "
                f"{100 * best:.2f}."
            )
    return "\n".join(lines) + "\n"


def summary_records(summary: MethodSummary) -> list[dict[str, Any]]:
    """The table as records (fractions), for ``mlflow.log_table``."""
    return [
        {
            "model": r.label,
            "registered as": r.model,
            "run": r.run_id,
            "target val mIoU": r.miou,
            **{f"mIoU {c}": r.per_condition.get(c, math.nan) for c in ACDC_CONDITIONS},
        }
        for r in summary.rows
    ]


def log_summary(summary: MethodSummary, text: str) -> None:
    """Log the table on the active (main) run: metrics ``method.<row>.mIoU[.<condition>]``,
    the table ``method/summary.json`` and the printout ``method/summary.md``."""
    import pandas as pd

    metrics = {}
    for row in summary.rows:
        if math.isfinite(row.miou):
            metrics[f"method.{row.key}.mIoU"] = row.miou
        metrics.update(
            {f"method.{row.key}.mIoU.{c}": v for c, v in row.per_condition.items() if math.isfinite(v)}
        )
    mlflow.log_metrics(metrics)
    mlflow.log_table(pd.DataFrame(summary_records(summary)), "method/summary.json")
    mlflow.log_text(text, "method/summary.md")
