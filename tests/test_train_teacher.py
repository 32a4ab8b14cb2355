"""EMA teacher (MIC update rule, modes) and frozen distillation teacher."""

import pytest
import torch
import torch.nn as nn

from uda.config import load_config
from uda.models import build_segmentor
from uda.train.teacher import EMATeacher, FrozenTeacher, ema_alpha, pseudo_label_and_weight


def tiny_model_cfg():
    cfg = load_config("default")["teacher"]["model"]
    cfg["drop_path_rate"] = 0.1  # stochastic depth must be off for labels
    return cfg


@pytest.fixture
def student():
    torch.manual_seed(0)
    return build_segmentor(tiny_model_cfg()).train()


def target_batch(seed=0):
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_alpha_schedule():
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(2, 0.999) == pytest.approx(2 / 3)
    assert ema_alpha(9, 0.999) == pytest.approx(0.9)
    assert ema_alpha(999, 0.999) == pytest.approx(0.999)
    assert ema_alpha(5000, 0.999) == 0.999


def test_ema_update_matches_hand_computation(student):
    teacher = EMATeacher(student, alpha=0.999)
    perturb(student, 1)
    assert teacher.update(student, 0) == 0.0  # iteration 0: plain copy
    for name, value in params(student).items():
        assert torch.equal(dict(teacher.model.named_parameters())[name], value)
    expected = params(teacher.model)
    for it in (1, 2, 3):
        perturb(student, 10 + it)
        now = params(student)
        alpha = 1 - 1 / (it + 1)
        assert teacher.update(student, it) == pytest.approx(alpha)
        for name in expected:
            expected[name] = alpha * expected[name] + (1 - alpha) * now[name]
            assert torch.allclose(
                dict(teacher.model.named_parameters())[name], expected[name], rtol=1e-6, atol=1e-7
            ), name
    # with a small bound the bound wins immediately
    slow = EMATeacher(student, alpha=0.25)
    before = params(slow.model)
    perturb(student, 99)
    slow.update(student, 5)
    for name, value in params(student).items():
        assert torch.allclose(
            dict(slow.model.named_parameters())[name], 0.25 * before[name] + 0.75 * value, atol=1e-7
        )


def test_ema_teacher_is_frozen_and_independent(student):
    teacher = EMATeacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    first = next(teacher.model.parameters())
    assert first.data_ptr() != next(student.parameters()).data_ptr()
    labels, weight = teacher.pseudo_label(target_batch())
    assert labels.shape == (2, 64, 64) and labels.dtype == torch.int64
    assert weight.shape == (2, 64, 64) and not weight.requires_grad
    assert student.training  # the student's mode is not touched


def test_ema_teacher_mic_modes(student):
    """MIC: BN in train mode (batch statistics, own running stats), dropout
    and drop-path off; buffers are not copied from the student."""
    teacher = EMATeacher(student, batchnorm_train=True)
    img = target_batch(1)
    first = teacher(img)
    assert torch.equal(first, teacher(img))  # no dropout / drop path
    drops = [m for m in teacher.model.modules() if type(m).__name__ in ("DropPath", "Dropout2d")]
    assert drops and not any(m.training for m in drops)
    bns = [m for m in teacher.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)
    tracked = int(bns[0].num_batches_tracked)
    assert tracked > 0  # the teacher updated its own running statistics
    # batch statistics: the logits of an image depend on its batch partner
    other = torch.cat([img[:1], target_batch(2)[:1]])
    assert not torch.allclose(teacher(other)[0], first[0], atol=1e-5)
    with torch.no_grad():
        bns_student = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
        bns_student[0].running_mean.fill_(3.0)
    teacher.update(student, 1)
    assert not torch.equal(bns[0].running_mean, bns_student[0].running_mean)


def test_ema_teacher_eval_variant_copies_buffers(student):
    teacher = EMATeacher(student, batchnorm_train=False)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.5)
    teacher.update(student, 3)
    for (name, a), (_, b) in zip(teacher.model.named_buffers(), student.named_buffers()):
        assert torch.equal(a, b), name
    before = [b.clone() for b in teacher.model.buffers()]
    img = target_batch(3)
    teacher(img)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.model.buffers()))
    assert not any(m.training for m in teacher.model.modules())


def test_ema_teacher_rejects_a_different_student(student):
    teacher = EMATeacher(student)
    other = build_segmentor(load_config("default")["student"]["model"])
    with pytest.raises(ValueError, match="does not match"):
        teacher.update(other, 1)
    with pytest.raises(ValueError, match="generate_pseudo_label"):
        EMATeacher(nn.Linear(2, 2))


def test_frozen_teacher_stays_in_eval_without_grads():
    torch.manual_seed(1)
    model = build_segmentor(tiny_model_cfg())
    teacher = FrozenTeacher(model, pseudo_threshold=0.5)
    assert all(not p.requires_grad for p in model.parameters())
    teacher.train()
    assert not model.training
    assert not any(m.training for m in model.modules())
    buffers = [b.clone() for b in model.buffers()]
    img = target_batch(4)
    labels, weight = teacher.pseudo_label(img)
    # the teacher's own eval-mode prediction, unchanged BN statistics
    with torch.no_grad():
        ref_labels, ref_weight = pseudo_label_and_weight(model.generate_pseudo_label(img), 0.5)
    assert torch.equal(labels, ref_labels) and torch.equal(weight, ref_weight)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    # single-image predictions do not depend on the batch (running stats)
    assert torch.allclose(teacher(img[:1])[0], teacher(img)[0], atol=1e-5)
    with torch.inference_mode():
        inf_labels, _ = teacher.pseudo_label(img)
    assert torch.equal(inf_labels, labels)
