"""Runs' dataset inputs carry the digest of their file list, not of their path: the
embedded ACDC and a real one later put at the same path are two datasets, and two
identical copies at different paths are one (real SQLite store, real folders)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow

from uda import tracking
from uda.data.fingerprint import file_list_digest
from uda.data.paths import GENERATED_MARKER
from uda.data.synthetic import SyntheticConfig, generate

TINY = dict(
    num_source_train=1,
    num_source_val=1,
    num_target_train=1,
    num_target_val=2,
    num_target_test=0,
    conditions=("fog", "night"),
    source_size=(64, 32),
    target_size=(64, 36),
)


def _logged(root: Path, experiment: str = "inputs") -> mlflow.entities.Dataset:
    """Logs ``root`` as the input of a new run; returns the dataset as the store has it."""
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        tracking.log_dataset_inputs({"acdc/val": root}, "evaluation")
    (dataset_input,) = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert [t.value for t in dataset_input.tags if t.key == "mlflow.data.context"] == ["evaluation"]
    return dataset_input.dataset


def _path(dataset: mlflow.entities.Dataset) -> Path:
    assert dataset.source_type == "local"
    return Path(json.loads(dataset.source)["uri"])


def test_another_tree_at_the_same_path_is_another_dataset(tracking_uri, tmp_path):
    acdc = tmp_path / "datasets" / "acdc"
    generate(tmp_path / "embedded", SyntheticConfig(seed=1, **TINY))
    shutil.copytree(tmp_path / "embedded" / "acdc", acdc)
    first = _logged(acdc)
    assert first.name == "acdc/val" and _path(first) == acdc.resolve()
    # A user's ACDC (another tree, unmarked) moved to the same path.
    shutil.rmtree(acdc)
    generate(tmp_path / "user", SyntheticConfig(seed=2, **dict(TINY, num_target_val=3)))
    shutil.copytree(tmp_path / "user" / "acdc", acdc)
    (acdc / GENERATED_MARKER).unlink()
    second = _logged(acdc)
    assert second.digest != first.digest
    assert second.name == first.name and second.source == first.source


def test_identical_trees_at_two_paths_are_one_dataset(tracking_uri, tmp_path):
    generate(tmp_path / "one", SyntheticConfig(seed=1, **TINY))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    # Each in its own experiment, so that each keeps its own source (within one experiment
    # MLflow keys a dataset by name and digest).
    one = _logged(tmp_path / "one" / "acdc", "first")
    two = _logged(tmp_path / "two" / "acdc", "second")
    assert one.digest == two.digest
    assert _path(one) == (tmp_path / "one" / "acdc").resolve()
    assert _path(two) == (tmp_path / "two" / "acdc").resolve()
    assert one.name == two.name == "acdc/val"


def test_the_digest_is_the_file_list_names_and_sizes(tmp_path):
    root = tmp_path / "tree"
    (root / "gt" / "fog").mkdir(parents=True)
    (root / "gt" / "fog" / "a.png").write_bytes(b"12345")
    (root / "rgb.png").write_bytes(b"123")
    digest = file_list_digest(root)
    assert len(digest) == 10 and digest == file_list_digest(str(root))
    shutil.copytree(root, tmp_path / "copy")
    os.utime(tmp_path / "copy" / "rgb.png", (0, 0))  # a copy need not keep mtimes
    assert file_list_digest(tmp_path / "copy") == digest
    (root / "rgb.png").write_bytes(b"abc")  # same name, same size: the listing cannot tell
    assert file_list_digest(root) == digest
    (root / "rgb.png").write_bytes(b"abcd")
    assert file_list_digest(root) != digest
    (root / "rgb.png").write_bytes(b"123")
    (root / "gt" / "fog" / "a.png").rename(root / "gt" / "fog" / "b.png")
    assert file_list_digest(root) != digest
    (root / "gt" / "fog" / "b.png").rename(root / "gt" / "fog" / "a.png")
    (root / "gt" / "empty").mkdir()  # folders without files are not part of the list
    assert file_list_digest(root) == digest
    (root / "loop").symlink_to(root)  # a link loop: the root is listed once, and the listing ends
    assert file_list_digest(root) == digest
    assert file_list_digest(tmp_path / "missing") == file_list_digest(root / "gt" / "empty")
