"""Registry: checkpoints → model versions (idempotent, weights stored once),
aliases, clear errors, and the way back to a torch segmentor."""

import hashlib
import os
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from uda.config import load_config
from uda.errors import UserError
from uda.models import build_segmentor, save_checkpoint
from uda.registry import (
    RegistryError,
    check_model_uri,
    get_registered_model,
    load_segmentor,
    log_and_register,
    register_checkpoint,
    resolve_alias,
    set_alias_safely,
    validate_alias,
    validate_model_name,
)
from uda.serving import PIP_REQUIREMENTS, decode_png, example_image_png, input_frame, log_segmentor

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
NAME = "cs2acdc-student"


def student(seed: int):
    torch.manual_seed(seed)
    return build_segmentor(load_config("default")["student"]["model"]).eval()


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(root: Path, suffix: str) -> list[Path]:
    return sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with artifacts in the temp dir, and one run that
    registered iterations 40 and 80 (two different models)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("registry", artifact_location=str(root / "artifacts"))
        models, paths = {}, {}
        with mlflow.start_run(experiment_id=experiment) as run:
            for seed, iteration in ((1, 40), (2, 80)):
                models[iteration] = student(seed)
                paths[iteration] = save_checkpoint(
                    root / "work" / f"iter_{iteration}.pth", models[iteration], meta={"iteration": iteration}
                )
                log_and_register(
                    paths[iteration],
                    NAME,
                    iteration=iteration,
                    metrics={"val_mIoU": iteration / 2},
                    preset="default",
                )
        yield {
            "root": root,
            "artifacts": root / "artifacts",
            "experiment": experiment,
            "run_id": run.info.run_id,
            "models": models,
            "paths": paths,
        }
        mlflow.set_tracking_uri(None)


def versions_of(name):
    return sorted(mlflow.MlflowClient().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def aliases_of(name) -> dict[str, str]:
    aliases = mlflow.MlflowClient().get_registered_model(name).aliases
    return {alias: str(version) for alias, version in aliases.items()}


def logged_models(store):
    return mlflow.search_logged_models(experiment_ids=[store["experiment"]], output_format="list")


# ------------------------------------------------------------ registering
def test_each_iteration_is_a_tagged_version_with_its_alias(store):
    client = mlflow.MlflowClient()
    versions = versions_of(NAME)
    assert [str(v.version) for v in versions] == ["1", "2"]
    for version, iteration in zip(versions, (40, 80)):
        assert version.status == "READY"
        assert version.run_id == store["run_id"]
        assert version.tags["iteration"] == str(iteration)
        assert version.tags["run_id"] == store["run_id"]
        assert version.tags["kind"] == "checkpoint"
        assert version.tags["preset"] == "default"
        assert float(version.tags["val_mIoU"]) == iteration / 2
    assert aliases_of(NAME) == {"iter-40": "1", "iter-80": "2"}
    assert client.get_registered_model(NAME).description


def test_registering_the_same_iteration_again_reuses_the_version(store):
    before = len(logged_models(store))
    with mlflow.start_run(run_id=store["run_id"]):  # a resumed run
        again = log_and_register(store["paths"][80], NAME, iteration=80, metrics={"val_mIoU": 40.0})
    assert str(again.version) == "2"
    assert [str(v.version) for v in versions_of(NAME)] == ["1", "2"]
    assert len(logged_models(store)) == before  # nothing logged again
    assert aliases_of(NAME) == {"iter-40": "1", "iter-80": "2"}


def test_re_registering_does_not_take_back_a_moved_alias(store):
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "iter-80", "1")  # moved by hand
    try:
        with mlflow.start_run(run_id=store["run_id"]):
            again = log_and_register(store["paths"][80], NAME, iteration=80)
        assert str(again.version) == "2"
        assert aliases_of(NAME)["iter-80"] == "1"
    finally:
        client.set_registered_model_alias(NAME, "iter-80", "2")


def test_register_checkpoint_of_a_logged_model_is_idempotent(store):
    with mlflow.start_run(experiment_id=store["experiment"]) as run:
        info = log_segmentor(store["paths"][40], iteration=120)
    first = register_checkpoint(info, "idempotent", iteration=120)
    second = register_checkpoint(info.model_uri, "idempotent", iteration=120)
    assert str(first.version) == str(second.version) == "1"
    assert len(versions_of("idempotent")) == 1
    assert first.tags["run_id"] == run.info.run_id


def test_a_run_stopped_between_logging_and_registering_logs_nothing_twice(store):
    with mlflow.start_run(experiment_id=store["experiment"]) as run:
        log_segmentor(store["paths"][40], iteration=160)  # then "crashed"
    count = len(logged_models(store))
    with mlflow.start_run(run_id=run.info.run_id):
        version = log_and_register(store["paths"][40], "resumed", iteration=160)
    assert len(logged_models(store)) == count
    assert version.tags["iteration"] == "160"
    assert str(resolve_alias("resumed", "iter-160").version) == str(version.version)


def test_checkpoint_is_stored_once(store):
    # Every logged model holds exactly one checkpoint file; registering
    # (2 versions + re-registration) added no copy.
    checkpoints = files_under(store["artifacts"], ".pth")
    models = logged_models(store)
    assert len(checkpoints) == len(models)
    run_models = [m for m in models if m.source_run_id == store["run_id"]]
    assert len(run_models) == 2
    stored = {sha256(p) for p in checkpoints}
    for iteration in (40, 80):
        assert sha256(store["paths"][iteration]) in stored
    run_dirs = [p for p in store["artifacts"].rglob("*") if p.is_file() and store["run_id"] in str(p)]
    assert not [p for p in run_dirs if p.suffix == ".pth"]


def test_no_active_run_is_a_clear_error(store):
    assert mlflow.active_run() is None
    with pytest.raises(ValueError, match="active MLflow run"):
        log_segmentor(store["paths"][40], iteration=1)


def test_foreign_checkpoint_needs_model_cfg_and_is_imported(store, tmp_path):
    model = store["models"][40]
    mic_style = {
        "meta": {"iter": 40000},
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
    }
    path = tmp_path / "mic.pth"
    torch.save(mic_style, path)
    with mlflow.start_run(experiment_id=store["experiment"]):
        with pytest.raises(ValueError, match="pass model_cfg"):
            log_and_register(path, "imported", kind="import")
        version = log_and_register(
            path,
            "imported",
            kind="import",
            alias="teacher",
            model_cfg=load_config("default")["student"]["model"],
        )
    assert version.tags["kind"] == "import" and "iteration" not in version.tags
    rebuilt, _ = load_segmentor("models:/imported@teacher")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


# -------------------------------------------------------- using versions
def test_pyfunc_predicts_label_maps_of_the_input_size(store):
    pyfunc_model = mlflow.pyfunc.load_model(f"models:/{NAME}@iter-40")
    frame = input_frame(example_image_png(66, 90), example_image_png(64, 64))
    out = pyfunc_model.predict(frame)
    assert isinstance(out, pd.DataFrame) and len(out) == 2
    for row, shape in enumerate([(66, 90), (64, 64)]):
        label_map = decode_png(out["label_map"][row])
        assert label_map.shape == shape
        assert label_map.dtype == np.uint8 and label_map.max() <= 18
    assert (out["height"].tolist(), out["width"].tolist()) == ([66, 64], [90, 64])


@pytest.mark.parametrize("reference", ["alias", "version", "logged", "runs", "file"])
def test_load_segmentor_round_trip_gives_identical_logits(store, reference):
    version = resolve_alias(NAME, "iter-80")
    uri = {
        "alias": f"models:/{NAME}@iter-80",
        "version": f"models:/{NAME}/{version.version}",
        "logged": version.source,
        "runs": f"runs:/{store['run_id']}/iter-80",
        "file": str(store["paths"][80]),
    }[reference]
    model, model_cfg = load_segmentor(uri)
    assert model_cfg["backbone"] == "fan_nano_p4_hybrid"
    assert not model.training
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), store["models"][80](x), rtol=0, atol=0)


def test_unknown_alias_lists_the_existing_ones(store):
    with pytest.raises(RegistryError) as info:
        resolve_alias(NAME, "iter-4000")
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "no alias 'iter-4000'" in message
    assert "iter-40 -> 1" in message and "iter-80 -> 2" in message
    assert "1 (checkpoint, iteration 40)" in message
    with pytest.raises(RegistryError, match="iter-80 -> 2"):
        load_segmentor(f"models:/{NAME}@serving-typo")


def test_unknown_model_lists_the_registered_ones(store):
    with pytest.raises(RegistryError) as info:
        resolve_alias("cs2acdc-studnet", "iter-40")
    assert "Registered models: " in str(info.value)
    assert NAME in str(info.value)
    with pytest.raises(RegistryError, match="no version"):
        load_segmentor(f"models:/{NAME}/99")


def test_set_alias_safely_refuses_an_incomplete_version(store):
    client = mlflow.MlflowClient()
    with mlflow.start_run(experiment_id=store["experiment"]):
        broken = log_and_register(store["paths"][40], "fragile", iteration=40)
        good = log_and_register(store["paths"][80], "fragile", iteration=80)
    set_alias_safely("fragile", "serving", good.version)
    # Damage the stored checkpoint of the other version (a partial upload).
    logged = client.get_logged_model(broken.source.split("/")[-1])
    checkpoint = files_under(Path(logged.artifact_location), ".pth")[0]
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(RegistryError, match="incomplete"):
        set_alias_safely("fragile", "serving", broken.version)
    assert aliases_of("fragile")["serving"] == str(good.version)
    with pytest.raises(RegistryError, match="no version"):
        set_alias_safely("fragile", "serving", 7)


# ------------------------------------------------------------ environment
def test_pip_requirements_match_the_lock_file():
    lock = (PROJECT_ROOT / "requirements" / "main.txt").read_text().lower()
    for requirement in PIP_REQUIREMENTS:
        assert re.search(rf"^{re.escape(requirement)}\b", lock, re.M), requirement


# ------------------------------------------------------------ parameter checks
@pytest.mark.parametrize(
    "name, reason",
    [
        ("a/b", "MLflow does not allow '/' or ':' in names; use e.g. 'a-b'."),
        ("team:model", "MLflow does not allow '/' or ':'"),
        ("it's", "a single quote cannot be used in registry searches"),
        ("50%", "MLflow's file-based registry does not allow '%'"),
        ("..", "read as a relative path"),
        ("x" * 257, "it has 257 characters, the registry stores at most 256"),
    ],
)
def test_invalid_model_names_say_why_and_how_to_fix(name, reason):
    with pytest.raises(RegistryError) as info:
        validate_model_name(name)
    message = str(info.value)
    assert message.startswith("model_name "), message
    assert "is not a valid registered model name: " in message
    assert reason in message, message
    assert isinstance(info.value, UserError)


def test_valid_model_names_and_aliases_pass_stripped():
    assert validate_model_name("  cs2acdc-student ") == "cs2acdc-student"
    assert validate_model_name("Team model v2.1_x") == "Team model v2.1_x"
    with pytest.raises(RegistryError, match="model_name is empty"):
        validate_model_name("  ")
    assert validate_alias(" iter-4000 ") == "iter-4000"
    for alias in ("iter 4", "iter.4", "a@b", ""):
        with pytest.raises(RegistryError, match="alias"):
            validate_alias(alias, "aliases")
    for alias in ("latest", "Latest", "v3"):  # MLflow reserves these
        with pytest.raises(RegistryError, match="reserves"):
            validate_alias(alias, "aliases")
    assert validate_alias("v3-soup") == "v3-soup"


def test_registry_lookups_refuse_an_invalid_name_clearly(store):
    # Before: MLflow's INVALID_PARAMETER_VALUE escaped as a traceback.
    with pytest.raises(RegistryError, match="'a/b' is not a valid registered"):
        get_registered_model("a/b")
    with pytest.raises(RegistryError, match="'iter 40' is not a valid alias"):
        resolve_alias(NAME, "iter 40")


def test_every_documented_model_reference_form_is_checked_and_pinned(store):
    run_id = store["run_id"]
    model_id = check_model_uri(f"models:/{NAME}/2").model_id
    assert model_id.startswith("m-")
    forms = {
        f"models:/{NAME}@iter-80": ("version", f"models:/{NAME}/2"),
        f"models:/{NAME}/1": ("version", f"models:/{NAME}/1"),
        f"models:/{NAME}/latest": ("version", f"models:/{NAME}/2"),
        f"models:/{NAME}/LATEST": ("version", f"models:/{NAME}/2"),
        f"models:/{model_id}": ("logged-model", f"models:/{model_id}"),
        f"runs:/{run_id}/iter-40": ("run", f"runs:/{run_id}/iter-40"),
        str(store["paths"][40]): ("file", str(store["paths"][40].resolve())),
    }
    for given, (kind, pinned) in forms.items():
        reference = check_model_uri(given, "teacher")
        assert (reference.kind, reference.uri) == (kind, pinned), given
        if kind != "file":
            assert reference.checkpoint, given
    assert check_model_uri(f"models:/{NAME}/1").model_id  # for the UI link
    # Each form loads the weights it names.
    x = torch.randn(1, 3, 64, 64)
    for given in (f"models:/{model_id}", f"runs:/{run_id}/iter-40"):
        model, _ = load_segmentor(given)
        expected = store["models"][80 if given.startswith("models") else 40]
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)


def test_wrong_model_references_are_one_clear_error(store, tmp_path):
    run_id = store["run_id"]
    with mlflow.start_run(experiment_id=store["experiment"]) as empty:
        pass
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    unknown_id = "m-" + "0" * 32
    unknown_run = "f" * 32
    cases = {
        f"models:/{unknown_id}": f"No logged model '{unknown_id}' in ",
        f"runs:/{unknown_run}/model": f"No run '{unknown_run}' in ",
        f"runs:/{run_id}/model": f"Run {run_id} has no model at 'model'; its "
        f"logged models: iter-40, iter-80 (e.g. "
        f"runs:/{run_id}/iter-40).",
        f"runs:/{empty.info.run_id}/model": "it logged no models.",
        f"runs:/{run_id}": "runs:/RUN_ID/PATH",
        "runs:/not a run id/model": "'not a run id' is not an MLflow run id",
        f"models:/{NAME}": f"names no version of '{NAME}': use "
        f"models:/{NAME}@ALIAS (aliases: iter-40, "
        f"iter-80), models:/{NAME}/VERSION or "
        f"models:/{NAME}/latest.",
        "models:/cs2acdc-studnet": "Registered models: ",
        "models:/cs2acdc-studnet/latest": "No registered model 'cs2acdc-studnet'",
        f"models:/{NAME}/7": "has no version '7'; versions: 1 (checkpoint, iteration 40)",
        f"models:/{NAME}@iter-4000": "no alias 'iter-4000'. Aliases: iter-40 -> 1, iter-80 -> 2",
        f"models:/{NAME}/Production": "'Production' is neither a version number nor \"latest\"",
        f"models:/{NAME}/1/extra": "at most NAME/VERSION",
        "models:/a:b@serving": "The model name 'a:b' is not a valid registered model name",
        f"models:/{NAME}@iter 40": "The alias 'iter 40' is not a valid alias",
        str(tmp_path / "missing.pth"): "No such checkpoint or model folder",
        (tmp_path / "gone.pth").as_uri(): "No such checkpoint or model folder",
        str(tmp_path): "is a folder without an MLmodel file",
        str(tmp_path / "notes.txt"): "is not a PyTorch checkpoint: it is a text file",
        "": "The model reference is empty; pass models:/NAME@ALIAS, ",
    }
    for given, expected in cases.items():
        with pytest.raises(UserError) as info:
            check_model_uri(given, "teacher")
        message = str(info.value)
        assert message.startswith(f"teacher {given!r}: " if given else "teacher: "), message
        assert expected in message, (given, message)
        assert "\n" not in message
        # load_segmentor gives the same message, without the parameter.
        with pytest.raises(UserError) as loaded:
            load_segmentor(given)
        assert expected in str(loaded.value), given
    with pytest.raises(FileNotFoundError):  # still one for path callers
        check_model_uri(str(tmp_path / "missing.pth"))
