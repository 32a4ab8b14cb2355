"""Decode-head losses against hand-computed values (mmseg CE semantics)."""

import math

import pytest
import torch

from uda.models.losses import cross_entropy_loss, get_loss, logit_constraint_loss, pixel_accuracy


def _nll(logits, target):
    """-log softmax(logits)[target] for a plain list of floats."""
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def _two_pixel_logits():
    # (B=1, C=3, H=1, W=2): pixel 0 -> [1, 2, 0.5], pixel 1 -> [0, -1, 3]
    return torch.tensor([[[[1.0, 0.0]], [[2.0, -1.0]], [[0.5, 3.0]]]])


def test_ce_mean_over_all_pixels_ignored_count_as_zero():
    logits = _two_pixel_logits()
    label = torch.tensor([[[0, 255]]])
    expected = (_nll([1.0, 2.0, 0.5], 0) + 0.0) / 2  # divided by ALL pixels
    assert cross_entropy_loss(logits, label).item() == pytest.approx(expected)


def test_ce_weights_multiplied_before_mean():
    logits = _two_pixel_logits()
    label = torch.tensor([[[0, 2]]])
    weight = torch.tensor([[[0.5, 2.0]]])
    expected = (0.5 * _nll([1.0, 2.0, 0.5], 0) + 2.0 * _nll([0.0, -1.0, 3.0], 2)) / 2
    got = cross_entropy_loss(logits, label, weight)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ce_accepts_channel_dim_label_and_zero_weight():
    logits = _two_pixel_logits()
    label = torch.tensor([[[[1, 2]]]])  # (B, 1, H, W)
    assert cross_entropy_loss(logits, label, torch.zeros(1, 1, 2)).item() == 0.0
    expected = (_nll([1.0, 2.0, 0.5], 1) + _nll([0.0, -1.0, 3.0], 2)) / 2
    assert cross_entropy_loss(logits, label).item() == pytest.approx(expected)


def test_logit_constraint_normalises_by_l2_norm_plus_eps():
    # One pixel, logits [3, 4]: norm 5 -> [0.6, 0.8] (eps 1e-7 negligible).
    logits = torch.tensor([[[[3.0]], [[4.0]]]])
    label = torch.tensor([[[1]]])
    expected = _nll([3 / (5 + 1e-7), 4 / (5 + 1e-7)], 1)
    assert logit_constraint_loss(logits, label).item() == pytest.approx(expected, rel=1e-6)
    # Scale invariant (up to eps), unlike plain CE.
    assert logit_constraint_loss(10 * logits, label).item() == pytest.approx(expected, rel=1e-5)


def test_logit_constraint_eps_keeps_zero_logits_finite():
    logits = torch.zeros(1, 4, 2, 2, requires_grad=True)
    loss = logit_constraint_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(4))
    assert torch.isfinite(logits.grad).all()


def test_bf16_logits_computed_in_fp32():
    logits = _two_pixel_logits()
    label = torch.tensor([[[0, 2]]])
    got = cross_entropy_loss(logits.bfloat16(), label)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(cross_entropy_loss(logits, label).item(), rel=1e-2)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="does not match"):
        cross_entropy_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="one value per pixel"):
        cross_entropy_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(3))


def test_get_loss_names():
    assert get_loss("ce") is cross_entropy_loss
    assert get_loss("logit_constraint") is logit_constraint_loss
    with pytest.raises(ValueError, match="ce, logit_constraint"):
        get_loss("focal")


def test_pixel_accuracy_counts_ignored_as_misses():
    logits = _two_pixel_logits()  # argmax: pixel 0 -> 1, pixel 1 -> 2
    assert pixel_accuracy(logits, torch.tensor([[[1, 2]]])).item() == 100.0
    assert pixel_accuracy(logits, torch.tensor([[[1, 255]]])).item() == 50.0
