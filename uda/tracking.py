"""MLflow bookkeeping shared by every entry point.

One entry point = one MLflow run with its parameters logged, the resolved
config logged as ``config.yaml`` and the git commit tagged. Under
``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and is resumed;
called directly, a run is created in the ``cs2acdc-uda`` experiment.

Also here, because every entry point's run needs them: the code version tag
(:func:`code_version`), lineage inputs (:func:`log_model_inputs`: the
teacher of a distillation, the ingredients of a soup, the evaluated model),
dataset inputs whose digest is their file list's (:func:`log_dataset_inputs`),
and the one context manager that sets an environment variable for a block
(:func:`temporary_env`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

from uda.config import dump_config

DEFAULT_EXPERIMENT = "cs2acdc-uda"
#: Seconds between two samples of the system metrics of a run.
SYSTEM_METRICS_INTERVAL_S = 10.0
CONFIG_ARTIFACT = "config.yaml"
# MLflow rejects param values longer than this (mlflow.utils.validation).
_MAX_PARAM_LENGTH = 6000


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` → ``{'a.b': 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def git_commit(path: str | Path = ".") -> str | None:
    """The checked-out commit of the project, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


CODE_VERSION_TAG = "uda.code_version"


def code_version(path: str | Path = ".") -> str | None:
    """The commit, plus a digest of uncommitted changes to tracked and untracked files.

    ``main`` reuses a finished step only when this matches, so an edited
    working tree never passes for the committed code.
    """
    commit = git_commit(path)
    if commit is None:
        return None
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        if not status.strip():
            return commit
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--binary"], cwd=path, capture_output=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    digest = hashlib.sha256(diff)
    for line in sorted(status.splitlines()):
        digest.update(line.encode())
        if line.startswith("??"):
            untracked = Path(path) / line[3:]
            if untracked.is_file():
                digest.update(untracked.read_bytes())
    return f"{commit}-dirty-{digest.hexdigest()[:12]}"


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_LENGTH else text[: _MAX_PARAM_LENGTH - 3] + "..."


@contextlib.contextmanager
def temporary_env(name: str, value: str | None) -> Iterator[None]:
    """Sets (or, with None, unsets) one environment variable for a block,
    such as the ``MLFLOW_*`` variables MLflow reads."""
    previous = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


#: The names MLflow makes up for a run nobody named (``nosy-dolphin-231``).
_GENERATED_RUN_NAME = re.compile(r"[a-z]+-[a-z]+-\d{1,4}")


@contextlib.contextmanager
def entry_point_run(
    entry_point: str,
    params: Mapping[str, Any],
    cfg: Mapping[str, Any] | None = None,
    nested: bool = False,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, under ``mlflow run``) the run of one entry point.

    Args:
        entry_point: Name of the entry point (``teacher``, ``distill``, …), tagged.
        params: The entry point's own parameters, logged as given.
        cfg: The resolved config: logged as the ``config.yaml`` artifact and
            flattened into ``cfg.*`` params so runs can be compared in the UI.
        nested: Start the run nested in the active one.
        run_id: Continue this run (a resumed training) instead of the one ``mlflow run``
            made (``MLFLOW_RUN_ID``) or a new one.
    """
    continuing = run_id or os.environ.get("MLFLOW_RUN_ID")
    if continuing is None and mlflow.active_run() is None and not nested:
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    readable = entry_point if cfg is None or "name" not in cfg else f"{entry_point} · {cfg['name']}"
    if not nested:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    # System metrics (CPU, memory, GPU) for every entry point; nested runs (soup trials) share
    # their parent's monitor.
    with mlflow.start_run(
        run_id=run_id, run_name=None if continuing else readable, nested=nested, log_system_metrics=not nested
    ) as run:
        tags = {"entry_point": entry_point}
        if _GENERATED_RUN_NAME.fullmatch(run.info.run_name or ""):
            tags["mlflow.runName"] = readable  # `mlflow run` named it like "nosy-dolphin-231"
        project_dir = Path(__file__).resolve().parent.parent
        version = code_version(project_dir)
        if version:
            tags[CODE_VERSION_TAG] = version
        commit = git_commit(project_dir)
        if commit and "mlflow.source.git.commit" not in run.data.tags:
            tags["mlflow.source.git.commit"] = commit
        if cfg is not None and "name" in cfg:
            tags["preset"] = str(cfg["name"])
        mlflow.set_tags(tags)
        logged = {k: _param_value(v) for k, v in params.items() if k not in run.data.params}
        if cfg is not None:
            logged.update({f"cfg.{k}": _param_value(v) for k, v in flatten(cfg).items()})
            mlflow.log_text(dump_config(cfg), CONFIG_ARTIFACT)
        # log_params raises if a key was already logged with another value (a resumed run).
        existing = run.data.params
        mlflow.log_params({k: v for k, v in logged.items() if k not in existing})
        yield run


def log_model_inputs(model_ids: Iterable[str | None]) -> list[str]:
    """Log logged models as inputs of the active run (MLflow 3 lineage: the run's
    "Logged models" inputs, e.g. the teacher of a distill run, a soup's ingredients).

    ``None`` entries (a model from a file, not from the store) are skipped.

    Returns:
        The model ids logged, without repeats.
    """
    from mlflow.entities import LoggedModelInput

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_model_inputs needs an active run.")
    client = mlflow.MlflowClient()
    logged = {m.model_id for m in client.get_run(run.info.run_id).inputs.model_inputs or []}
    ids = [m for m in dict.fromkeys(model_ids) if m and m not in logged]  # a resumed run logs none twice
    if ids:
        # The client's call, not mlflow.log_inputs: in MLflow 3.17 the fluent one accepts
        # models only on Databricks, while every store (SQL, the server) records them.
        client.log_inputs(run.info.run_id, models=[LoggedModelInput(model_id) for model_id in ids])
    return ids


#: (run id, root) → digest of the root's file list: a run lists each root once, however many
#: names and contexts it logs it under (the training target is the evaluation one too).
_ROOT_DIGESTS: dict[tuple[str, Path], str] = {}


def log_dataset_inputs(roots: Mapping[str, str | Path], context: str = "training") -> None:
    """Log dataset roots as MLflow run inputs (shown in the run's "Datasets used").

    Each input's digest is that of the root's file list (relative names and sizes,
    :func:`~uda.data.fingerprint.file_list_digest`), not of its path: another tree
    at the same path (a real ACDC where the embedded one was) is another dataset.
    MLflow keys a dataset by name and digest within an experiment, so identical
    copies at two paths are one dataset there, with the source of the first run that
    logged it; each run's own path stays in its ``cfg.data.*.root`` parameters.

    Args:
        roots: Dataset name (``cityscapes/train``) → folder.
        context: MLflow input context tag (training, evaluation, …).
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from uda.data.fingerprint import file_list_digest
    from uda.data.roots import classify_root

    for name, root in roots.items():
        # `data.cityscapes=real|embedded`: whether a run saw synthetic data, searchable in the UI.
        dataset = name.split("/")[0]
        mlflow.set_tag(f"data.{dataset}", classify_root(root, dataset).kind)
        path = Path(root).resolve()
        key = (mlflow.active_run().info.run_id, path)
        if key not in _ROOT_DIGESTS:
            _ROOT_DIGESTS[key] = file_list_digest(path)
        with warnings.catch_warnings():
            # MLflow registers the local-folder source twice and warns that the path is ambiguous.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path))
        _log_input_once(MetaDataset(source=source, name=name, digest=_ROOT_DIGESTS[key]), context)


def _log_input_once(dataset: Any, context: str, attempts: int = 5) -> None:
    """``mlflow.log_input``, safe when two runs log the same dataset at once.

    The tracking store inserts a dataset it has not seen yet; two runs doing so
    together (``main``'s teacher and source-only baseline, a team's runs on one
    experiment) make the second insert fail on the unique (experiment, name,
    digest) key, in SQLite as in PostgreSQL. The dataset then exists, and the
    same call links it to the run.
    """
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as err:
            text = str(err)
            raced = "UNIQUE constraint failed: datasets" in text or (
                "duplicate key" in text and "datasets" in text
            )
            if not raced or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def log_dataset_summary(summary, source_root: str | Path, target_root: str | Path) -> None:
    """Log what the data looks like: split sizes, class shares (table + chart), example images."""
    import matplotlib.pyplot as plt

    from uda import visualize

    mlflow.log_metrics({f"images.{key.replace('/', '.')}": n for key, n in summary.sizes.items()})
    mlflow.log_table(summary.class_table(), "data/class_pixel_share.json")
    figure = visualize.class_distribution_figure(
        {name: counts / max(counts.sum(), 1) for name, counts in summary.class_pixels.items()}
    )
    mlflow.log_figure(figure, "data/class_pixel_share.png")
    plt.close(figure)
    for row_index, row in enumerate(summary.examples):
        cells = [
            [img for img, _, _ in row],
            [visualize.overlay(img, lbl) if lbl is not None else img for img, lbl, _ in row],
        ]
        captions = [
            [cap for _, _, cap in row],
            ["labels" if lbl is not None else "no labels" for _, lbl, _ in row],
        ]
        mlflow.log_image(visualize.grid(cells, captions), f"data/examples_{row_index}.png")
    missing = {k: v for k, v in summary.missing_classes().items() if v}
    if missing:
        mlflow.set_tag("data.missing_classes", str(missing))
    log_dataset_inputs({"cityscapes": source_root, "acdc": target_root})
