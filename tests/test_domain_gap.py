"""The synthetic target is a real domain shift: source-only training loses mIoU.

A few-layer conv net is trained briefly on the synthetic Cityscapes (clear)
train split and evaluated on source val and on the synthetic ACDC val split
(fog/night/rain/snow). The generated data go through the real readers and
the test pipeline, as in the project.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from uda.data.dataset import SegmentationDataset
from uda.data.layouts import ACDC_CONDITIONS, scan_acdc, scan_cityscapes
from uda.data.pipelines import TestPipeline
from uda.data.synthetic import SyntheticConfig, generate

NUM_CLASSES = 19


def _load(samples):
    ds = SegmentationDataset(samples, TestPipeline(None, backend="numpy"))
    items = [ds[i] for i in range(len(ds))]
    return (
        torch.stack([i["img"] for i in items]),
        torch.stack([i["gt"] for i in items]),
        [i["condition"] for i in items],
    )


def _block(c_in, c_out, dilation=1, stride=1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def _miou(model, images, labels):
    model.eval()
    with torch.no_grad():
        logits = F.interpolate(model(images), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    pred = logits.argmax(1)
    valid = labels != 255
    hist = torch.bincount(labels[valid] * NUM_CLASSES + pred[valid], minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES
    )
    hist = hist.double()
    iou = hist.diag() / (hist.sum(0) + hist.sum(1) - hist.diag())
    return iou[hist.sum(1) > 0].mean().item()  # classes present in the labels


@pytest.mark.slow
def test_source_only_model_loses_miou_on_target(tmp_path):
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine this is ~10x faster than two.
    torch.set_num_threads(1)
    try:
        data = generate(
            tmp_path,
            SyntheticConfig(
                seed=0,
                num_source_train=24,
                num_source_val=8,
                num_target_train=0,
                num_target_val=4,
                num_target_test=0,
                source_size=(128, 64),
                target_size=(128, 72),
            ),
        )
        x_train, y_train, _ = _load(scan_cityscapes(data.cityscapes_root, "train"))
        x_src, y_src, _ = _load(scan_cityscapes(data.cityscapes_root, "val"))
        x_tgt, y_tgt, conditions = _load(scan_acdc(data.acdc_root, "val"))
        assert set(conditions) == set(ACDC_CONDITIONS)

        torch.manual_seed(0)
        model = nn.Sequential(
            _block(3, 16),
            _block(16, 24, stride=2),
            _block(24, 24, dilation=2),
            _block(24, 24, dilation=4),
            nn.Conv2d(24, NUM_CLASSES, 1),
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        order = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, len(x_train), (4,), generator=order)
            logits = F.interpolate(
                model(x_train[idx]), size=x_train.shape[-2:], mode="bilinear", align_corners=False
            )
            loss = F.cross_entropy(logits, y_train[idx], ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        source = _miou(model, x_src, y_src)
        target = _miou(model, x_tgt, y_tgt)
        per_condition = {
            c: _miou(
                model,
                x_tgt[[i for i, k in enumerate(conditions) if k == c]],
                y_tgt[[i for i, k in enumerate(conditions) if k == c]],
            )
            for c in ACDC_CONDITIONS
        }
    finally:
        torch.set_num_threads(threads)
    print(
        f"source val mIoU {source:.3f}, target val mIoU {target:.3f}, "
        f"{ {c: round(v, 3) for c, v in per_condition.items()} }"
    )
    assert source > 0.2, "the model did not learn the source; the gap would be meaningless"
    assert target < source - 0.1
    assert all(v < source - 0.05 for v in per_condition.values()), per_condition
