"""The soup step against a real registry: mixing checked through registered
versions, Optuna/greedy/uniform, honest reporting, promotion rules, and bad
input that registers nothing and leaves `serving` alone.

A module-level template store (SQLite + artifacts) holds the ingredients; each
test works on its own copy of the database (`store` fixture), so aliases and
versions never leak between tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from project_processes import entry_point_command, process_env
from uda.config import load_config
from uda.data.layouts import scan_acdc
from uda.data.synthetic import ensure_embedded
from uda.errors import UserError
from uda.models import build_segmentor
from uda.registry import load_segmentor, log_and_register
from uda.serving import decode_png, example_image_png, input_frame
from uda.soup import SoupError
from uda.soup.scoring import ImageCache, SoupScorer, split_tune_report, stratified_subset
from uda.soup.ingredients import resolve_ingredients
from uda.soup.request import make_request
from uda.soup.step import run_soup
from uda.soup.study import default_study_storage
from uda.tracking import entry_point_run

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
NAME = "cs2acdc-student"
TEACHER = "cs2acdc-teacher"
ITERATIONS = (20, 40, 80, 120)
IMG_SCALE = [128, 72]
SMALL_DATA = dict(
    num_source_train=1,
    num_source_val=1,
    num_target_train=1,
    num_target_val=2,
    num_target_test=0,
    source_size=(128, 64),
    target_size=(128, 72),
)


def _perturbed_student(seed: int, base: dict) -> torch.nn.Module:
    """The base student with seeded noise on every floating tensor (BN
    statistics included) and a distinct BN counter."""
    model = build_segmentor(load_config("default")["student"]["model"])
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in base.items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator)
            value = value + 0.05 * noise * (value.std() if value.numel() > 1 else 1.0)
            if key.endswith("running_var"):
                value = value.abs() + 1e-3
        elif key.endswith("num_batches_tracked"):
            value = torch.full_like(value, 1000 + seed)
        state[key] = value
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Small data, and a store with: an older run's narrow-head student
    (alias `narrow`), a distill run's iterations 20/40/80/120 (aliases
    iter-N), and a teacher."""
    root = tmp_path_factory.mktemp("soup-template")
    data = ensure_embedded(root / "small", **SMALL_DATA)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    torch.manual_seed(0)
    cfg = load_config("default")
    base = build_segmentor(cfg["student"]["model"]).state_dict()
    models = {it: _perturbed_student(it, base) for it in ITERATIONS}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("soup-template", artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=experiment, run_name="older"):
            narrow_cfg = load_config("default", ["student.model.decode_head.channels=16"])["student"]["model"]
            log_and_register(
                build_segmentor(narrow_cfg).eval(), NAME, iteration=10, alias="narrow", preset="default"
            )
            log_and_register(
                build_segmentor(cfg["teacher"]["model"]).eval(), TEACHER, iteration=10, preset="default"
            )
        with mlflow.start_run(experiment_id=experiment, run_name="distill"):
            for iteration in ITERATIONS:
                log_and_register(models[iteration], NAME, iteration=iteration, preset="default")
        mlflow.set_tracking_uri(None)
    return {
        "db": root / "mlflow.db",
        "acdc": data.acdc_root,
        "models": {it: m.state_dict() for it, m in models.items()},
    }


@pytest.fixture
def store(template, tracking_uri, tmp_path):
    """A private copy of the template store as the tracking store."""
    shutil.copyfile(template["db"], tmp_path / "mlflow.db")
    return template


def _cfg(store, *overrides):
    return load_config(
        "default", [f"data.target.root={store['acdc']}", f"data.target.img_scale={IMG_SCALE}", *overrides]
    )


def soup(store, *overrides, **kwargs):
    """One soup run, as under `mlflow run`: the run is created first and the
    entry point resumes it through MLFLOW_RUN_ID (so nothing here calls
    mlflow.set_experiment, whose MLFLOW_EXPERIMENT_ID would leak into later
    tests' subprocesses)."""
    cfg = _cfg(store, *overrides)
    request = make_request(cfg, **kwargs)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("soup-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("soup-tests")
    run_id = client.create_run(experiment_id).info.run_id
    os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        with entry_point_run("soup", {}, cfg):
            result = run_soup(request)
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)  # end_run may drop it
    return result, mlflow.get_run(run_id)


def versions():
    return sorted(mlflow.MlflowClient().search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))


def aliases() -> dict:
    return {a: str(v) for a, v in mlflow.MlflowClient().get_registered_model(NAME).aliases.items()}


def set_serving(version) -> None:
    mlflow.MlflowClient().set_registered_model_alias(NAME, "serving", str(version))


def children(run):
    return mlflow.search_runs(
        [run.info.experiment_id],
        output_format="list",
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
    )


# --------------------------------------------------------------- fixed mix
def test_fixed_weights_soup_is_the_weighted_average_in_the_registry(store):
    result, run = soup(store, model_name=NAME, weights="3,3,4", aliases="iter-40,iter-80,iter-120")
    assert result.weights == pytest.approx([0.3, 0.3, 0.4])
    assert result.ingredients_source == "parameter"
    version = result.version
    assert version.tags["kind"] == "soup"
    assert version.tags["soup.ingredients"] == "iter-40,iter-80,iter-120"
    assert version.tags["soup.ingredient_versions"] == ",".join(
        aliases()[a] for a in ("iter-40", "iter-80", "iter-120")
    )
    assert version.tags["soup.weights"] == "0.3,0.3,0.4"
    assert float(version.tags["report_mIoU"]) == pytest.approx(result.scores["soup"]["report"], abs=1e-6)

    # Through the registry: the registered soup vs the registered versions.
    soup_model, _ = load_segmentor(f"models:/{NAME}/{version.version}")
    parts = [
        load_segmentor(f"models:/{NAME}@{a}")[0].state_dict() for a in ("iter-40", "iter-80", "iter-120")
    ]
    mixed = soup_model.state_dict()
    assert list(mixed) == list(parts[0])
    for key, value in mixed.items():
        if value.is_floating_point():
            expected = 0.3 * parts[0][key] + 0.3 * parts[1][key] + 0.4 * parts[2][key]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        else:  # integer buffers: from the first contributing ingredient
            assert torch.equal(value, parts[0][key]), key
    assert int(mixed[next(k for k in mixed if k.endswith("num_batches_tracked"))]) == 1040

    # serving moved, and serves the soup as a pyfunc model.
    assert aliases()["serving"] == str(version.version)
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@serving")
    out = served.predict(input_frame(example_image_png(64, 96)))
    assert decode_png(out["label_map"][0]).shape == (64, 96)

    # Honest report: every row on the same splits, table logged.
    metrics = run.data.metrics
    for name in ("soup", "uniform", "iter-40", "iter-80", "iter-120"):
        for split in ("tune", "report", "val"):
            assert 0.0 <= metrics[f"{split}.mIoU.{name}"] <= 1.0
    assert metrics["images.tune"] == metrics["images.report"] == 4
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/soup/comparison.json")
    assert [row[0] for row in table["data"]] == ["iter-40", "iter-80", "iter-120", "uniform", "soup"]
    assert run.data.tags["soup.promoted"] == "true"
    assert not children(run)  # fixed weights: no trials


# ---------------------------------------------------------------- searches
def test_optuna_trials_are_nested_runs_and_the_study_resumes(store, tmp_path):
    result, run = soup(
        store, "soup.trials=3", model_name=NAME, weights="optuna", method="optuna", promote="false"
    )
    assert result.method == "optuna" and result.trials == 3
    trials = children(run)
    assert len(trials) == 3
    for trial in trials:
        assert set(trial.data.params) == {"weight.iter-40", "weight.iter-80", "weight.iter-120"}
        assert 0.0 <= trial.data.metrics["tune.mIoU"] <= 1.0
        assert trial.data.metrics["seconds"] > 0
    best = max(t.data.metrics["tune.mIoU"] for t in trials)
    assert result.scores["soup"]["tune"] == pytest.approx(best, abs=1e-9)
    assert result.scores["soup"]["tune"] >= result.scores["uniform"]["tune"]
    for key in (
        "tune.mIoU.soup",
        "report.mIoU.soup",
        "val.mIoU.soup",
        "report.mIoU.uniform",
        "report.mIoU.iter-80",
        "seconds_per_trial",
    ):
        assert key in run.data.metrics
    # Its own SQLite file next to mlflow.db, named after model+aliases+...
    assert result.study_storage == default_study_storage() == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
    assert (tmp_path / "optuna.db").is_file()
    assert result.study_name.startswith(f"{NAME}:iter-40,iter-80,iter-120:miou:seed0:")
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "soup")}
    assert {
        "soup/optuna_history.png",
        "soup/optuna_importance.png",
        "soup/comparison.json",
        "soup/comparison.md",
    } <= artifacts
    assert "serving" not in aliases()  # promote=false

    # Same study, one more trial wanted: exactly one new nested run.
    again, run2 = soup(store, "soup.trials=4", model_name=NAME, method="optuna", promote="false")
    assert again.study_name == result.study_name
    assert len(children(run2)) == 1 and again.trials == 1


def _soup_process(store, cwd: Path, experiment: str, storage: str, trials: int) -> subprocess.Popen:
    """The soup entry point in its own process (Optuna search, no promotion)."""
    cmd = entry_point_command(
        "soup",
        "--target-root",
        str(store["acdc"]),
        "--cfg-options",
        f"data.target.img_scale=[{IMG_SCALE[0]},{IMG_SCALE[1]}]",
        "--aliases",
        "iter-40,iter-80,iter-120",
        "--trials",
        str(trials),
        "--promote",
        "false",
        "--study-storage",
        storage,
        "--device",
        "cpu",
    )
    env = process_env(mlflow.get_tracking_uri(), MLFLOW_EXPERIMENT_NAME=experiment, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_runs_share_one_study_and_its_total(store, tmp_path, capsys):
    import optuna

    trials = 6
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("soup-concurrent", artifact_location=str(tmp_path / "artifacts"))
    # Optuna's own SQLite file, next to (never inside) MLflow's.
    storage = f"sqlite:///{tmp_path / 'shared' / 'optuna.db'}"
    procs = [_soup_process(store, tmp_path, "soup-concurrent", storage, trials) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-6000:]

    parents = client.search_runs([experiment], filter_string="tags.entry_point = 'soup'")
    assert len(parents) == 2
    names = {p.data.tags["soup.study_name"] for p in parents}
    assert len(names) == 1  # one shared study
    study = optuna.load_study(study_name=names.pop(), storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # The study's total is `trials`, not `trials` per run.
    assert sorted(t.number for t in complete) == list(range(trials))
    for t in study.trials:  # anything else is a never-evaluated race loser
        if t.state != optuna.trial.TrialState.COMPLETE:
            assert t.state == optuna.trial.TrialState.FAIL
            assert t.user_attrs.get("uda.surplus") is True and not t.params

    # One nested run per trial, under the run that evaluated it; no
    # trial number twice.
    nested = client.search_runs([experiment], filter_string="tags.entry_point = 'soup-trial'")
    assert sorted(int(r.data.tags["soup.trial"]) for r in nested) == list(range(trials))
    parent_of = {r.info.run_id: r.data.tags["mlflow.parentRunId"] for r in nested}
    per_parent = Counter(parent_of.values())
    ran = {}
    for parent in parents:
        here = parent.data.tags["soup.trials_run_here"]
        ran[parent.info.run_id] = [] if here == "none" else [int(x) for x in here.split(",")]
        assert per_parent.get(parent.info.run_id, 0) == len(ran[parent.info.run_id])
        assert parent.data.metrics["optuna.trials_run_here"] == len(ran[parent.info.run_id])
        assert parent.data.metrics["optuna.completed_trials"] == trials
    assert sorted(sum(ran.values(), [])) == list(range(trials))
    for t in complete:  # Optuna -> MLflow link
        run_id = t.user_attrs["mlflow_run_id"]
        assert t.number in ran[parent_of[run_id]]

    # Each waited for the other's last trials: the same best, the same soup.
    best = max(complete, key=lambda t: (t.value, -t.number))
    assert {p.data.metrics["optuna.best_trial"] for p in parents} == {best.number}
    assert parents[0].data.params["soup.weights"] == parents[1].data.params["soup.weights"]
    # No two trials tried the same weights (seeded per trial number).
    assert len({tuple(t.user_attrs["weights"]) for t in complete}) == trials

    # A later run finds the study complete: no trial, its best, said so.
    capsys.readouterr()
    again, run = soup(
        store,
        f"soup.trials={trials}",
        model_name=NAME,
        aliases="iter-40,iter-80,iter-120",
        method="optuna",
        promote="false",
        study_storage=storage,
    )
    out = capsys.readouterr().out
    assert f"The study already has {trials} completed trials" in out
    assert f"best trial {best.number}" in out
    assert again.trials == 0 and not children(run)
    assert run.data.tags["soup.trials_run_here"] == "none"
    assert run.data.params["soup.weights"] == parents[0].data.params["soup.weights"]
    assert len(optuna.load_study(study_name=study.study_name, storage=storage).trials) == len(study.trials)


def test_greedy_soup_and_default_aliases_of_the_latest_run(store):
    # The preset's aliases do not exist: fall back to the latest run's
    # three highest iterations (not iter-20, not the older run's `narrow`).
    result, run = soup(store, "soup.aliases=[iter-1,iter-2,iter-3]", model_name=NAME, method="greedy")
    assert result.ingredients_source == "latest-run"
    assert [i.label for i in result.ingredients] == ["iter-40", "iter-80", "iter-120"]
    assert run.data.tags["soup.ingredients"] == "iter-40,iter-80,iter-120"
    assert result.method == "greedy"
    chosen = [w for w in result.weights if w > 0]
    assert chosen and all(w == pytest.approx(1 / len(chosen)) for w in chosen)
    assert len(children(run)) == 2  # two candidates tried after the best
    greedy = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/soup/greedy.json")
    assert len(greedy["history"]) == 2


def test_preset_aliases_are_used_when_they_exist(store):
    cfg = _cfg(store)
    cfg["soup"]["aliases"] = ["iter-40", "iter-80", "iter-120"]  # the aliases this store registered
    refs, source = resolve_ingredients(make_request(cfg, NAME))
    assert source == "preset"
    assert [r.label for r in refs] == ["iter-40", "iter-80", "iter-120"]


def test_teacher_agreement_objective_is_label_free(store):
    result, run = soup(
        store,
        model_name=NAME,
        method="greedy",
        aliases="iter-80,iter-120",
        objective="teacher-agreement",
        teacher=f"models:/{TEACHER}/latest",
        promote="false",
    )
    assert result.objective == "teacher-agreement"
    [trial] = children(run)
    assert 0.0 <= trial.data.metrics["agreement.mIoU"] <= 1.0
    metrics = run.data.metrics
    assert metrics["images.agreement"] == 4  # as many as the tuning split
    for name in ("soup", "iter-80", "iter-120"):
        assert 0.0 <= metrics[f"agreement.mIoU.{name}"] <= 1.0
        assert f"report.mIoU.{name}" in metrics
    assert result.version.tags["soup.objective"] == "teacher-agreement"


# ------------------------------------------------------------- promotion
def _ranked(store):
    """Report-split mIoU of iter-40/80/120, computed independently."""
    samples = scan_acdc(store["acdc"], "val")
    _, report = split_tune_report(samples, 0.5)
    cache = ImageCache({"report": report}, IMG_SCALE)
    model = build_segmentor(load_config("default")["student"]["model"])
    scorer = SoupScorer(model, cache)
    scores = {}
    for iteration in (40, 80, 120):
        scorer.load(store["models"][iteration])
        scores[f"iter-{iteration}"] = scorer.evaluate(["report"])["report"].miou
    ranked = sorted(scores, key=scores.get)
    assert scores[ranked[0]] < scores[ranked[-1]]
    return ranked[0], ranked[-1]


def test_promote_if_better_moves_serving_only_on_a_better_report_score(store):
    worst, best = _ranked(store)
    set_serving(aliases()[worst])
    result, _ = soup(store, model_name=NAME, aliases=f"{worst},{best}", weights="0,1", promote="if-better")
    assert result.promoted
    assert aliases()["serving"] == str(result.version.version)
    assert result.scores["serving"]["report"] < result.scores["soup"]["report"]

    set_serving(aliases()[best])
    result, run = soup(store, model_name=NAME, aliases=f"{best},{worst}", weights="0,1", promote="if-better")
    assert not result.promoted
    assert aliases()["serving"] == aliases()[best]
    assert run.data.tags["soup.promoted"] == "false"
    assert "does not beat" in run.data.tags["soup.promote_reason"]
    assert result.version.tags["kind"] == "soup"  # registered all the same


def test_promote_false_leaves_serving(store):
    set_serving(aliases()["iter-40"])
    result, _ = soup(store, model_name=NAME, method="uniform", promote="false")
    assert not result.promoted
    assert aliases()["serving"] == aliases()["iter-40"]


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, overrides, message",
    [
        (dict(weights="3,x,4"), [], r"weight 2 \('x'\)"),
        (dict(weights="3,-1,4"), [], "weight 2 is negative"),
        (dict(weights="0,0,0"), [], "all weights are zero"),
        (dict(weights="3,3"), [], "got 2 weight"),
        (
            dict(weights="1,2", aliases=""),
            ["soup.aliases=[iter-1]"],
            "got 2 weight",
        ),  # count checked against the latest run's three
        (dict(aliases="iter-40,iter-4O"), [], r"no alias 'iter-4O'\. Aliases: .*iter-40 -> .*narrow -> "),
        (
            dict(aliases="iter-40,narrow", weights="1,1"),
            [],
            r"ingredient 1 \(models:/cs2acdc-student@narrow .*\) does not match.*"
            r"key 'decode_head",
        ),
        (dict(trials=0), [], "trials must be at least 1"),
        (dict(method="best"), [], "method must be one of"),
        (dict(promote="maybe"), [], "promote must be one of"),
        (dict(model_name="cs2acdc-studnet"), [], "No registered model 'cs2acdc-studnet'.*cs2acdc-student"),
    ],
)
def test_bad_input_registers_nothing_and_leaves_serving(store, kwargs, overrides, message):
    set_serving(aliases()["iter-40"])
    before = [v.version for v in versions()]
    kwargs = dict(dict(model_name=NAME, promote="true"), **kwargs)
    with pytest.raises(UserError, match=message):
        soup(store, *overrides, **kwargs)
    assert [v.version for v in versions()] == before
    assert aliases()["serving"] == aliases()["iter-40"]


def test_a_failure_mid_soup_leaves_serving_where_it_was(store, tmp_path):
    # A damaged label in target val: evaluation raises after the
    # ingredients were resolved, downloaded and checked.
    data = tmp_path / "damaged"
    shutil.copytree(store["acdc"], data)
    label = scan_acdc(data, "val")[-1].label_path
    Image.fromarray(np.full((72, 128), 77, np.uint8)).save(label)
    set_serving(aliases()["iter-40"])
    before = [v.version for v in versions()]
    with pytest.raises(ValueError, match="label values must lie in"):
        soup(store, f"data.target.root={data}", model_name=NAME, weights="3,3,4")
    assert [v.version for v in versions()] == before
    assert aliases()["serving"] == aliases()["iter-40"]


# --------------------------------------------------------------- scoring
def test_splits_are_deterministic_stratified_and_disjoint(store):
    samples = scan_acdc(store["acdc"], "val")
    tune, report = split_tune_report(samples, 0.5)
    assert split_tune_report(list(reversed(samples)), 0.5) == (list(reversed(tune)), list(reversed(report)))
    assert not {s.image_path for s in tune} & {s.image_path for s in report}
    assert len(tune) + len(report) == len(samples) == 8
    for condition in ("fog", "night", "rain", "snow"):
        assert sum(s.condition == condition for s in tune) == 1
    with pytest.raises(SoupError, match="strictly between 0 and 1"):
        split_tune_report(samples, 1.0)
    train = scan_acdc(store["acdc"], "train")
    picked = stratified_subset(train, 2)
    assert len(picked) == 2 and len({s.condition for s in picked}) == 2


def test_scorer_matches_a_plain_per_image_evaluation(store):
    from uda.data.pipelines import TestPipeline
    from uda.metrics import ConfusionMatrix

    samples = scan_acdc(store["acdc"], "val")[:3]
    cache = ImageCache({"all": samples}, IMG_SCALE, batch_size=2)
    assert [len(b.names) for b in cache.batches] == [2, 1]
    model = build_segmentor(load_config("default")["student"]["model"])
    model.load_state_dict(store["models"][80])
    scorer = SoupScorer(model, cache)
    fast = scorer.evaluate(["all"])["all"]
    plain = ConfusionMatrix()
    pipeline = TestPipeline(IMG_SCALE)
    with torch.no_grad():
        for sample in samples:
            item = pipeline(sample)
            img = torch.from_numpy(item["img"].transpose(2, 0, 1))[None]
            plain.update(model.eval()(img).argmax(1)[0], torch.from_numpy(item["gt"].astype(np.int64)))
    assert fast.miou == pytest.approx(plain.miou(), abs=1e-12)
    assert fast.overall.num_pixels == int(plain.matrix.sum())
