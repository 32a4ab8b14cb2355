"""The original's released checkpoints through the pipeline, as a user runs it:
``mlflow run . -e import`` of the three distillation files, a re-import that
registers nothing, ``soup -P weights=3,3,4``, ``evaluate`` of the soup and of
the original-layout soup file, a test submission, and ``mlflow models serve``
of ``@serving``. The checkpoints are small (a FAN-tiny student, a MiT-nano
teacher) but in the original's exact layouts (tests/original_layouts.py); the
preset is a user file that extends the built-in ``cs2acdc``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

import original_layouts as layouts
from test_entrypoints import mlflow_run
from test_serving import _post, _request, _Server
from uda.config import load_config
from uda.data.paths import EMBEDDED_ROOT
from uda.data.synthetic import ensure_embedded
from uda.models import build_segmentor
from uda.registry import load_segmentor
from uda.serving import decode_png, example_image_png

NAME = "cs2acdc-student"
ITERATIONS = (24000, 32000, 40000)
ALIASES = ",".join(f"iter-{i}" for i in ITERATIONS)

#: A user's preset: the full recipe with small backbones, at the embedded
#: data's sizes (what a user writes to try the released files on a laptop).
USER_PRESET = """\
_base_: cs2acdc
name: original-tiny
data:
  source: {img_scale: [256, 128], crop_size: [128, 128]}
  target: {img_scale: [256, 144], crop_size: [128, 128]}
  workers_per_gpu: 0
teacher:
  model:
    backbone: mit_nano
    pretrained: null
    decode_head: {channels: 32, dilations: [1, 2, 3, 4]}
    hr_crop_size: [64, 64]
    test_cfg: {mode: slide, crop_size: [128, 128], stride: [64, 64]}
student:
  model:
    backbone: fan_tiny_8_p4_hybrid
    pretrained: null
    decode_head: {channels: 32, dilations: [1, 2, 3, 4]}
    hr_crop_size: [64, 64]
    test_cfg: {mode: slide, crop_size: [128, 128], stride: [64, 64]}
"""


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released files: three distillation checkpoints, a soup of them
    made by the original's soup.py procedure, the user's preset."""
    folder = tmp_path_factory.mktemp("released")
    preset = folder / "my-preset.yaml"
    preset.write_text(USER_PRESET)
    cfg = load_config(preset)
    torch.manual_seed(0)
    student = build_segmentor(cfg["student"]["model"]).state_dict()
    teacher = build_segmentor(cfg["teacher"]["model"]).state_dict()
    students = [layouts.perturbed(student, i) for i in range(3)]
    files = [
        layouts.ckd_distill(folder / f"fan_iter_{i // 1000}k.pth", s, teacher, student, i)
        for s, i in zip(students, ITERATIONS)
    ]
    # Weights 3:3:4 in the order 24k/32k/40k, so that it equals our soup.
    soup = layouts.ckd_soup(folder / "soup_fan_334.pth", files, [0.3, 0.3, 0.4])
    ensure_embedded()
    return {
        "folder": folder,
        "preset": preset,
        "files": files,
        "soup": soup,
        "students": students,
        "teacher": teacher,
    }


def _versions():
    client = mlflow.MlflowClient()
    return sorted(client.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))


def _ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _import(tracking_uri, released, *extra):
    files = ",".join(str(f) for f in released["files"])
    return mlflow_run("import", tracking_uri, f"checkpoints={files}", f"preset={released['preset']}", *extra)


def _evaluate(tracking_uri, released, model, *extra):
    result = _ok(
        mlflow_run(
            "evaluate", tracking_uri, f"model={model}", f"preset={released['preset']}", "device=cpu", *extra
        )
    )
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("entrypoint-tests").experiment_id],
        filter_string="tags.entry_point = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0], result


@pytest.mark.slow
def test_released_checkpoints_import_soup_evaluate_submit_and_serve(tracking_uri, released, tmp_path):
    # 1. import: three versions, kind=import, iter-<N> aliases from meta.iter
    result = _ok(_import(tracking_uri, released))
    assert "ckd-distill, prefix model., iteration 24000 (from the meta)" in result.stdout
    found = _versions()
    assert len(found) == 3
    aliases = mlflow.MlflowClient().get_registered_model(NAME).aliases
    for version, path, iteration in zip(found, released["files"], ITERATIONS):
        tags = version.tags
        assert tags["kind"] == "import"
        assert tags["iteration"] == str(iteration)
        assert tags["source_file"] == path.name
        assert tags["source_format"] == "ckd-distill"
        assert tags["source_prefix"] == "model."
        assert tags["role"] == "student"
        assert len(tags["source_sha256"]) == 64
        assert str(aliases[f"iter-{iteration}"]) == str(version.version)
    # The student only (model.*), stored once: no teacher, copy or optimizer.
    loaded, _ = load_segmentor(f"models:/{NAME}@iter-32000")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, released["students"][1][key]), key

    # 2. a re-import registers nothing new
    result = _ok(_import(tracking_uri, released))
    assert "reusing it" in result.stdout
    assert len(_versions()) == 3
    assert mlflow.MlflowClient().get_registered_model(NAME).aliases == aliases

    # 3. the headline command on the released ingredients
    _ok(
        mlflow_run(
            "soup",
            tracking_uri,
            "weights=3,3,4",
            f"aliases={ALIASES}",
            f"preset={released['preset']}",
            "device=cpu",
        )
    )
    soup, _ = load_segmentor(f"models:/{NAME}@serving")
    parts = [load_segmentor(f"models:/{NAME}@iter-{i}")[0].state_dict() for i in ITERATIONS]
    floating = 0
    for key, value in soup.state_dict().items():
        if value.is_floating_point():
            floating += 1
            torch.testing.assert_close(
                value,
                0.3 * parts[0][key] + 0.3 * parts[1][key] + 0.4 * parts[2][key],
                rtol=1e-6,
                atol=1e-7,
                msg=key,
            )
        else:  # integer buffers are kept, not averaged (DESIGN.md)
            assert torch.equal(value, parts[0][key]), key
    assert floating > 300

    # 4. evaluate the soup, and the original-layout soup file directly: the
    # same weights, so the same mIoU
    ours, _ = _evaluate(tracking_uri, released, f"models:/{NAME}@serving")
    theirs, _ = _evaluate(tracking_uri, released, str(released["soup"]))
    assert ours.data.metrics["mIoU"] == pytest.approx(theirs.data.metrics["mIoU"], abs=2e-3)

    # 5. the test submission from the original-layout file
    run, _ = _evaluate(tracking_uri, released, str(released["soup"]), "split=test")
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="submission", dst_path=tmp_path
    )
    [archive] = Path(local).glob("*.zip")
    with zipfile.ZipFile(archive) as zipped:
        names = [n for n in zipped.namelist() if n.endswith(".png")]
    assert len(names) == len(list((EMBEDDED_ROOT / "acdc").glob("rgb_anon/*/test/*/*.png")))

    # 6. serve @serving
    server = _Server(tracking_uri, tmp_path, 120, model_uri=f"models:/{NAME}@serving")
    try:
        server.wait_ready()
        status, answer = _post(server.invocations, _request(example_image_png(72, 100)))
    finally:
        server.stop()
    assert status == 200, answer
    labels = decode_png(answer["predictions"][0]["label_map"])
    assert labels.shape == (72, 100) and int(np.max(labels)) < 19
