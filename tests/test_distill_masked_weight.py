"""The target weight of the masked (MIC) loss: ClassMix-mixed for the
distillation (the original CKD, leoil/ACDC_UDA_seg ``ckd_single.py``),
unmixed for the MIC teacher (lhoyer/MIC ``dacs.py``).

The real trainer runs one step; spies record what ``DACSAugmentation.mix``
returned and what ``select_masked_batch`` received and returned, and
delegate to the real functions (they observe, they change nothing)."""

from __future__ import annotations

import pytest
import torch

import uda.train.trainer as trainer_module
from uda.models import build_segmentor
from uda.train.batches import seed_everything
from uda.train.masking import masked_pseudo_weight

# Tiny trainers and their module fixtures (64-px crops, 4-px MIC blocks).
from test_train_loop import _trainer, batches, cfg, embedded_roots  # noqa: F401 (fixtures)


def _spied_step(trainer, batch, monkeypatch) -> dict:
    seen: dict = {}
    real_mix = trainer.augmentation.mix
    real_select = trainer_module.select_masked_batch

    def mix(*args, **kwargs):
        out = real_mix(*args, **kwargs)
        seen["unmixed_label"] = args[3].detach().clone()
        seen["unmixed_weight"] = args[4].detach().clone()
        seen["mixed_weight"] = out.weight.detach().clone()
        seen["mix_mask"] = out.mask.detach().clone()
        return out

    def select(mask_mode, source_img, source_label, target_img, pseudo_label, pseudo_weight):
        seen.setdefault("calls", 0)
        seen["calls"] += 1
        seen["mask_mode"] = mask_mode
        seen["pseudo_label"] = pseudo_label.detach().clone()
        seen["masked_input_weight"] = pseudo_weight.detach().clone()
        out = real_select(mask_mode, source_img, source_label, target_img, pseudo_label, pseudo_weight)
        seen["masked_weight"] = out[2].detach().clone()
        return out

    monkeypatch.setattr(trainer.augmentation, "mix", mix)
    monkeypatch.setattr(trainer_module, "select_masked_batch", select)
    losses = trainer.train_step(batch, 0).log_vars
    assert "masked.decode.loss_seg" in losses
    assert seen["calls"] == 1
    # The test only tells the two weights apart if ClassMix pasted some
    # source pixels whose pseudo weight is not already 1.
    pasted = seen["mix_mask"][:, 0].bool()
    assert pasted.any() and (~pasted).any()
    assert (seen["unmixed_weight"][pasted] != 1).any()
    return seen


def test_distill_masked_loss_uses_the_classmix_mixed_weight(cfg, batches, monkeypatch):
    seed_everything(1)
    frozen = build_segmentor(cfg["teacher"]["model"])
    trainer = _trainer(cfg, role="student", teacher=frozen)
    assert trainer.mode == "distill"
    seen = _spied_step(trainer, batches[0], monkeypatch)

    weight = seen["masked_input_weight"]
    pasted = seen["mix_mask"][:, 0].bool()
    # 1 on the pasted source pixels, the confidence weight elsewhere.
    expected = torch.where(pasted, torch.ones_like(weight), seen["unmixed_weight"])
    assert torch.equal(weight, expected)
    assert torch.equal(weight, seen["mixed_weight"])
    assert not torch.equal(weight, seen["unmixed_weight"])
    # What the masked forward gets (``separate``: first source, weight 1,
    # and first target crop), with the unmixed teacher label.
    assert seen["mask_mode"] == "separate"
    assert torch.equal(seen["masked_weight"][0], torch.ones_like(weight[0]))
    assert torch.equal(seen["masked_weight"][1], expected[0])
    assert torch.equal(seen["pseudo_label"], seen["unmixed_label"])


def test_mic_masked_loss_uses_the_unmixed_pseudo_weight(cfg, batches, monkeypatch):
    trainer = _trainer(cfg, role="teacher", teacher="ema")
    assert trainer.mode == "mic"
    seen = _spied_step(trainer, batches[0], monkeypatch)

    weight = seen["masked_input_weight"]
    assert torch.equal(weight, seen["unmixed_weight"])
    assert not torch.equal(weight, seen["mixed_weight"])
    assert torch.equal(seen["masked_weight"][1], seen["unmixed_weight"][0])
    assert torch.equal(seen["pseudo_label"], seen["unmixed_label"])


def test_masked_pseudo_weight_picks_by_teacher_mode():
    unmixed = torch.full((1, 2, 2), 0.25)
    mixed = torch.tensor([[[1.0, 0.25], [0.25, 1.0]]])
    assert masked_pseudo_weight("distill", unmixed, mixed) is mixed
    assert masked_pseudo_weight("mic", unmixed, mixed) is unmixed
    with pytest.raises(ValueError, match="'mic' or 'distill'"):
        masked_pseudo_weight("source_only", unmixed, mixed)
