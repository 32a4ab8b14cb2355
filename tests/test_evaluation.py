"""Tests of uda.evaluation (and its figures, drawn by uda.visualize) on real
files: a hand-made ACDC root with an oracle model (hand-computed metrics), and
the embedded synthetic data with a tiny real student (mmseg parity,
per-condition split, batch-size invariance, submission files, MLflow logging)."""

from __future__ import annotations

import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from uda import evaluation, visualize
from uda.config import load_config
from uda.data.dataset import acdc_dataset
from uda.data.labels import LABEL_IDS, NUM_CLASSES, train_id_to_label_id
from uda.data.pipelines import IMG_MEAN, IMG_STD
from uda.data.synthetic import ensure_embedded
from uda.errors import UserError
from uda.models import build_segmentor, save_checkpoint
from references import reference

IGNORE = 255


# ----------------------------------------------------------------------
# A hand-made ACDC root and a model that reads its answer from the image
# ----------------------------------------------------------------------
class RedChannelOracle(torch.nn.Module):
    """Predicts, per pixel, the class written in the red channel (class * 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def inference(self, img: torch.Tensor, mode=None) -> torch.Tensor:
        red = img[:, 0] * IMG_STD[0] + IMG_MEAN[0]
        ids = torch.round(red / 10).long().clamp(0, NUM_CLASSES - 1)
        return F.one_hot(ids, NUM_CLASSES).permute(0, 3, 1, 2).float()


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image_encoding(pred: np.ndarray) -> np.ndarray:
    rgb = np.zeros(pred.shape + (3,), np.uint8)
    rgb[..., 0] = pred * 10
    rgb[..., 1] = 77
    return rgb


# Two images of different sizes. fog (2x3): pixel (1, 1) is ignored.
FOG_GT = np.array([[0, 0, 1], [1, IGNORE, 2]], np.uint8)
FOG_PRED = np.array([[0, 1, 1], [1, 0, 2]], np.uint8)
# night (3x2): class 5 is predicted but absent from the ground truth.
NIGHT_GT = np.array([[3, 3], [3, 0], [0, 0]], np.uint8)
NIGHT_PRED = np.array([[3, 3], [0, 0], [0, 5]], np.uint8)


@pytest.fixture(scope="module")
def hand_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hand") / "acdc"
    for condition, seq, gt, pred in (
        ("fog", "GOPR0001", FOG_GT, FOG_PRED),
        ("night", "GOPR0002", NIGHT_GT, NIGHT_PRED),
    ):
        for split in ("val", "test"):
            name = f"{seq}_frame_00000{1 if split == 'val' else 2}"
            _write_png(
                root / "rgb_anon" / condition / split / seq / f"{name}_rgb_anon.png", _image_encoding(pred)
            )
            if split == "val":
                _write_png(root / "gt" / condition / split / seq / f"{name}_gt_labelTrainIds.png", gt)
    return root


def test_hand_computed_metrics(hand_root):
    dataset = evaluation.build_dataset(hand_root, "val", img_scale=None)
    result = evaluation.evaluate(RedChannelOracle(), dataset, batch_size=2, num_overlays=0)
    table = result.table
    fog, night = table.per_condition["fog"], table.per_condition["night"]
    # fog: class 0 I=1 U=2; class 1 I=2 U=3; class 2 I=1 U=1; 4 of 5 pixels right.
    assert fog.iou[:3] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert all(math.isnan(v) for v in fog.iou[3:])
    assert fog.miou == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert fog.pixel_accuracy == pytest.approx(4 / 5)
    # night: class 3 I=2 U=3; class 0 I=2 U=4; class 5 predicted only -> IoU 0, counted.
    assert (night.iou[0], night.iou[3], night.iou[5]) == pytest.approx((1 / 2, 2 / 3, 0.0))
    assert night.miou == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert night.pixel_accuracy == pytest.approx(4 / 6)
    # all: class 0 I=3 U=6, 1: 2/3, 2: 1, 3: 2/3, 5: 0; others NaN.
    assert [table.overall.iou[c] for c in (0, 1, 2, 3, 5)] == pytest.approx([1 / 2, 2 / 3, 1.0, 2 / 3, 0.0])
    assert table.miou == pytest.approx((1 / 2 + 2 / 3 + 1 + 2 / 3 + 0) / 5)
    assert table.overall.pixel_accuracy == pytest.approx(8 / 11)
    assert table.overall.mean_accuracy == pytest.approx((3 / 5 + 1 + 1 + 2 / 3) / 4)
    assert result.confusion.matrix.sum() == 11
    assert result.num_images == 2


def test_hand_case_matches_mmseg(hand_root):
    mmseg_metrics = reference("mmseg.core.evaluation.metrics")
    dataset = evaluation.build_dataset(hand_root, "val", img_scale=None)
    table = evaluation.evaluate(RedChannelOracle(), dataset, num_overlays=0).table
    ref = mmseg_metrics.mean_iou([FOG_PRED, NIGHT_PRED], [FOG_GT, NIGHT_GT], NUM_CLASSES, IGNORE)
    np.testing.assert_allclose(table.overall.iou, ref["IoU"], equal_nan=True)
    assert table.miou == pytest.approx(np.nanmean(ref["IoU"]))
    assert table.overall.pixel_accuracy == pytest.approx(ref["aAcc"])


def test_hand_case_submission_values_names_and_zip(hand_root, tmp_path):
    dataset = evaluation.build_dataset(hand_root, "test", img_scale=None)
    result = evaluation.write_submission(RedChannelOracle(), dataset, tmp_path, batch_size=2)
    expected = {
        "GOPR0001_frame_000002_rgb_anon.png": FOG_PRED,
        "GOPR0002_frame_000002_rgb_anon.png": NIGHT_PRED,
    }
    assert result.folder == tmp_path / "labelTrainIds"
    assert sorted(p.name for p in result.files) == sorted(expected)
    for path in result.files:
        with Image.open(path) as png:
            assert png.mode == "L"
            np.testing.assert_array_equal(np.asarray(png), expected[path.name])
    with zipfile.ZipFile(result.zip_path) as archive:
        assert sorted(archive.namelist()) == sorted(expected)
        for path in result.files:
            assert archive.read(path.name) == path.read_bytes()

    ids = evaluation.write_submission(RedChannelOracle(), dataset, tmp_path, label_ids=True)
    assert ids.folder.name == "labelIds" and ids.zip_path.name == "labelIds.zip"
    for path in ids.files:
        with Image.open(path) as png:
            np.testing.assert_array_equal(np.asarray(png), train_id_to_label_id(expected[path.name]))


def test_unlabelled_split_cannot_be_scored(hand_root):
    dataset = evaluation.build_dataset(hand_root, "test", img_scale=None)
    with pytest.raises(evaluation.EvaluationError, match="labelled split"):
        evaluation.evaluate(RedChannelOracle(), dataset)


def test_bad_requests_are_user_errors(hand_root, tmp_path):
    with pytest.raises(UserError, match="split must be val .* got 'train'"):
        evaluation.check_split("train")
    with pytest.raises(UserError, match="mode must be whole or slide"):
        evaluation.check_mode("sliding")
    assert evaluation.check_mode("") is None
    dataset = evaluation.build_dataset(hand_root, "val", img_scale=None)
    with pytest.raises(UserError, match="batch_size must be at least 1"):
        evaluation.evaluate(RedChannelOracle(), dataset, batch_size=0)
    with pytest.raises(UserError, match="ACDC root does not exist"):
        evaluation.build_dataset(tmp_path / "missing", "val")
    with pytest.raises(UserError, match="No such checkpoint"):
        evaluation.load_model(tmp_path / "missing.pth")


def test_duplicate_submission_names_are_refused(hand_root, tmp_path):
    # The same image name under two conditions would overwrite one PNG.
    root = tmp_path / "acdc"
    shutil.copytree(hand_root, root)
    night = root / "rgb_anon" / "night" / "test" / "GOPR0002"
    (night / "GOPR0002_frame_000002_rgb_anon.png").rename(night / "GOPR0001_frame_000002_rgb_anon.png")
    dataset = evaluation.build_dataset(root, "test", img_scale=None)
    with pytest.raises(evaluation.EvaluationError, match="same submission file"):
        evaluation.write_submission(RedChannelOracle(), dataset, tmp_path / "out")


# ----------------------------------------------------------------------
# Embedded synthetic data and a tiny real student
# ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return ensure_embedded(
        tmp_path_factory.mktemp("embedded"),
        num_source_train=1,
        num_source_val=0,
        num_target_train=0,
        num_target_val=2,
        num_target_test=1,
        target_size=(128, 72),
    )


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return build_segmentor(load_config("default")["student"]["model"]).eval()


# Input resized to 192x108 (ratio kept), logits resized back to 128x72.
IMG_SCALE = (192, 108)


def _real_predictions(model, dataset, **kwargs):
    preds, gts = [], []
    for item in evaluation.predict_dataset(model, dataset, **kwargs):
        preds.append(item.prediction.cpu().numpy())
        gts.append(item.label.cpu().numpy())
    return preds, gts


def test_real_predictions_at_label_size_match_mmseg(embedded, student):
    mmseg_metrics = reference("mmseg.core.evaluation.metrics")
    dataset = evaluation.build_dataset(embedded.acdc_root, "val", IMG_SCALE)
    preds, gts = _real_predictions(student, dataset)
    assert all(p.shape == g.shape == (72, 128) for p, g in zip(preds, gts))
    result = evaluation.evaluate(student, dataset, batch_size=3)
    ref = mmseg_metrics.mean_iou(preds, gts, NUM_CLASSES, IGNORE)
    np.testing.assert_allclose(result.table.overall.iou, ref["IoU"], equal_nan=True)
    np.testing.assert_allclose(result.table.overall.accuracy, ref["Acc"], equal_nan=True)
    assert result.table.overall.pixel_accuracy == pytest.approx(ref["aAcc"])
    assert result.table.miou == pytest.approx(np.nanmean(ref["IoU"]))
    conditions = [s.condition for s in dataset.samples]
    for condition, metrics in result.table.per_condition.items():
        picked = [i for i, c in enumerate(conditions) if c == condition]
        ref = mmseg_metrics.mean_iou(
            [preds[i] for i in picked], [gts[i] for i in picked], NUM_CLASSES, IGNORE
        )
        assert metrics.miou == pytest.approx(np.nanmean(ref["IoU"]))


def test_per_condition_split(embedded, student):
    dataset = evaluation.build_dataset(embedded.acdc_root, "val", IMG_SCALE)
    result = evaluation.evaluate(student, dataset, num_overlays=4)
    assert list(result.table.per_condition) == ["fog", "night", "rain", "snow"]
    total = sum(m.matrix for m in result.metrics.matrices.values())
    assert torch.equal(total, result.confusion.matrix)
    fog_only = evaluation.evaluate(
        student, acdc_dataset(embedded.acdc_root, "val", train=False, conditions=["fog"], img_scale=IMG_SCALE)
    )
    assert torch.equal(fog_only.confusion.matrix, result.metrics.matrices["fog"].matrix)
    # One overlay per condition: image | ground truth | prediction.
    assert [s.condition for s, _ in result.overlays] == ["fog", "night", "rain", "snow"]
    assert all(panel.ndim == 3 and panel.shape[2] == 3 for _, panel in result.overlays)


def test_results_do_not_depend_on_batch_size(embedded, student, tmp_path):
    dataset = evaluation.build_dataset(embedded.acdc_root, "val", IMG_SCALE)
    one = evaluation.evaluate(student, dataset, batch_size=1, num_overlays=0)
    three = evaluation.evaluate(student, dataset, batch_size=3, num_overlays=0)
    assert torch.equal(one.confusion.matrix, three.confusion.matrix)

    test_set = evaluation.build_dataset(embedded.acdc_root, "test", IMG_SCALE)
    a = evaluation.write_submission(student, test_set, tmp_path / "bs1", batch_size=1)
    b = evaluation.write_submission(student, test_set, tmp_path / "bs3", batch_size=3)
    assert [p.name for p in a.files] == [p.name for p in b.files]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a.files, b.files))
    assert a.zip_path.read_bytes() == b.zip_path.read_bytes()


def test_bf16_autocast_agrees_with_fp32_on_almost_every_pixel(embedded, student):
    dataset = evaluation.build_dataset(embedded.acdc_root, "val", IMG_SCALE)
    fp32 = evaluation.evaluate(student, dataset, num_overlays=0)
    bf16 = evaluation.evaluate(student, dataset, num_overlays=0, precision="bf16")
    assert bf16.confusion.matrix.sum() == fp32.confusion.matrix.sum()
    # Same pixels scored; bf16 rounding flips only near-tied argmaxes.
    changed = (bf16.confusion.matrix - fp32.confusion.matrix).abs().sum() / 2
    assert changed <= 0.02 * fp32.confusion.matrix.sum()
    assert bf16.table.miou == pytest.approx(fp32.table.miou, abs=0.01)


def test_mixed_image_sizes_are_batched_by_size(embedded, student, tmp_path):
    # Shrink every second val image (and its label) so sizes alternate.
    root = tmp_path / "acdc"
    shutil.copytree(embedded.acdc_root, root)
    images = sorted((root / "rgb_anon").rglob("val/*/*_rgb_anon.png"))
    for image in images[::2]:
        label = Path(
            str(image).replace("rgb_anon", "gt", 1).replace("_rgb_anon.png", "_gt_labelTrainIds.png")
        )
        for path, resample in ((image, Image.Resampling.BILINEAR), (label, Image.Resampling.NEAREST)):
            with Image.open(path) as img:
                img.resize((96, 54), resample).save(path)
    dataset = evaluation.build_dataset(root, "val", img_scale=None)
    sizes = {tuple(p.shape) for p, _ in zip(*_real_predictions(student, dataset))}
    assert sizes == {(54, 96), (72, 128)}
    one = evaluation.evaluate(student, dataset, batch_size=1, num_overlays=0)
    four = evaluation.evaluate(student, dataset, batch_size=4, num_overlays=0)
    assert torch.equal(one.confusion.matrix, four.confusion.matrix)


def test_real_submission_files(embedded, student, tmp_path):
    test_set = evaluation.build_dataset(embedded.acdc_root, "test", IMG_SCALE)
    result = evaluation.write_submission(student, test_set, tmp_path, batch_size=2)
    assert len(result.files) == len(test_set) == 4
    for sample, path in zip(test_set.samples, result.files):
        assert path.name == sample.image_path.name  # <name>_rgb_anon.png
        with Image.open(path) as png, Image.open(sample.image_path) as image:
            assert png.mode == "L" and png.size == image.size
            assert np.asarray(png).max() < NUM_CLASSES
    with zipfile.ZipFile(result.zip_path) as archive:
        assert sorted(archive.namelist()) == sorted(p.name for p in result.files)
    ids = evaluation.write_submission(student, test_set, tmp_path, label_ids=True)
    for train_png, id_png in zip(result.files, ids.files):
        train_ids = np.asarray(Image.open(train_png))
        label_ids = np.asarray(Image.open(id_png))
        assert set(np.unique(label_ids)) <= set(LABEL_IDS)
        np.testing.assert_array_equal(label_ids, train_id_to_label_id(train_ids))


def test_figures(embedded, student):
    import matplotlib.pyplot as plt

    dataset = evaluation.build_dataset(embedded.acdc_root, "val", IMG_SCALE)
    result = evaluation.evaluate(student, dataset, num_overlays=0)
    figure = visualize.confusion_matrix_figure(result.confusion)
    shown = figure.axes[0].images[0].get_array()
    counts = result.confusion.matrix.double().numpy()
    present = counts.sum(1) > 0
    np.testing.assert_allclose(shown[present].sum(1), 1.0)  # rows are shares
    assert shown.mask[~present].all()  # classes without ground truth stay blank
    plt.close(figure)
    figure = visualize.per_class_iou_figure(result.table)
    heights = [bar.get_height() for bar in figure.axes[0].patches]
    np.testing.assert_allclose(heights, np.nan_to_num(result.table.overall.iou))
    plt.close(figure)
    text = evaluation.format_table(result.table)
    assert f"{100 * result.table.miou:5.1f}" in text.splitlines()[1]


def test_log_evaluation_and_checkpoint_route(embedded, student, tracking_uri, tmp_path):
    import mlflow

    path = save_checkpoint(tmp_path / "student.pth", student)
    model, model_cfg = evaluation.load_model(path)
    assert model_cfg["backbone"] == "fan_nano_p4_hybrid"
    dataset = evaluation.build_dataset(embedded.acdc_root, "val", IMG_SCALE)
    result = evaluation.evaluate(model, dataset, num_overlays=2)
    with mlflow.start_run() as run:
        logged = evaluation.log_evaluation(result)
    client = mlflow.MlflowClient()
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["mIoU"] == pytest.approx(result.table.miou)
    assert metrics["mIoU.night"] == pytest.approx(result.table.per_condition["night"].miou)
    assert metrics["num_images"] == 8 and metrics["images_per_second"] > 0
    assert not any(math.isnan(v) for v in logged.values())
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/per_class.json",
        "evaluation/per_condition.json",
        "evaluation/confusion_matrix.json",
        "evaluation/confusion_matrix.png",
        "evaluation/per_class_iou.png",
        "evaluation/overlays",
    } <= artifacts
    table = mlflow.load_table("evaluation/per_class.json", run_ids=[run.info.run_id])
    assert list(table["class"])[:2] == ["road", "sidewalk"]
    counts = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/evaluation/confusion_matrix.json")
    assert np.array_equal(np.asarray(counts["overall"]), result.confusion.matrix.numpy())


def test_unknown_registered_model_is_a_user_error(tracking_uri):
    with pytest.raises(UserError, match="No registered model 'nobody'"):
        evaluation.load_model("models:/nobody@serving")
