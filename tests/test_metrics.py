"""Tests of uda.metrics: hand-computed values, mmseg parity (of the metrics and of\nthe class ids made from logits), merging."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uda.data.labels import NUM_CLASSES
from uda.metrics import ConfusionMatrix, PerConditionMetrics, logits_to_labels
from references import reference

IGNORE = 255


def test_hand_computed_three_classes():
    # gt:   0 0 1 1 2 255
    # pred: 0 1 1 1 0 2     (last pixel ignored)
    gt = torch.tensor([[0, 0, 1], [1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = ConfusionMatrix(num_classes=3, ignore_index=IGNORE)
    cm.update(pred, gt)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # class 0: I=1, gt=2, pred=2 -> U=3; class 1: I=2, gt=2, pred=3 -> U=3;
    # class 2: I=0, gt=1, pred=0 -> U=1
    assert cm.iou().tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert cm.accuracy().tolist() == pytest.approx([1 / 2, 1.0, 0.0])
    assert cm.miou() == pytest.approx(1 / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)
    assert cm.summary().num_pixels == 5


def test_absent_class_rules():
    """Union 0 -> NaN and excluded; no GT but predicted -> IoU 0, counted."""
    cm = ConfusionMatrix(num_classes=4, ignore_index=IGNORE)
    gt = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 2])  # class 2 predicted, never in GT; 3 absent
    cm.update(pred, gt)
    iou = cm.iou()
    assert iou[0] == 1.0 and iou[1] == 0.5 and iou[2] == 0.0
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    acc = cm.accuracy()
    assert math.isnan(acc[2]) and math.isnan(acc[3])
    assert cm.mean_accuracy() == pytest.approx((1.0 + 0.5) / 2)


def test_empty_matrix_is_nan_not_error():
    cm = ConfusionMatrix(num_classes=2)
    cm.update(torch.full((2, 2), IGNORE), torch.full((2, 2), IGNORE))
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())


def test_uint8_labels_do_not_overflow():
    cm = ConfusionMatrix(num_classes=19)
    gt = torch.tensor([18, 18, 255], dtype=torch.uint8)
    pred = torch.tensor([18, 17, 3], dtype=torch.uint8)
    cm.update(pred, gt)
    assert cm.matrix[18, 18] == 1 and cm.matrix[18, 17] == 1
    assert int(cm.matrix.sum()) == 2


@pytest.mark.parametrize(
    "pred, gt, match",
    [
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), "shape"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), "class ids"),
        (torch.tensor([0, 3]), torch.tensor([0, 1]), "trainIds"),
        (torch.tensor([0, 1]), torch.tensor([0, 26]), "trainIds"),
        (torch.tensor([0, -1]), torch.tensor([0, 1]), "trainIds"),
    ],
)
def test_bad_inputs_raise_and_change_nothing(pred, gt, match):
    cm = ConfusionMatrix(num_classes=3)
    with pytest.raises(ValueError, match=match):
        cm.update(pred, gt)
    assert int(cm.matrix.sum()) == 0


def test_ignore_index_inside_class_range_rejected():
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(num_classes=19, ignore_index=0)


def _random_maps(rng, count, num_classes, shape=(6, 7)):
    """Random label maps with ignore pixels and classes absent from GT."""
    preds, gts = [], []
    for _ in range(count):
        gt = rng.integers(0, num_classes - 2, size=shape)  # last 2 never in GT
        gt[rng.random(shape) < 0.2] = IGNORE
        # The last class is never predicted either -> union 0 -> NaN.
        pred = rng.integers(0, num_classes - 1, size=shape)
        preds.append(pred.astype(np.int64))
        gts.append(gt.astype(np.int64))
    return preds, gts


def test_matches_mmseg_mean_iou():
    mmseg_metrics = reference("mmseg.core.evaluation.metrics")
    rng = np.random.default_rng(0)
    num_classes = 7
    preds, gts = _random_maps(rng, 5, num_classes)
    cm = ConfusionMatrix(num_classes=num_classes, ignore_index=IGNORE)
    for pred, gt in zip(preds, gts):
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    ref = mmseg_metrics.mean_iou(preds, gts, num_classes, IGNORE)
    np.testing.assert_allclose(cm.iou().numpy(), ref["IoU"], equal_nan=True)
    np.testing.assert_allclose(cm.accuracy().numpy(), ref["Acc"], equal_nan=True)
    assert cm.pixel_accuracy() == pytest.approx(float(ref["aAcc"]))
    # CustomDataset.evaluate reports nanmean of the per-class values.
    assert cm.miou() == pytest.approx(float(np.nanmean(ref["IoU"])))
    assert cm.mean_accuracy() == pytest.approx(float(np.nanmean(ref["Acc"])))
    # The fixture really exercises both absent-class rules.
    assert np.isnan(ref["IoU"][-1]) and ref["IoU"][-2] == 0


def test_logits_are_resized_like_mmseg():
    mmseg_ops = reference("mmseg.ops")
    logits = torch.randn(1, NUM_CLASSES, 9, 16, generator=torch.Generator().manual_seed(0))
    ours = logits_to_labels(logits, (27, 50))[0]
    ref = F.softmax(
        mmseg_ops.resize(logits, size=(27, 50), mode="bilinear", align_corners=False), dim=1
    ).argmax(1)[0]
    assert torch.equal(ours, ref)


def test_merge_equals_accumulating_everything():
    rng = np.random.default_rng(1)
    preds, gts = _random_maps(rng, 6, 5)
    together = ConfusionMatrix(num_classes=5)
    part_a, part_b = ConfusionMatrix(num_classes=5), ConfusionMatrix(5)
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        together.update(pred, gt)
        (part_a if i % 2 else part_b).update(pred, gt)
    added = part_a + part_b
    assert torch.equal(added.matrix, together.matrix)
    assert int(part_a.matrix.sum()) < int(added.matrix.sum())  # + is not in place
    part_a += part_b
    assert torch.equal(part_a.matrix, together.matrix)
    with pytest.raises(ValueError, match="num_classes"):
        part_a.merge(ConfusionMatrix(num_classes=4))
    together.reset()
    assert int(together.matrix.sum()) == 0


def test_all_reduce_without_process_group_is_noop():
    cm = ConfusionMatrix(num_classes=2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    before = cm.matrix.clone()
    assert torch.equal(cm.all_reduce().matrix, before)


def test_per_condition_table():
    rng = np.random.default_rng(2)
    conditions = ["fog", "night", "rain", "snow", "night", "fog"]
    preds, gts = _random_maps(rng, len(conditions), 19, shape=(8, 8))
    metrics = PerConditionMetrics()
    # One batch with per-image conditions, then single-condition updates.
    metrics.update(torch.from_numpy(np.stack(preds[:4])), torch.from_numpy(np.stack(gts[:4])), conditions[:4])
    for pred, gt, condition in zip(preds[4:], gts[4:], conditions[4:]):
        metrics.update(pred, gt, condition)

    reference = {name: ConfusionMatrix() for name in ("fog", "night", "rain", "snow")}
    overall = ConfusionMatrix()
    for pred, gt, condition in zip(preds, gts, conditions):
        reference[condition].update(pred, gt)
        overall.update(pred, gt)

    table = metrics.compute()
    assert table.miou == pytest.approx(overall.miou())
    assert table.overall.pixel_accuracy == pytest.approx(overall.pixel_accuracy())
    for name, matrix in reference.items():
        assert table.per_condition_miou[name] == pytest.approx(matrix.miou())
    assert list(table.per_class_iou())[:2] == ["road", "sidewalk"]

    flat = table.to_flat_dict(prefix="val/")
    assert flat["val/mIoU"] == pytest.approx(overall.miou())
    assert flat["val/mIoU.night"] == pytest.approx(reference["night"].miou())
    assert "val/IoU.traffic_light" in flat
    # Class 18 (bicycle) is never predicted nor in GT -> NaN -> not logged.
    assert "val/IoU.bicycle" not in flat
    rows = table.rows()
    assert len(rows) == 19 and rows[0]["class"] == "road"
    assert rows[0]["IoU.fog"] == pytest.approx(reference["fog"].iou()[0].item())

    with pytest.raises(ValueError, match="unknown condition"):
        metrics.update(preds[0], gts[0], "sunny")
    with pytest.raises(ValueError, match="one condition per image"):
        metrics.update(np.stack(preds[:2]), np.stack(gts[:2]), ["fog"])


def test_per_condition_merge():
    rng = np.random.default_rng(3)
    preds, gts = _random_maps(rng, 4, 19)
    a, b, both = PerConditionMetrics(), PerConditionMetrics(), PerConditionMetrics()
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        (a if i < 2 else b).update(pred, gt, "rain")
        both.update(pred, gt, "rain")
    a.merge(b)
    assert torch.equal(a.overall().matrix, both.overall().matrix)
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(PerConditionMetrics(conditions=("fog",)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_in_deterministic_mode():
    rng = np.random.default_rng(4)
    preds, gts = _random_maps(rng, 3, 19, shape=(64, 64))
    cpu, gpu = ConfusionMatrix(), ConfusionMatrix(device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # bincount without weights is allowed
    try:
        for pred, gt in zip(preds, gts):
            cpu.update(pred, gt)
            gpu.update(torch.from_numpy(pred).cuda(), torch.from_numpy(gt).cuda())
    finally:
        torch.use_deterministic_algorithms(previous)
    assert gpu.matrix.device.type == "cuda"
    assert torch.equal(gpu.matrix.cpu(), cpu.matrix)
    assert gpu.miou() == cpu.miou()
