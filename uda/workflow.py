"""The whole recipe as one MLflow run: (teacher ‖ source-only) → distill → soup → evaluate → `serving`.

Like MLflow's multistep example, ``main`` runs every other entry point as a
child run (``mlflow.projects.run`` inside the active run) and reuses a step
that already finished with the same parameters and the same code version, so
re-running ``mlflow run .`` after an interruption or a change to a later step
only does the work that is missing. A step's outputs (registered model
versions) are passed on by explicit version, so a reused step always feeds the
next one the model it produced.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENTRY_POINT

from uda.errors import UserError
from uda.registry import (
    SOURCE_ONLY_MODEL_NAME,
    STUDENT_MODEL_NAME,
    TEACHER_MODEL_NAME,
    iteration_alias,
    iteration_of,
    run_versions,
)
from uda.soup.ingredients import last_checkpoints
from uda.tracking import CODE_VERSION_TAG, code_version

PROJECT_DIR = Path(__file__).resolve().parent.parent

#: Parameters that change how fast a step runs, not what it computes: a
#: finished run is reused whatever their value.
NOT_PART_OF_THE_RESULT = frozenset({"threads"})


@dataclass
class StepResult:
    """What one step of the pipeline did."""

    entry_point: str
    run_id: str
    reused: bool
    seconds: float
    version: str | None = None  #: the model version it registered last, when it matters


def find_finished_run(
    entry_point: str, parameters: Mapping[str, str], experiment_id: str, version: str
) -> Run | None:
    """The newest FINISHED run of ``entry_point`` with these parameters and code version.

    Mirrors ``_already_ran`` of MLflow's multistep example, keyed on our code
    version tag (commit plus a digest of uncommitted changes) instead of the
    bare commit, so local edits are never mistaken for the committed code.
    """
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}' "
        f"and tags.`{CODE_VERSION_TAG}` = '{version}' "
        f"and attributes.status = '{RunStatus.to_string(RunStatus.FINISHED)}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        # `mlflow run` logs the shell-quoted form of values with spaces or quotes ('' for empty).
        if all(
            run.data.params.get(k) in (str(v), shlex.quote(str(v)))
            for k, v in parameters.items()
            if k not in NOT_PART_OF_THE_RESULT
        ):
            return run
    return None


@dataclass
class PendingStep:
    """A step that was started (or found finished): :meth:`wait` gives its result."""

    label: str
    entry_point: str
    started: float
    submitted: Any = None  #: mlflow.projects.SubmittedRun; None when reused
    result: StepResult | None = None

    def wait(self) -> StepResult:
        if self.result is not None:
            return self.result
        if not self.submitted.wait():
            raise UserError(
                f"The {self.label} step failed (run {self.submitted.run_id}); see its output "
                "above. Fix the cause and run `mlflow run .` again: finished steps are reused."
            )
        seconds = time.perf_counter() - self.started
        mlflow.set_tag(f"step.{self.label}", self.submitted.run_id)
        mlflow.log_metric(f"step_seconds.{self.label}", seconds)
        print(f"[main] {self.label}: finished run {self.submitted.run_id} in {seconds:.0f} s", flush=True)
        self.result = StepResult(self.label, self.submitted.run_id, False, seconds)
        return self.result


def start_step(
    entry_point: str,
    parameters: Mapping[str, Any],
    experiment_id: str,
    label: str | None = None,
    run_name: str | None = None,
    reuse: bool = True,
) -> PendingStep:
    """Start one entry point as a child of the active run, or find an identical finished one.

    Args:
        entry_point: The MLproject entry point.
        parameters: Its parameters (values are turned into strings).
        experiment_id: Where the child run goes and where finished runs are looked for.
        label: The step's name in main's tags, metrics and printout (default: the entry point);
            two steps of one entry point (``teacher`` and ``source_only``) need two labels.
        run_name: Name of the child run in the UI.
        reuse: Look for a finished run with the same parameters and code version first.
    """
    label = label or entry_point
    parameters = {k: str(v) for k, v in parameters.items()}
    version = code_version(PROJECT_DIR)
    started = time.perf_counter()
    if reuse and version is not None:
        previous = find_finished_run(entry_point, parameters, experiment_id, version)
        if previous is not None:
            print(
                f"[main] {label}: reusing finished run {previous.info.run_id} "
                "(same parameters and code version)",
                flush=True,
            )
            mlflow.set_tag(f"step.{label}", f"{previous.info.run_id} (reused)")
            return PendingStep(
                label, entry_point, started, result=StepResult(label, previous.info.run_id, True, 0.0)
            )
    print(f"[main] {label}: running {entry_point} with {parameters}", flush=True)
    submitted = mlflow.projects.run(
        str(PROJECT_DIR),
        entry_point=entry_point,
        parameters=parameters,
        env_manager="local",
        experiment_id=experiment_id,
        synchronous=False,
        run_name=run_name,
    )
    return PendingStep(label, entry_point, started, submitted)


def wait_all(pending: list[PendingStep]) -> dict[str, StepResult]:
    """Wait for every step, even after one failed (none is left running on its own); then
    raise the first failure."""
    results: dict[str, StepResult] = {}
    failure: UserError | None = None
    for step in pending:
        try:
            results[step.label] = step.wait()
        except UserError as err:
            failure = failure or err
    if failure is not None:
        raise failure
    return results


def run_step(
    entry_point: str, parameters: Mapping[str, Any], experiment_id: str, reuse: bool = True, **names: Any
) -> StepResult:
    """Run one entry point as a child of the active run (see :func:`start_step`) and wait for it."""
    return start_step(entry_point, parameters, experiment_id, reuse=reuse, **names).wait()


def _last_version(model_name: str, step: StepResult) -> Any:
    versions = run_versions(model_name, step.run_id)
    if not versions:
        raise UserError(
            f"The {step.entry_point} run {step.run_id} registered no version of "
            f"{model_name!r}; it may have been deleted from the registry. Delete or rename "
            "that run (or pass different parameters) so the step runs again."
        )
    return versions[-1]


def run_workflow(
    *,
    preset: str,
    source_root: str,
    target_root: str,
    cfg_options: str,
    seed: str,
    device: str,
    iterations: int,
    soup_trials: int | None = None,
    threads: str = "auto",
) -> dict[str, StepResult]:
    """Chain the entry points inside the active MLflow run.

    The source-only baseline (the teacher entry point with ``uda.source_only=true``, into
    its own registered model, one checkpoint at the end) trains at the same time as the
    teacher, on the same budget: with ``threads=auto`` the two share the cores, and the
    baseline costs little extra wall time. Then distill → soup → evaluate.

    Args:
        preset, source_root, target_root, cfg_options, seed, device, threads:
            Passed to every step.
        iterations: The resolved ``runner.max_iters``: the baseline registers that
            checkpoint only.
        soup_trials: Optuna trials of the soup step (default: the preset's).

    Returns:
        The steps that ran or were reused, by label: ``source_only``, ``teacher``,
        ``distill``, ``soup``, ``evaluate``.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("run_workflow needs an active MLflow run (the main entry point's).")
    experiment_id = run.info.experiment_id
    common = {
        "preset": preset,
        "cfg_options": cfg_options,
        "seed": seed,
        "device": device,
        "threads": threads,
    }
    roots = {"source_root": source_root, "target_root": target_root}
    steps: dict[str, StepResult] = {}

    def name(label: str) -> str:
        return f"{label.replace('_', '-')} · {preset}"

    pending_teacher = start_step("teacher", {**common, **roots}, experiment_id, run_name=name("teacher"))
    pending_baseline = start_step(
        "teacher",
        {
            **common,
            **roots,
            "model_name": SOURCE_ONLY_MODEL_NAME,
            # last, so that they win over the user's cfg_options
            "cfg_options": f"{cfg_options} uda.source_only=true "
            f"checkpoint_config.interval={iterations}".strip(),
        },
        experiment_id,
        label="source_only",
        run_name=name("source_only"),
    )
    steps.update(wait_all([pending_teacher, pending_baseline]))
    teacher = _last_version(TEACHER_MODEL_NAME, steps["teacher"])
    steps["teacher"].version = str(teacher.version)
    baseline = run_versions(SOURCE_ONLY_MODEL_NAME, steps["source_only"].run_id)
    steps["source_only"].version = str(baseline[-1].version) if baseline else None
    steps["distill"] = run_step(
        "distill",
        {**common, **roots, "teacher": f"models:/{TEACHER_MODEL_NAME}/{teacher.version}"},
        experiment_id,
        run_name=name("distill"),
    )
    checkpoints = run_versions(STUDENT_MODEL_NAME, steps["distill"].run_id)
    steps["distill"].version = str(checkpoints[-1].version) if checkpoints else None
    aliases = ",".join(iteration_alias(iteration_of(v)) for v in last_checkpoints(checkpoints))
    soup_params = {**common, "target_root": target_root, "aliases": aliases, "weights": "optuna"}
    if soup_trials is not None:
        soup_params["trials"] = soup_trials
    steps["soup"] = run_step("soup", soup_params, experiment_id, run_name=name("soup"))
    soup = _last_version(STUDENT_MODEL_NAME, steps["soup"])
    steps["soup"].version = str(soup.version)
    steps["evaluate"] = run_step(
        "evaluate",
        {
            "preset": preset,
            "cfg_options": cfg_options,
            "device": device,
            "threads": threads,
            "target_root": target_root,
            "split": "val",
            "model": f"models:/{STUDENT_MODEL_NAME}/{soup.version}",
        },
        experiment_id,
        run_name=name("evaluate"),
    )
    mlflow.set_tags({"teacher_version": teacher.version, "soup_version": soup.version})
    return steps


def next_steps_text(port: int = 5000, tracking_uri: str | None = None) -> str:
    """What to run after the pipeline: the UI, the model server, a request.

    Against a tracking server (``http(s)://``) the UI is the server's own.
    """
    tracking_uri = tracking_uri if tracking_uri is not None else mlflow.get_tracking_uri()
    if tracking_uri.startswith(("http://", "https://")):
        ui = f"open {tracking_uri}                 # the tracking server's UI: runs, metrics, images, models"
    else:
        ui = f"mlflow ui --port {port}                      # every run, metric, image and model version"
    return f"""
Next:
  {ui}
  mlflow models serve -m models:/{STUDENT_MODEL_NAME}@serving --env-manager local -h 127.0.0.1 -p {port + 1}
  # then, in another shell (see README, "Serving a model over REST"):
  python -c "from uda.serving import example_image_png; open('image.png', 'wb').write(example_image_png(135, 240))"
  {{ printf '{{"dataframe_split": {{"columns": ["image"], "data": [["'; base64 -w0 image.png; printf '"]]}}}}'; }} > request.json
  curl -s -X POST -H 'Content-Type: application/json' --data-binary @request.json http://127.0.0.1:{port + 1}/invocations
"""
