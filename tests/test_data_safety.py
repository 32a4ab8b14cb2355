"""A user's dataset folders are only ever read.

Real-looking roots (Cityscapes and ACDC layouts, written by the generator and
then stripped of its marker, as a user's own copy would be) get sentinel
files, inside the roots and in a sibling folder. Every entry point runs with
every combination of real and default roots; afterwards the whole tree of the
user's folder must be identical, byte for byte: no file changed, added or
removed (the old bug replaced ``<parent of source_root>/{cityscapes,acdc}``
with synthetic data when either root was the default one).

The combinations run through ``main``, which starts ``teacher``, ``distill``,
``soup`` and ``evaluate`` as ``mlflow run`` child runs with the same roots:

========  ============  ============
 source    target       entry points
========  ============  ============
 real      real          main, teacher, distill, soup, evaluate
 real      default       main, teacher, distill, soup, evaluate
 default   real          main, teacher, distill, soup, evaluate
 default   default       main, teacher, distill, soup, evaluate
========  ============  ============
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest

from budgets import TINY_TRAINING_OPTIONS
from project_processes import PROJECT_ROOT, mlflow_run_command, process_env
from uda.data import rcs
from uda.data.layouts import scan_cityscapes
from uda.data.synthetic import embedded, ownership
from uda.data.paths import EMBEDDED_ROOT, GENERATED_MARKER, stats_dir
from uda.data.roots import RootError, classify_root, prepare_roots
from uda.data.synthetic import (
    NotGeneratedError,
    SyntheticConfig,
    clean_embedded,
    ensure_embedded,
    generate,
    is_generated,
)
from uda.data.synthetic import main as synthetic_main

EXPERIMENT = "data-safety"

USER_DATA = SyntheticConfig(
    seed=7,
    num_source_train=12,
    num_source_val=2,
    num_target_train=1,
    num_target_val=2,
    num_target_test=1,
    source_size=(256, 128),
    target_size=(128, 72),
)
SENTINELS = {
    "cityscapes/SENTINEL.bin": os.urandom(4096),
    "cityscapes/gtFine/train/README-user.txt": b"my labels, converted by hand\n",
    "acdc/SENTINEL.bin": os.urandom(4096),
    "acdc/rgb_anon/fog/notes.txt": b"do not delete\n",
    "other-project/SENTINEL.bin": os.urandom(1024),
}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: content digest, inode, mode and
    mtime, so that rewriting a file with the same bytes shows too."""
    tree = {}
    for path in sorted([root, *root.rglob("*")]):
        rel = path.relative_to(root).as_posix()
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        tree[rel] = (digest, info.st_ino, info.st_mode, info.st_mtime_ns)
    return tree


def make_user_data(folder: Path) -> Path:
    """A user's Cityscapes + ACDC: real layouts, no generator marker, no RCS cache."""
    generated = folder.parent / f"{folder.name}-generated"
    generate(generated, USER_DATA)
    shutil.copytree(generated, folder)
    shutil.rmtree(generated)
    for name in ("cityscapes", "acdc"):
        (folder / name / GENERATED_MARKER).unlink()
    for name in (rcs.STATS_FILE, rcs.STATS_DICT_FILE, rcs.SAMPLES_WITH_CLASS_FILE):
        (folder / "cityscapes" / name).unlink()
    for rel, data in SENTINELS.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    assert not is_generated(folder / "cityscapes") and not is_generated(folder / "acdc")
    return folder


class UserData:
    """The user's folder and a way to check that nothing under it changed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.home = folder.parent  # the parent too: the old bug wrote next to the roots
        self.before = snapshot(self.home)

    def untouched(self) -> bool:
        return snapshot(self.home) == self.before


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    return UserData(make_user_data(tmp_path_factory.mktemp("user") / "data"))


# ----------------------------------------------------------------------
# The rule, on the library functions (fast)
# ----------------------------------------------------------------------
def test_roots_are_classified_one_by_one(user, monkeypatch):
    folder = user.folder
    assert classify_root(EMBEDDED_ROOT / "cityscapes", "cityscapes").embedded
    assert classify_root(EMBEDDED_ROOT / "acdc", "acdc").embedded
    assert not classify_root(folder / "cityscapes", "cityscapes").embedded
    # the embedded root is fixed by the project, whatever the working directory
    monkeypatch.chdir(folder)
    assert EMBEDDED_ROOT == PROJECT_ROOT / "data" / "embedded"
    assert not classify_root("cityscapes", "cityscapes").embedded
    assert classify_root(PROJECT_ROOT / "data" / "embedded" / ".." / "embedded" / "acdc", "acdc").embedded


def test_real_roots_are_only_read(user, tmp_path, monkeypatch):
    folder = user.folder
    monkeypatch.setenv("UDA_CACHE_DIR", str(tmp_path / "cache"))
    assert prepare_roots(folder / "cityscapes", folder / "acdc") is None
    # rare-class statistics of a user's root go to the project cache, by default
    samples = scan_cityscapes(folder / "cityscapes", "train")
    counts = rcs.load_or_compute_class_counts(samples, folder / "cityscapes")
    rcs.RareClassSampler.from_samples(
        samples, folder / "cityscapes", temperature=0.01, min_pixels=12, min_crop_ratio=2.0
    )
    cached = stats_dir(folder / "cityscapes")
    assert cached.is_relative_to(tmp_path / "cache" / "rcs")
    assert (cached / rcs.STATS_FILE).is_file() and counts.shape == (12, 19)
    assert user.untouched()


def test_mic_statistics_in_a_user_root_are_reused_not_rewritten(tmp_path, monkeypatch):
    folder = make_user_data(tmp_path / "data")
    cityscapes = folder / "cityscapes"
    samples = scan_cityscapes(cityscapes, "train")
    # A MIC user's own file (only the main one, as MIC's converter writes it).
    rcs.load_or_compute_class_counts(samples, tmp_path / "mic", write_dir=tmp_path / "mic")
    shutil.copy2(tmp_path / "mic" / rcs.STATS_FILE, cityscapes / rcs.STATS_FILE)
    before = snapshot(folder)
    monkeypatch.setenv("UDA_CACHE_DIR", str(tmp_path / "cache"))
    rcs.load_or_compute_class_counts(samples, cityscapes)
    assert snapshot(folder) == before
    assert not (tmp_path / "cache").exists()  # nothing needed computing


def test_bad_roots_fail_before_anything_is_written(user, tmp_path):
    with pytest.raises(RootError, match="does not exist") as err:
        prepare_roots(tmp_path / "nowhere" / "cityscapes", EMBEDDED_ROOT / "acdc")
    assert "Cityscapes root does not exist" in str(err.value) and "leftImg8bit" in str(err.value)
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(RootError, match="is a file, not a folder"):
        prepare_roots(target_root=user.folder / "acdc" / "SENTINEL.bin")
    # data/embedded is reserved: the embedded Cityscapes is no ACDC root, nor its parent a root
    with pytest.raises(RootError, match="reserved"):
        prepare_roots(target_root=EMBEDDED_ROOT / "cityscapes")
    with pytest.raises(RootError, match="reserved"):
        prepare_roots(source_root=EMBEDDED_ROOT)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(RootError, match="cannot be read"):
        prepare_roots(source_root=loop)
    assert user.untouched()


def test_mixed_roots_warn_that_one_side_is_synthetic(user, caplog):
    folder = user.folder
    with caplog.at_level("WARNING", logger="uda.data.roots"):
        embedded = prepare_roots(folder / "cityscapes", EMBEDDED_ROOT / "acdc", progress=False)
    assert embedded is not None and embedded.acdc_root == EMBEDDED_ROOT / "acdc"
    assert "the target is the embedded synthetic ACDC" in caplog.text
    assert "Pass -P target_root=<your ACDC>" in caplog.text
    assert user.untouched()


SMALL = dict(
    num_source_train=1,
    num_source_val=1,
    num_target_train=1,
    num_target_val=1,
    num_target_test=0,
    conditions=("fog",),
    source_size=(64, 32),
    target_size=(64, 36),
)


def test_generator_refuses_folders_it_did_not_create(user, tmp_path):
    folder = user.folder
    with pytest.raises(NotGeneratedError, match="did not create"):
        ensure_embedded(folder, num_source_train=1)
    with pytest.raises(NotGeneratedError, match="Nothing was changed"):
        generate(folder, USER_DATA)
    assert synthetic_main(["--root", str(folder), "--force"]) == 2
    assert synthetic_main(["--root", str(folder), "--clean"]) == 2
    with pytest.raises(NotGeneratedError):
        clean_embedded(folder)
    assert user.untouched()

    # one foreign file in an otherwise generated copy is enough to refuse
    ensure_embedded(tmp_path, **SMALL)
    assert ensure_embedded(tmp_path, force=True, **SMALL)  # its own output: replaced
    (tmp_path / "acdc" / GENERATED_MARKER).unlink()
    (tmp_path / "acdc" / "mine.txt").write_text("user file")
    with pytest.raises(NotGeneratedError):
        ensure_embedded(tmp_path, **dict(SMALL, seed=3))
    with pytest.raises(NotGeneratedError):
        clean_embedded(tmp_path)
    assert (tmp_path / "acdc" / "mine.txt").read_text() == "user file"
    assert (tmp_path / "cityscapes" / "leftImg8bit").is_dir()  # refused before removing anything


def test_files_added_while_generating_stop_the_replacement(tmp_path, monkeypatch):
    ensure_embedded(tmp_path, **SMALL)
    real_generate = embedded.generate

    def generate_then_user_copies_in(root, config, progress=False):
        result = real_generate(root, config, progress)
        (tmp_path / "acdc" / GENERATED_MARKER).unlink()
        (tmp_path / "acdc" / "copied-meanwhile.png").write_bytes(b"mine")
        return result

    monkeypatch.setattr(embedded, "generate", generate_then_user_copies_in)
    with pytest.raises(NotGeneratedError):
        ensure_embedded(tmp_path, **dict(SMALL, seed=4))
    assert (tmp_path / "acdc" / "copied-meanwhile.png").read_bytes() == b"mine"
    assert not list(tmp_path.glob(".tmp-*"))


def test_symlinked_embedded_folders_are_refused(user, tmp_path, monkeypatch):
    folder = user.folder
    (tmp_path / "cityscapes").symlink_to(folder / "cityscapes")
    with pytest.raises(NotGeneratedError, match="symbolic link"):
        ensure_embedded(tmp_path, num_source_train=1)
    # The project's data/embedded/cityscapes linked to the user's data: the default
    # root is refused before any work; the user's own path is a real, read-only root.
    project = tmp_path / "project"
    (project / "data" / "embedded").mkdir(parents=True)
    (project / "data" / "embedded" / "cityscapes").symlink_to(folder / "cityscapes")
    fake_root = project / "data" / "embedded"
    from uda.data import roots as roots_module

    monkeypatch.setattr(roots_module, "EMBEDDED_ROOT", fake_root)
    with pytest.raises(RootError, match="symbolic link"):
        prepare_roots(source_root=fake_root / "cityscapes")
    assert not classify_root(folder / "cityscapes", "cityscapes").embedded
    assert prepare_roots(source_root=folder / "cityscapes") is None
    assert user.untouched()


def test_placeholder_readme_survives_generation_and_cleaning(tmp_path):
    (tmp_path / "acdc").mkdir()
    (tmp_path / "acdc" / "README.md").write_text("placeholder\n")
    ensure_embedded(tmp_path, **SMALL)
    assert (tmp_path / "acdc" / "README.md").read_text() == "placeholder\n"
    assert is_generated(tmp_path / "acdc")
    assert synthetic_main(["--root", str(tmp_path), "--clean"]) == 0
    assert sorted(p.name for p in (tmp_path / "acdc").iterdir()) == ["README.md"]
    assert not (tmp_path / "embedded.json").exists()
    assert not (tmp_path / "cityscapes").exists() or not any((tmp_path / "cityscapes").iterdir())
    ensure_embedded(tmp_path, **SMALL)  # and it regenerates after cleaning
    assert is_generated(tmp_path / "acdc") and is_generated(tmp_path / "cityscapes")


def _legacy_copy(root: Path) -> None:
    """Turns a generated copy into what the release before the marker wrote."""
    for name in ("cityscapes", "acdc"):
        (root / name / GENERATED_MARKER).unlink()
    stamp = json.loads((root / "embedded.json").read_text())
    del stamp["markers"]
    (root / "embedded.json").write_text(json.dumps(stamp))


def test_legacy_copy_in_the_project_folder_is_replaced(tmp_path, monkeypatch):
    """An unmarked copy from an earlier release, in the project's own data/embedded."""
    monkeypatch.setattr(ownership, "EMBEDDED_ROOT", tmp_path)
    ensure_embedded(tmp_path, **SMALL)
    _legacy_copy(tmp_path)
    assert is_generated(tmp_path / "acdc")
    ensure_embedded(tmp_path, **dict(SMALL, seed=5))
    assert json.loads((tmp_path / "embedded.json").read_text())["params"]["seed"] == 5
    assert is_generated(tmp_path / "acdc") and (tmp_path / "acdc" / GENERATED_MARKER).is_file()
    # a file the generator never writes means it is not (only) a generated copy
    _legacy_copy(tmp_path)
    (tmp_path / "acdc" / "gt" / "fog" / "my_gt_polygons.json").write_text("{}")
    assert not is_generated(tmp_path / "acdc")


def test_victims_of_the_old_bug_are_not_hit_again(tmp_path):
    """The old code left its stamp next to the roots it replaced: a user who restores
    real data there must not lose it to that stamp."""
    folder = tmp_path / "data"
    ensure_embedded(folder, **SMALL)  # what the old code wrote into the user's folder
    _legacy_copy(folder)
    shutil.rmtree(folder / "cityscapes")
    shutil.rmtree(folder / "acdc")
    make_user_data(tmp_path / "restored")
    for name in ("cityscapes", "acdc"):
        shutil.move(tmp_path / "restored" / name, folder / name)  # the user's backup, restored
    before = snapshot(folder)
    assert not is_generated(folder / "cityscapes")
    assert synthetic_main(["--root", str(folder)]) == 2
    assert synthetic_main(["--root", str(folder), "--clean"]) == 2
    assert snapshot(folder) == before


# ----------------------------------------------------------------------
# Every entry point, every combination of real and default roots
# ----------------------------------------------------------------------
TINY_PIPELINE = " ".join(
    TINY_TRAINING_OPTIONS
    + [
        "runner.max_iters=2",
        "checkpoint_config.interval=1",
        "evaluation.interval=2",
        "log_config.img_interval=2",
        "lr_config.warmup_iters=1",
    ]
)
COMBINATIONS = [("real", "real"), ("real", "default"), ("default", "real"), ("default", "default")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(root / "mlruns").as_uri())
    return {"root": root, "uri": uri, "cache": root / "cache"}


def _command(store, entry_point: str, params: dict) -> tuple[list[str], dict[str, str]]:
    env = process_env(
        store["uri"], UDA_CACHE_DIR=str(store["cache"]), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"
    )
    given = [f"{key}={value}" for key, value in params.items() if value is not None]
    return mlflow_run_command(entry_point, EXPERIMENT, given), env


def mlflow_run(store, entry_point: str, **params: object) -> subprocess.CompletedProcess:
    """`mlflow run . -e ENTRY_POINT` from the project folder, as a user runs it:
    a root that is not passed stays at its MLproject default."""
    cmd, env = _command(store, entry_point, params)
    return subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)


def mlflow_runs_at_once(store, jobs: list[tuple[str, dict]]) -> list[subprocess.CompletedProcess]:
    """Several `mlflow run` commands started together (two users on one store), each
    waited for; their output goes to files, so no pipe fills up."""
    started = []
    for k, (entry_point, params) in enumerate(jobs):
        cmd, env = _command(store, entry_point, params)
        out = open(store["root"] / f"job-{os.getpid()}-{k}.out", "w+")
        err = open(store["root"] / f"job-{os.getpid()}-{k}.err", "w+")
        started.append(
            (
                cmd,
                subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=out, stderr=err, text=True),
                out,
                err,
            )
        )
    results = []
    for cmd, process, out, err in started:
        code = process.wait(timeout=900)
        out.seek(0)
        err.seek(0)
        results.append(subprocess.CompletedProcess(cmd, code, out.read(), err.read()))
        out.close()
        err.close()
    return results


def runs_of(store, entry_point: str) -> list:
    client = mlflow.MlflowClient(store["uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [experiment.experiment_id],
        f"tags.`mlflow.project.entryPoint` = '{entry_point}'",
        order_by=["attributes.start_time DESC"],
    )


@pytest.mark.slow
def test_every_entry_point_leaves_real_roots_untouched(user, store):
    """``main`` (every entry point) on each combination of real and default roots, two
    combinations at a time on one store: first the incident (a real source, the
    embedded data generated during the run) beside the all-real one, which reads no
    embedded data; then the two with a default source."""
    folder = user.folder

    def job(source, target):
        roots = {
            "source_root": folder / "cityscapes" if source == "real" else None,
            "target_root": folder / "acdc" if target == "real" else None,
        }
        # A seed per combination: otherwise main would reuse a step finished with the same roots.
        seed = COMBINATIONS.index((source, target))
        return "main", dict(cfg_options=TINY_PIPELINE, soup_trials=2, seed=seed, **roots), roots

    for pair in ([("real", "default"), ("real", "real")], [("default", "real"), ("default", "default")]):
        if ("real", "default") in pair:
            clean_embedded(EMBEDDED_ROOT)  # the incident: generated during a run given a real root
        jobs = [job(*combination) for combination in pair]
        results = mlflow_runs_at_once(store, [(e, p) for e, p, _ in jobs])
        for (source, target), result, (_, params, roots) in zip(pair, results, jobs):
            assert result.returncode == 0, (source, target, result.stderr[-4000:])
            assert user.untouched(), (source, target)
            _check_combination(store, source, target, roots, params["seed"], result)


def _check_combination(store, source, target, roots, seed, result) -> None:
    """Every step of that combination's main run ran, on the roots it was given."""
    client = mlflow.MlflowClient(store["uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [main] = client.search_runs(
        [experiment.experiment_id], f"tags.entry_point = 'main' and params.seed = '{seed}'"
    )
    children = client.search_runs(
        [main.info.experiment_id], f"tags.`mlflow.parentRunId` = '{main.info.run_id}'"
    )
    assert sorted(r.data.tags["mlflow.project.entryPoint"] for r in children) == [
        "distill",
        "evaluate",
        "soup",
        "teacher",
        "teacher",
    ]  # the teacher and the source-only baseline
    assert all(r.info.status == "FINISHED" for r in children)
    expected = {
        side: str(root) if root is not None else str(EMBEDDED_ROOT / name)
        for (side, root), name in zip(roots.items(), ("cityscapes", "acdc"))
    }
    for run in children:
        step = run.data.tags["mlflow.project.entryPoint"]
        if step in ("teacher", "distill"):
            assert run.data.params["source_root"] == expected["source_root"]
            assert run.data.tags["data.cityscapes"] == ("real" if source == "real" else "embedded")
        assert run.data.params["target_root"] == expected["target_root"]
        if step == "evaluate":
            assert run.data.tags["data.acdc"] == ("real" if target == "real" else "embedded")
    if source != target:
        assert "Mixing data" in result.stderr
    if source == "real":  # its rare-class statistics were cached outside it
        assert any(store["cache"].glob(f"rcs/cityscapes-*/{rcs.STATS_FILE}"))
    if (source, target) == ("real", "default"):
        assert is_generated(EMBEDDED_ROOT / "cityscapes") and is_generated(EMBEDDED_ROOT / "acdc")


@pytest.mark.slow
def test_each_entry_point_alone_with_one_real_root(user, store):
    """The entry points as users start them, each root left at its default in turn
    (the reported incident is the first command). Runs after the pipelines above,
    whose teacher and student versions they use."""
    folder = user.folder
    budget = {"cfg_options": TINY_PIPELINE}
    steps = [
        ("teacher", dict(budget, source_root=folder / "cityscapes")),
        ("teacher", dict(budget, target_root=folder / "acdc")),
        ("distill", dict(budget, source_root=folder / "cityscapes")),
        ("distill", dict(budget, target_root=folder / "acdc")),
        (
            "soup",
            dict(
                budget, target_root=folder / "acdc", weights="1,1", aliases="iter-1,iter-2", promote="false"
            ),
        ),
        (
            "evaluate",
            dict(budget, target_root=folder / "acdc", split="test", model="models:/cs2acdc-student/latest"),
        ),
    ]
    for entry_point, params in steps:
        result = mlflow_run(store, entry_point, **params)
        assert result.returncode == 0, f"{entry_point}: {result.stderr[-4000:]}"
        assert user.untouched(), entry_point
        run = runs_of(store, entry_point)[0]
        assert run.info.status == "FINISHED"
        # MLflow logs a default `path` parameter as written; the run's tags say what it read.
        tags = run.data.tags
        if entry_point in ("teacher", "distill"):
            assert tags["data.cityscapes"] == ("real" if "source_root" in params else "embedded")
        if entry_point != "soup":
            assert tags["data.acdc"] == ("real" if "target_root" in params else "embedded")


def test_documented_defaults_are_the_embedded_roots():
    """MLproject's `path` defaults and the default preset, resolved from the project
    folder as `mlflow run .` does, are exactly the two embedded roots."""
    import yaml

    from uda.config import load_config

    project = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())
    expected = {"source_root": EMBEDDED_ROOT / "cityscapes", "target_root": EMBEDDED_ROOT / "acdc"}
    for name, entry in project["entry_points"].items():
        for key, param in entry["parameters"].items():
            if key in expected:
                assert (PROJECT_ROOT / param["default"]).resolve() == expected[key], (name, key)
    data = load_config("default")["data"]
    assert (PROJECT_ROOT / data["source"]["root"]).resolve() == expected["source_root"]
    assert (PROJECT_ROOT / data["target"]["root"]).resolve() == expected["target_root"]
