#!/usr/bin/env python
"""Benchmark the method, not the code: does adaptation, distillation and souping pay?

For each seed it runs the whole pipeline exactly as a user does
(``mlflow run . -e main -P seed=S``: the source-only baseline beside the MIC
teacher, the distilled student, the Optuna soup, its evaluation), then two
more soups of the same three checkpoints (``method=uniform`` and the
recipe's ``weights=3,3,4``, both ``promote=false``) and their evaluations.
Every figure is read back from the runs' own metrics in the store:

* target val (ACDC layout, every condition), overall and per condition: the
  training runs' last validation, the ``evaluate`` runs of the soups;
* the report split (the target-val images that did not tune the Optuna
  weights): the soup runs' ``report.mIoU.<row>``.

It prints mean ± std over the seeds, checks the goals of the embedded
default, logs the tables on a ``method-benchmark`` run of the same store
(``mlflow.log_table``) and, with ``--write-docs``, replaces the section
between the ``method-benchmark`` markers of ``docs/benchmarks.md``.

Usage::

    python tools/benchmark_method.py                       # 3 seeds of the default, ~20 min on 2 cores
    python tools/benchmark_method.py --seeds 0 --store /tmp/b --cfg-options "runner.max_iters=300"
    python tools/benchmark_method.py --write-docs

The store (``--store``, default ``runs/method-benchmark``) keeps every run:
``mlflow ui --backend-store-uri sqlite:///runs/method-benchmark/mlflow.db``.
A second call on the same store reuses the finished steps (main's reuse).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uda.data.layouts import ACDC_CONDITIONS  # noqa: E402
from uda.registry import STUDENT_MODEL_NAME  # noqa: E402
from uda.workflow_summary import last_miou  # noqa: E402

EXPERIMENT = "method-benchmark"
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- method-benchmark:start -->", "<!-- method-benchmark:end -->"
#: Rows of the table: label → (where its target-val figures are read).
ROWS = ("source-only", "MIC teacher", "distilled student", "uniform soup", "3:3:4 soup", "Optuna soup")
#: Goals of the embedded default (mIoU points).
GOAL_ADAPTATION = 5.0  # teacher − source-only, and larger than 2 std
GOAL_DISTILLATION = -2.0  # student − teacher
GOAL_SOUP = -0.5  # Optuna soup − best ingredient, report split
GOAL_TEACHER = 25.0  # teacher target-val mIoU


def _mlflow_run(store_uri: str, entry_point: str, params: dict[str, str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        entry_point,
        "--env-manager",
        "local",
        "--experiment-name",
        EXPERIMENT,
    ]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri}
    env.pop("MLFLOW_RUN_ID", None)
    started = time.perf_counter()
    print(f"[benchmark] {entry_point} {params}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"error: `mlflow run . -e {entry_point}` failed ({params}); see its output above.")
    print(f"[benchmark] {entry_point} done in {time.perf_counter() - started:.0f} s", flush=True)


def _val(client: Any, run_id: str, prefix: str) -> dict[str, float]:
    """Target-val mIoU (points) overall (``all``) and per condition: the run's last validation."""
    values = last_miou(client, run_id, prefix)
    return {key: 100 * values.get(key, math.nan) for key in ("all", *ACDC_CONDITIONS)}


def _newest(client: Any, experiment_id: str, filter_string: str) -> Any:
    runs = client.search_runs(
        [experiment_id], filter_string, order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        raise SystemExit(f"error: no run matches {filter_string!r} in the benchmark store.")
    return runs[0]


def run_seed(store_uri: str, seed: int, cfg_options: str) -> dict[str, Any]:
    """Run one seed and read its figures: ``{'val': {row: {...}}, 'report': {...}}``."""
    import mlflow

    base = {"seed": str(seed), "cfg_options": cfg_options}
    _mlflow_run(store_uri, "main", base)
    client = mlflow.MlflowClient(store_uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    main = _newest(
        client,
        experiment_id,
        f"tags.entry_point = 'main' and params.seed = '{seed}' and attributes.status = 'FINISHED'",
    )
    steps = {
        label: tag.split(" ")[0]
        for label, tag in ((k[len("step.") :], v) for k, v in main.data.tags.items() if k.startswith("step."))
    }
    optuna_soup = client.get_run(steps["soup"])
    aliases = optuna_soup.data.params["aliases"]
    figures: dict[str, Any] = {"val": {}, "report": {}, "seed": seed, "main_run": main.info.run_id}
    figures["val"]["source-only"] = _val(client, steps["source_only"], "val.")
    figures["val"]["MIC teacher"] = _val(client, steps["teacher"], "val.")
    figures["val"]["distilled student"] = _val(client, steps["distill"], "val.")
    figures["val"]["Optuna soup"] = _val(client, steps["evaluate"], "")

    report = {
        k[len("report.mIoU.") :]: 100 * v
        for k, v in optuna_soup.data.metrics.items()
        if k.startswith("report.mIoU.") and "." not in k[len("report.mIoU.") :]
    }
    figures["report"]["Optuna soup"] = report["soup"]
    figures["report"]["uniform soup"] = report.get("uniform", math.nan)
    ingredients = {k: v for k, v in report.items() if k not in ("soup", "uniform", "serving")}
    figures["report"]["best ingredient"] = max(ingredients.values())
    figures["best_ingredient"] = max(ingredients, key=ingredients.get)

    for label, params in (("uniform soup", {"method": "uniform"}), ("3:3:4 soup", {"weights": "3,3,4"})):
        _mlflow_run(store_uri, "soup", {**base, "aliases": aliases, "promote": "false", **params})
        soup_run = _newest(
            client,
            experiment_id,
            f"tags.entry_point = 'soup' and params.seed = '{seed}' "
            "and params.promote = 'false' and "
            f"params.{'method' if 'method' in params else 'weights'}"
            f" = '{next(iter(params.values()))}'",
        )
        model = f"models:/{STUDENT_MODEL_NAME}/{soup_run.data.tags['soup.version']}"
        _mlflow_run(store_uri, "evaluate", {"cfg_options": cfg_options, "model": model})
        evaluation = _newest(
            client, experiment_id, f"tags.entry_point = 'evaluate' and params.model = '{model}'"
        )
        figures["val"][label] = _val(client, evaluation.info.run_id, "")
        if label == "3:3:4 soup":
            figures["report"][label] = 100 * soup_run.data.metrics["report.mIoU.soup"]
    return figures


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def _cell(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return "-" if not math.isfinite(mean) else f"{mean:.1f} ± {std:.1f}"


def tables(results: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown section and the records logged as an MLflow table."""
    seeds = ", ".join(str(r["seed"]) for r in results)
    columns = ["all", *ACDC_CONDITIONS]
    lines = [
        f"Target val mIoU (%), mean ± std over seeds {seeds}:",
        "",
        "| model | target val | " + " | ".join(ACDC_CONDITIONS) + " |",
        "|---|---:|" + "---:|" * len(ACDC_CONDITIONS),
    ]
    records = []
    for row in ROWS:
        cells = [_cell([r["val"][row][c] for r in results]) for c in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
        for r in results:
            records.append(
                {
                    "seed": r["seed"],
                    "model": row,
                    "split": "val",
                    **{f"mIoU {c}": r["val"][row][c] for c in columns},
                }
            )
    lines += [
        "",
        "Report split (target-val images that did not tune the Optuna weights), mIoU (%):",
        "",
        "| seed | best ingredient | Optuna soup | uniform soup | 3:3:4 soup |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        rep = r["report"]
        lines.append(
            f"| {r['seed']} | {r['best_ingredient']} {rep['best ingredient']:.2f} | "
            f"{rep['Optuna soup']:.2f} | {rep['uniform soup']:.2f} | {rep['3:3:4 soup']:.2f} |"
        )
        for name in ("best ingredient", "Optuna soup", "uniform soup", "3:3:4 soup"):
            records.append({"seed": r["seed"], "model": name, "split": "report", "mIoU all": rep[name]})
    lines += ["", *goal_lines(results)]
    return "\n".join(lines) + "\n", records


def goal_lines(results: list[dict[str, Any]]) -> list[str]:
    def column(row: str) -> list[float]:
        return [r["val"][row]["all"] for r in results]

    adaptation = [t - s for t, s in zip(column("MIC teacher"), column("source-only"))]
    distillation = [s - t for s, t in zip(column("distilled student"), column("MIC teacher"))]
    soup = [r["report"]["Optuna soup"] - r["report"]["best ingredient"] for r in results]
    teacher_mean, teacher_std = _mean_std(column("MIC teacher"))
    source_mean, source_std = _mean_std(column("source-only"))
    gap, _ = _mean_std(adaptation)
    spread = 2 * max(teacher_std, source_std)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    return [
        "| goal | measured | |",
        "|---|---|---|",
        f"| teacher − source-only ≥ +{GOAL_ADAPTATION:.0f} points and > 2 std | {gap:+.1f} "
        f"(2 std = {spread:.1f}; per seed {', '.join(f'{v:+.1f}' for v in adaptation)}) | "
        f"{verdict(gap >= GOAL_ADAPTATION and gap > spread)} |",
        f"| student ≥ teacher {GOAL_DISTILLATION:+.0f} points | {_mean_std(distillation)[0]:+.1f} "
        f"(per seed {', '.join(f'{v:+.1f}' for v in distillation)}) | "
        f"{verdict(_mean_std(distillation)[0] >= GOAL_DISTILLATION)} |",
        f"| Optuna soup ≥ best ingredient {GOAL_SOUP:+.1f} on the report split | {_mean_std(soup)[0]:+.2f} "
        f"(per seed {', '.join(f'{v:+.2f}' for v in soup)}) | {verdict(_mean_std(soup)[0] >= GOAL_SOUP)} |",
        f"| teacher target-val mIoU ≥ {GOAL_TEACHER:.0f} % | {teacher_mean:.1f} ± {teacher_std:.1f} | "
        f"{verdict(teacher_mean >= GOAL_TEACHER)} |",
    ]


def write_docs(section: str, path: Path = DOCS) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: {path} has no {START} … {END} markers to replace.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{section}{END}{tail}")


def log_benchmark(
    store_uri: str, section: str, records: list[dict[str, Any]], args: argparse.Namespace
) -> str:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(store_uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="method-benchmark") as run:
        mlflow.set_tag("entry_point", "method-benchmark")
        mlflow.log_params({"seeds": args.seeds, "cfg_options": args.cfg_options or "''"})
        mlflow.log_table(pd.DataFrame(records), "method_benchmark.json")
        mlflow.log_text(section, "method_benchmark.md")
        frame = pd.DataFrame([r for r in records if r["split"] == "val"])
        for model, group in frame.groupby("model"):
            key = model.replace(" ", "_").replace(":", "-")
            mlflow.log_metric(f"{key}.mean", float(group["mIoU all"].mean()))
            mlflow.log_metric(f"{key}.std", float(group["mIoU all"].std(ddof=1)) if len(group) > 1 else 0.0)
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument(
        "--store",
        default=str(ROOT / "runs" / "method-benchmark"),
        help="folder of the benchmark's tracking store (kept, reused)",
    )
    parser.add_argument("--cfg-options", default="", help="overrides passed to every step")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the section in {DOCS.name}")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be integers separated by commas, got {args.seeds!r}")
    if not seeds:
        parser.error("--seeds names no seed")
    store = Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    store_uri = f"sqlite:///{store / 'mlflow.db'}"
    import mlflow

    client = mlflow.MlflowClient(store_uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT, artifact_location=(store / "artifacts").as_uri())
    started = time.perf_counter()
    results = [run_seed(store_uri, seed, args.cfg_options) for seed in seeds]
    section, records = tables(results)
    run_id = log_benchmark(store_uri, section, records, args)
    print()
    print(section)
    print(f"Logged on run {run_id} of {store_uri} ({time.perf_counter() - started:.0f} s in all).")
    if args.write_docs:
        write_docs(section)
        print(f"Wrote the section of {DOCS.relative_to(ROOT)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
