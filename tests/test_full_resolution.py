"""The recipe's real sizes end to end, through ``mlflow run``: Cityscapes at
2048x1024 and ACDC at 1920x1080 (synthetic, in the real layouts, as a user's
dataset: only read), 1024x1024 crops with 512x512 detail crops, slide
inference with 1024x1024 windows at stride 512, a 1920x1080 submission and a
1920x1080 PNG sent to the served model. The ``cs2acdc-smoke`` preset keeps
every size of ``cs2acdc`` and only shrinks the backbones and the schedule."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from test_entrypoints import mlflow_run
from test_serving import _post, _request, _Server
from uda.config import load_config
from uda.data.synthetic import SyntheticConfig, generate
from uda.serving import decode_png

SOURCE_SIZE, TARGET_SIZE = (2048, 1024), (1920, 1080)
STUDENT = "smoke-student"
TEACHER = "smoke-teacher"


def test_smoke_preset_keeps_every_size_of_the_recipe():
    full, smoke = load_config("cs2acdc"), load_config("cs2acdc-smoke")
    assert smoke["data"] == {**full["data"], "workers_per_gpu": 0}
    assert smoke["uda"] == full["uda"]
    for role in ("teacher", "student"):
        for key in (
            "scales",
            "hr_crop_size",
            "test_cfg",
            "crop_coord_divisible",
            "hr_slide_inference",
            "feature_scale",
        ):
            assert smoke[role]["model"][key] == full[role]["model"][key], (role, key)
        assert smoke[role]["model"]["pretrained"] is None
    assert full["data"]["target"]["img_scale"] == list(TARGET_SIZE)
    assert full["data"]["source"]["img_scale"] == list(SOURCE_SIZE)


@pytest.fixture(scope="module")
def full_size_data(tmp_path_factory):
    """A few images at the real resolutions, written like a user's dataset
    (outside data/embedded: the pipeline only reads it)."""
    root = tmp_path_factory.mktemp("full-size")
    # Seed 2: every class of these 4 source images has one image above the
    # recipe's rare-class min_pixels=3000 (MIC's sampler requires it).
    return generate(
        root,
        SyntheticConfig(
            seed=2,
            num_source_train=4,
            num_source_val=1,
            num_target_train=1,
            num_target_val=1,
            num_target_test=1,
            source_size=SOURCE_SIZE,
            target_size=TARGET_SIZE,
        ),
    )


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + "\n" + result.stderr[-5000:]
    return result


def _latest_run(entry_point):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("entrypoint-tests")
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.entry_point = '{entry_point}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]


@pytest.mark.slow
def test_full_resolution_pipeline_through_mlflow_run(tracking_uri, full_size_data, tmp_path, monkeypatch):
    monkeypatch.setenv("UDA_CACHE_DIR", str(tmp_path / "cache"))
    roots = (f"source_root={full_size_data.cityscapes_root}", f"target_root={full_size_data.acdc_root}")
    common = ("preset=cs2acdc-smoke", "device=cpu")

    _ok(
        mlflow_run(
            "teacher",
            tracking_uri,
            *roots,
            *common,
            "iterations=2",
            "checkpoint_interval=2",
            f"model_name={TEACHER}",
        )
    )
    _ok(
        mlflow_run(
            "distill",
            tracking_uri,
            *roots,
            *common,
            f"teacher=models:/{TEACHER}@iter-2",
            f"model_name={STUDENT}",
        )
    )
    client = mlflow.MlflowClient()
    aliases = client.get_registered_model(STUDENT).aliases
    assert {"iter-1", "iter-2", "iter-3"} <= set(aliases)
    distill = _latest_run("distill")
    assert distill.data.params["cfg.data.target.img_scale"] == "[1920, 1080]"
    assert "val_mIoU" in client.get_model_version(STUDENT, aliases["iter-3"]).tags

    _ok(mlflow_run("soup", tracking_uri, roots[1], *common, "weights=3,3,4", f"model_name={STUDENT}"))
    soup = client.get_model_version(STUDENT, client.get_registered_model(STUDENT).aliases["serving"])
    assert soup.tags["kind"] == "soup"
    assert soup.tags["soup.weights"] == "0.3,0.3,0.4"

    # val at 1920x1080 by slide inference
    _ok(mlflow_run("evaluate", tracking_uri, roots[1], *common, f"model=models:/{STUDENT}@serving"))
    run = _latest_run("evaluate")
    assert run.data.metrics["num_images"] == 4
    assert 0.0 <= run.data.metrics["mIoU"] <= 1.0

    # the test submission: 1920x1080 PNGs of trainIds 0..18
    _ok(
        mlflow_run(
            "evaluate", tracking_uri, roots[1], *common, "split=test", f"model=models:/{STUDENT}@serving"
        )
    )
    run = _latest_run("evaluate")
    folder = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="submission", dst_path=str(tmp_path / "submission")
    )
    [archive] = Path(folder).glob("*.zip")
    with zipfile.ZipFile(archive) as zipped:
        names = [n for n in zipped.namelist() if n.endswith(".png")]
        assert len(names) == 4
        for name in names:
            labels = np.array(Image.open(io.BytesIO(zipped.read(name))))
            assert labels.shape == (TARGET_SIZE[1], TARGET_SIZE[0])
            assert labels.max() <= 18

    # one 1920x1080 PNG to the served model
    frame = next(full_size_data.acdc_root.glob("rgb_anon/*/val/*/*.png"))
    server = _Server(tracking_uri, tmp_path, 300, model_uri=f"models:/{STUDENT}@serving")
    try:
        server.wait_ready()
        status, answer = _post(server.invocations, _request(frame.read_bytes()), timeout_s=300)
    finally:
        server.stop()
    assert status == 200, answer
    labels = decode_png(answer["predictions"][0]["label_map"])
    assert labels.shape == (TARGET_SIZE[1], TARGET_SIZE[0])
    assert labels.max() <= 18
