"""ImageNet feature distance on thing classes (MIC / DAFormer)."""

import pytest
import torch
import torch.nn as nn

from uda.config import load_config
from uda.data.labels import THING_CLASSES
from uda.models import build_segmentor
from uda.train.feature_distance import ImageNetFeatureDistance, downscale_label_ratio


class StrideFour(nn.Module):
    """A fixed feature extractor: 4x4 average pooling, then x2 channels."""

    def forward(self, img):
        pooled = nn.functional.avg_pool2d(img, 4)
        return [pooled, torch.cat([pooled, -pooled], dim=1)]


def test_downscale_label_ratio_majority_with_purity():
    label = torch.full((1, 1, 4, 6), 255)
    label[..., :2, :2] = 13  # pure thing cell -> 13
    label[..., :2, 2:4] = 0
    label[..., 0, 3] = 13  # 3/4 road -> road (0.75 kept)
    label[..., 2:, :2] = torch.tensor([[1, 1], [2, 2]])  # 2/4 -> ignore
    label[..., 2:, 2:4] = torch.tensor([[5, 5], [5, 255]])  # 3/4 pole
    # cells (0, 2) and (1, 2) stay all-ignore -> 255
    out = downscale_label_ratio(label, 2, 0.75, 19, 255)
    assert out.shape == (1, 1, 2, 3) and out.dtype == torch.int64
    assert out[0, 0].tolist() == [[13, 0, 255], [255, 5, 255]]
    strict = downscale_label_ratio(label, 2, 0.8, 19, 255)
    assert strict[0, 0].tolist() == [[13, 255, 255], [255, 255, 255]]
    with pytest.raises(ValueError, match="scale_factor"):
        downscale_label_ratio(label, 1, 0.75)


def test_loss_is_lambda_times_mean_distance_on_thing_cells():
    fd = ImageNetFeatureDistance(StrideFour(), feature_scale=1.0, lambda_=0.005)
    img = torch.randn(2, 3, 16, 16)
    label = torch.zeros(2, 1, 16, 16, dtype=torch.long)  # road everywhere
    label[0, :, :4, :4] = 13  # cell (0, 0) of image 0: car
    label[1, :, 8:12, 4:8] = 6  # cell (2, 1) of image 1: traffic light
    label[1, :, 12:, 12:] = 8  # vegetation: a stuff class
    imnet = fd.imagenet_features(img)
    assert imnet.shape == (2, 6, 4, 4)
    student = imnet.clone()
    student[0, :, 0, 0] += torch.tensor([3.0, 4.0, 0, 0, 0, 0])  # dist 5
    student[1, :, 2, 1] += 1.0  # dist √6
    student[1, :, 3, 3] += 100.0  # a stuff cell: ignored
    student.requires_grad_(True)
    loss, value = fd(img, label, [torch.zeros(1), student])
    expected = 0.005 * (5 + 6**0.5) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(value) == pytest.approx(expected, rel=1e-6)
    assert not value.requires_grad
    mask = fd.thing_mask(label, (4, 4))
    assert mask.sum() == 2 and mask[0, 0, 0] and mask[1, 2, 1]
    loss.backward()
    grad_cells = student.grad.abs().sum(1) > 0
    assert torch.equal(grad_cells, mask)


def test_zero_loss_without_thing_pixels():
    fd = ImageNetFeatureDistance(StrideFour(), feature_scale=1.0)
    img = torch.randn(1, 3, 16, 16)
    label = torch.zeros(1, 16, 16, dtype=torch.long)  # road: a stuff class
    label[:, :4] = 255
    label[:, 8:, 8:] = 5  # pole: stuff as well
    feat = (fd.imagenet_features(img) + 1).requires_grad_(True)
    loss, value = fd(img, label, feat)
    assert float(loss.detach()) == 0.0 and torch.isfinite(value)
    loss.backward()
    assert torch.equal(feat.grad, torch.zeros_like(feat))
    everything = ImageNetFeatureDistance(StrideFour(), feature_scale=1.0, classes=None)
    assert float(everything(img, label, feat)[1]) > 0  # any class


def test_with_a_segmentor_frozen_copy_and_feature_scale():
    cfg = load_config("default")
    torch.manual_seed(0)
    student = build_segmentor(cfg["student"]["model"]).train()
    fd = ImageNetFeatureDistance.from_segmentor(
        student,
        lambda_=cfg["uda"]["imnet_feature_dist_lambda"],
        classes=cfg["uda"]["imnet_feature_dist_classes"],
        scale_min_ratio=cfg["uda"]["imnet_feature_dist_scale_min_ratio"],
    )
    assert fd.feature_scale == 0.5 and tuple(fd.classes.tolist()) == THING_CLASSES
    assert all(not p.requires_grad for p in fd.parameters())
    fd.train()
    assert not fd.backbone.training
    img = torch.randn(2, 3, 64, 64)
    label = torch.full((2, 1, 64, 64), 13)
    # At the start the student is the ImageNet backbone: distance 0 (in eval
    # mode; in train mode FAN's BatchNorm uses batch statistics while the
    # frozen copy uses running ones, as in MIC/CKD).
    student.eval()
    out = student.forward_train(img, label, return_feat=True, crop_box=(0, 32, 0, 32))
    loss, _ = fd(img, label, out["features"])
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    student.train()
    with torch.no_grad():
        for p in student.backbone.parameters():
            p.add_(0.05)
    out = student.forward_train(img, label, return_feat=True, crop_box=(0, 32, 0, 32))
    loss, _ = fd(img, label, out["features"])
    assert float(loss.detach()) > 0  # the copy did not follow the student
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    with pytest.raises(ValueError, match="feature_scale"):
        fd(img, label, torch.zeros(2, 3, 4, 4))
