"""A team's setup, for real: PostgreSQL and an `mlflow server` on it, started here
(tools/team_services.py), clients on `MLFLOW_TRACKING_URI=http://127.0.0.1:<port>`,
artifacts proxied through the server.

Checked through the server's API: the whole pipeline and `mlflow models serve`
of `@serving`; two distill runs registering into one model at once; three soup
runs sharing one Optuna study on PostgreSQL; two soup runs promoting at once;
a distill SIGKILLed while it writes to the server, then resumed.

Without PostgreSQL's programs the module is skipped with the command to
install them, except under CI=true, where it must run (.ci/run installs them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import pytest

from concurrent_runs import (
    PROJECT_ROOT,
    STUDENT,
    TEACHER,
    assert_aliases_name_complete_versions,
    env_for,
    finish,
    kill_group,
    run_id_of,
    start,
    two_distills_at_once,
    two_promotions_at_once,
)
from project_processes import mlflow_run_command
from test_entrypoints import TINY_PIPELINE
from uda.registry import find_versions, source_run_id
from test_serving import _post, _request, _Server
from uda.serving import decode_png, example_image_png

sys.path.insert(0, str(PROJECT_ROOT / "tools"))
import team_services  # noqa: E402

EXPERIMENT = "team"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    if team_services.postgres_bin_dir() is None:
        message = (
            "PostgreSQL's server programs are not installed (initdb, pg_ctl): "
            "run tools/install_services.sh (apt-get install postgresql)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; under CI=true these tests must run")
        pytest.skip(message)
    services = team_services.TeamServices.start(tmp_path_factory.mktemp("team"), allow_scratch=True)
    try:
        yield services
    finally:
        services.stop()


@pytest.fixture(scope="module")
def client(team):
    return mlflow.MlflowClient(team.tracking_uri)


@pytest.fixture(scope="module")
def pipeline(team, client, tmp_path_factory):
    """`mlflow run .` (the tiny pipeline) against the tracking server, timed."""
    log = tmp_path_factory.mktemp("pipeline") / "main.log"
    started = time.perf_counter()
    process = start(team.tracking_uri, EXPERIMENT, log, "main", *TINY_PIPELINE)
    output = finish({"main": process}, {"main": log})["main"]
    seconds = time.perf_counter() - started
    print(f"\npipeline against the tracking server: {seconds:.0f} s")
    return {"output": output, "run_id": run_id_of(output), "seconds": seconds}


def test_the_pipeline_runs_against_the_server_and_its_soup_is_served(team, client, pipeline, tmp_path):
    output = pipeline["output"]
    assert f"open {team.tracking_uri}" in output  # the server's UI, not `mlflow ui`
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    main = next(r for r in runs if r.info.run_id == pipeline["run_id"])
    children = {
        r.data.tags["mlflow.project.entryPoint"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == main.info.run_id
    }
    assert set(children) == {"teacher", "distill", "soup", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    # artifacts went through the server (proxied), not to a client-side path
    assert children["distill"].info.artifact_uri.startswith("mlflow-artifacts:")
    assert any((team.base_dir / "artifacts").rglob("MLmodel"))

    # registration and lineage tags, read back through the server
    teacher_versions = find_versions(TEACHER, client=client)
    assert [v.tags["iteration"] for v in teacher_versions] == ["2", "4"]
    students = [
        v
        for v in find_versions(STUDENT, client=client)
        if source_run_id(v) == children["distill"].info.run_id
    ]
    assert [v.tags["iteration"] for v in students] == ["2", "4"]
    assert all(v.tags["kind"] == "checkpoint" for v in students)
    teacher_uri = f"models:/{TEACHER}/{teacher_versions[-1].version}"
    assert children["distill"].data.params["teacher"] == teacher_uri
    assert all(v.tags["teacher"] == teacher_uri for v in students)  # lineage

    # the soup: its nested trial runs, its registration, `serving`
    soup_run = children["soup"]
    trials = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{soup_run.info.run_id}'"
    )
    assert sorted(r.data.tags["soup.trial"] for r in trials) == ["0", "1"]
    serving = client.get_model_version_by_alias(STUDENT, "serving")
    assert serving.tags["kind"] == "soup"
    assert str(serving.version) == soup_run.data.tags["soup.version"] == main.data.tags["soup_version"]
    assert serving.tags["soup.ingredient_versions"] == ",".join(v.version for v in students)
    assert soup_run.data.tags["soup.promoted"] == "true"
    assert children["evaluate"].data.params["model"] == f"models:/{STUDENT}/{serving.version}"
    assert_aliases_name_complete_versions(client, STUDENT)
    assert_aliases_name_complete_versions(client, TEACHER)

    # `mlflow models serve` of @serving, resolved through the same server
    server = _Server(team.tracking_uri, tmp_path, 120, model_uri=f"models:/{STUDENT}@serving")
    try:
        server.wait_ready()
        status, body = _post(server.invocations, _request(example_image_png(72, 128)))
    finally:
        server.stop()
    assert status == 200, body
    assert decode_png(body["predictions"][0]["label_map"]).shape == (72, 128)


def test_two_distills_register_into_one_model_at_once(team, client, pipeline, tmp_path):
    two_distills_at_once(client, team.tracking_uri, EXPERIMENT, tmp_path)


def test_three_soups_share_one_optuna_study_on_postgres(team, client, pipeline, tmp_path):
    import optuna

    trials = 6
    logs = {n: tmp_path / f"soup-{n}.log" for n in range(3)}
    started = time.perf_counter()
    processes = {
        n: start(
            team.tracking_uri,
            EXPERIMENT,
            logs[n],
            "soup",
            f"trials={trials}",
            "promote=false",
            f"study_storage={team.optuna_storage}",
        )
        for n in logs
    }
    outputs = finish(processes, logs)
    seconds = time.perf_counter() - started
    runs = [client.get_run(run_id_of(out)) for out in outputs.values()]
    names = {r.data.tags["soup.study_name"] for r in runs}
    assert len(names) == 1, names
    # the password-free URL is what the runs show
    assert {r.data.tags["soup.study_storage"] for r in runs} == {team.optuna_storage}

    study = optuna.load_study(study_name=names.pop(), storage=team.optuna_storage)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == trials  # the total is honoured
    others = [t for t in study.get_trials() if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("uda.surplus") for t in others), (
        others
    )
    # no trial evaluated twice: the runs' shares are disjoint and cover the study
    shares = [r.data.tags["soup.trials_run_here"] for r in runs]
    numbers = [int(n) for share in shares if share != "none" for n in share.split(",")]
    assert sorted(numbers) == sorted(t.number for t in complete), shares
    # every completed trial has its nested run, a child of one of the three
    parents = {r.info.run_id for r in runs}
    for trial in complete:
        nested = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert nested.data.tags["mlflow.parentRunId"] in parents
        assert nested.data.tags["soup.trial"] == str(trial.number)
        assert nested.info.status == "FINISHED"
    # all three waited for each other and took the same best trial
    assert len({r.data.params["soup.weights"] for r in runs}) == 1
    print(
        f"\nthree soups sharing a study: {seconds:.0f} s; {len(complete)} completed trials "
        f"(trials={trials}), {len(others)} surplus (FAIL, not evaluated), 0 evaluated twice; "
        f"trials per run: {' | '.join(shares)}"
    )


def test_two_soups_promoting_at_once_leave_serving_on_a_complete_soup(team, client, pipeline, tmp_path):
    two_promotions_at_once(client, team.tracking_uri, EXPERIMENT, tmp_path)


def test_a_distill_killed_while_writing_to_the_server_resumes_cleanly(team, client, pipeline, tmp_path):
    """SIGKILL the whole `mlflow run` as soon as its first checkpoint is a version
    with its resume state (the run is then writing the next iterations' metrics
    and its next model), then run the same command again: resume=auto
    continues the killed run."""
    params = [
        "seed=7",
        "iterations=6",
        "checkpoint_interval=2",
        "cfg_options=evaluation.interval=2 log_config.interval=1 log_config.img_interval=100 "
        "lr_config.warmup_iters=1",
    ]
    log = tmp_path / "killed.log"
    process = start(team.tracking_uri, EXPERIMENT, log, "distill", *params)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    deadline = time.monotonic() + 300
    killed_run = None
    while killed_run is None:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        for run in client.search_runs(
            [experiment.experiment_id], filter_string="attributes.status = 'RUNNING' and params.seed = '7'"
        ):
            if "uda.resume.iteration" in run.data.tags:
                killed_run = run.info.run_id
        time.sleep(0.2)
    kill_group(process)
    assert client.get_run(killed_run).info.status == "RUNNING"  # what a kill leaves

    again = subprocess.run(
        mlflow_run_command("distill", EXPERIMENT, params),
        env=env_for(team.tracking_uri),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = client.get_run(killed_run)
    assert resumed.data.tags["uda.train.state"] == "finished"
    assert resumed.data.tags["uda.resumes"] == "1"
    mine = [v for v in find_versions(STUDENT, client=client) if source_run_id(v) == killed_run]
    assert sorted(int(v.tags["iteration"]) for v in mine) == [2, 4, 6]  # none twice
    assert all(v.status == "READY" for v in mine)
    assert_aliases_name_complete_versions(client, STUDENT)
    models = client.search_logged_models(
        [experiment.experiment_id], filter_string=f"source_run_id = '{killed_run}'"
    )
    assert all(str(m.status) == "READY" for m in models)
