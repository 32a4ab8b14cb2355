"""`mlflow run . -e soup --env-manager local` end to end, against a store
with registered checkpoints (the template of test_soup_step)."""

from __future__ import annotations

import shutil

import mlflow
import pytest
import torch

from uda.registry import load_segmentor

from test_entrypoints import mlflow_run
from test_soup_step import IMG_SCALE, NAME, template  # noqa: F401 (fixture)


@pytest.fixture
def copied_store(template, tracking_uri, tmp_path):  # noqa: F811
    shutil.copyfile(template["db"], tmp_path / "mlflow.db")
    return template


def _params(store, *extra):
    return (
        f"target_root={store['acdc']}",
        f"cfg_options=data.target.img_scale=[{IMG_SCALE[0]},{IMG_SCALE[1]}]",
        "device=cpu",
        *extra,
    )


def _aliases():
    return {a: str(v) for a, v in mlflow.MlflowClient().get_registered_model(NAME).aliases.items()}


@pytest.mark.slow
def test_soup_entry_point_mixes_registers_and_serves(copied_store, tracking_uri):
    result = mlflow_run(
        "soup", tracking_uri, *_params(copied_store, "weights=3,3,4", "aliases=iter-40,iter-80,iter-120")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter-40 (version" in result.stdout
    client = mlflow.MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("entrypoint-tests").experiment_id])
    assert run.info.status == "FINISHED"
    version = client.get_model_version(NAME, run.data.tags["soup.version"])
    assert version.tags["kind"] == "soup"
    assert version.tags["soup.weights"] == "0.3,0.3,0.4"
    assert version.run_id == run.info.run_id
    assert _aliases()["serving"] == str(version.version)
    for name in ("soup", "uniform", "iter-40", "iter-80", "iter-120"):
        assert f"report.mIoU.{name}" in run.data.metrics
    soup, _ = load_segmentor(f"models:/{NAME}@serving")
    parts = [
        load_segmentor(f"models:/{NAME}@{a}")[0].state_dict() for a in ("iter-40", "iter-80", "iter-120")
    ]
    key = "decode_head.head.conv_seg.weight"
    key = key if key in parts[0] else next(k for k, v in parts[0].items() if v.is_floating_point())
    torch.testing.assert_close(
        soup.state_dict()[key], 0.3 * parts[0][key] + 0.3 * parts[1][key] + 0.4 * parts[2][key]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "weights, message",
    [
        ("3,x,4", "error: weight 2 ('x') in '3,x,4' is not a number"),
        # A value starting with '-' reaches the script as a value, not an option.
        ("-1,1,1", "error: weight 1 is negative (-1)"),
    ],
)
def test_soup_entry_point_bad_weights_is_one_clear_error(copied_store, tracking_uri, weights, message):
    mlflow.MlflowClient().set_registered_model_alias(NAME, "serving", "3")
    before = len(mlflow.MlflowClient().search_model_versions(f"name='{NAME}'"))
    result = mlflow_run(
        "soup", tracking_uri, *_params(copied_store, f"weights={weights}", "aliases=iter-40,iter-80,iter-120")
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr.split("mlflow.exceptions")[0]
    assert len(mlflow.MlflowClient().search_model_versions(f"name='{NAME}'")) == before
    assert _aliases()["serving"] == "3"
