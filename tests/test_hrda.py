"""HRDA segmentor: crops, fusion formula, losses, inference modes, builder."""

import pytest
import torch
import torch.nn.functional as F

from uda.models import HRDASegmentor, ModelConfigError, build_segmentor, count_parameters, normalize_model_cfg
from uda.models.windows import get_crop_bbox, slide_windows
from uda.models.losses import cross_entropy_loss

NUM_CLASSES = 5


def tiny_cfg(**overrides):
    cfg = {
        "backbone": "mit_nano",
        "drop_path_rate": 0.0,
        "num_classes": NUM_CLASSES,
        "decode_head": {"channels": 16, "dilations": [1, 2]},
        "hr_crop_size": [32, 32],
        "test_cfg": {"mode": "slide", "crop_size": [64, 64], "stride": [32, 32], "batched_slide": True},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_segmentor(tiny_cfg()).eval()


# --------------------------------------------------------------- crops
def test_crop_boxes_aligned_and_inside():
    gen = torch.Generator().manual_seed(0)
    seen_y = set()
    for _ in range(300):
        y1, y2, x1, x2 = get_crop_bbox(100, 70, (48, 40), 8, gen)
        assert y1 % 8 == 0 and x1 % 8 == 0
        assert 0 <= y1 and y2 <= 100 and 0 <= x1 and x2 <= 70
        assert (y2 - y1, x2 - x1) == (48, 40)
        seen_y.add(y1)
    # margin 52 -> MIC: randint(0, 53 // 8) * 8, upper bound exclusive, so
    # offsets 0, 8, ..., 40 (never 48).
    assert seen_y == set(range(0, 41, 8))
    assert get_crop_bbox(32, 32, (32, 32), 8) == (0, 32, 0, 32)


def test_slide_windows_cover_and_stay_inside():
    boxes = slide_windows(1080, 1920, (1024, 1024), (512, 512))
    assert len(boxes) == 6  # 2 rows x 3 columns, as mmseg for ACDC
    cover = torch.zeros(1080, 1920)
    for y1, y2, x1, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (1024, 1024)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    assert slide_windows(40, 50, (64, 64), (32, 32)) == [(0, 40, 0, 50)]


def test_training_crop_is_divisible_and_recorded(model):
    model.train()
    img = torch.randn(1, 3, 64, 64)
    label = torch.randint(0, NUM_CLASSES, (1, 1, 64, 64))
    torch.manual_seed(3)
    model.forward_train(img, label)
    y1, y2, x1, x2 = model.last_train_crop_box
    assert y1 % 8 == 0 and x1 % 8 == 0 and (y2 - y1, x2 - x1) == (32, 32)
    model.eval()


# --------------------------------------------------------------- fusion
def test_fused_attention_formula_without_crop(model):
    img = torch.randn(1, 3, 64, 64)
    lr_feats = model.backbone(F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False))
    hr_feats = model.backbone(img)
    head = model.decode_head
    with torch.no_grad():
        fused, lr_weighted, hr = head(lr_feats, hr_feats)
        lr = head.head(lr_feats)
        att = torch.sigmoid(head.scale_attention(lr_feats))

        def up(x):
            return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

        expected = up(att) * head.head(hr_feats) + up((1 - att) * lr)
    assert att.shape[1] == NUM_CLASSES  # class-wise attention
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(lr_weighted, (1 - att) * lr)
    # Upsampling the weighted terms differs from weighting upsampled terms.
    other = up(att) * head.head(hr_feats) + (1 - up(att)) * up(lr)
    assert not torch.allclose(fused, other)


def test_fused_attention_formula_with_detail_crop(model):
    img = torch.randn(1, 3, 64, 64)
    box = (16, 48, 8, 40)
    lr_feats = model.backbone(F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False))
    hr_feats = model.backbone(img[:, :, 16:48, 8:40])
    head = model.decode_head
    with torch.no_grad():
        fused, _, hr = head(lr_feats, hr_feats, box)
        lr = head.head(lr_feats)  # 8x8 (1/8 of 64)
        att = torch.sigmoid(head.scale_attention(lr_feats))
        mask = torch.zeros_like(att[:, :1])
        mask[:, :, 2:6, 1:5] = 1  # box / 8
        att = att * mask
        up_lr = F.interpolate((1 - att) * lr, scale_factor=2.0, mode="bilinear", align_corners=False)
        up_att = F.interpolate(att, scale_factor=2.0, mode="bilinear", align_corners=False)
        inserted = torch.zeros_like(up_lr)
        inserted[:, :, 4:12, 2:10] = hr  # box / 4
        expected = up_att * inserted + up_lr
    torch.testing.assert_close(fused, expected)


# --------------------------------------------------------------- losses
def test_train_losses_names_weights_and_backward():
    torch.manual_seed(0)
    model = build_segmentor(tiny_cfg(decode_head={"channels": 16, "dilations": [1, 2], "dropout_ratio": 0.0}))
    model.train()
    img = torch.randn(2, 3, 64, 64)
    label = torch.randint(0, NUM_CLASSES, (2, 1, 64, 64))
    label[:, :, :4] = 255
    weight = torch.rand(2, 64, 64)
    box = (8, 40, 24, 56)
    out = model.forward_train(
        img, label, seg_weight=weight, return_logits=True, return_feat=True, crop_box=box
    )
    assert set(out) == {
        "features",
        "decode.loss_seg",
        "decode.acc_seg",
        "decode.hr.loss_seg",
        "decode.hr.acc_seg",
        "decode.logits",
    }
    fused, _, hr = out["decode.logits"]
    fused_up = F.interpolate(fused, size=(64, 64), mode="bilinear", align_corners=False)
    expected = 0.9 * cross_entropy_loss(fused_up, label, weight)
    torch.testing.assert_close(out["decode.loss_seg"], expected)
    hr_up = F.interpolate(hr, size=(32, 32), mode="bilinear", align_corners=False)
    expected_hr = 0.1 * cross_entropy_loss(hr_up, label[:, :, 8:40, 24:56], weight[:, 8:40, 24:56])
    torch.testing.assert_close(out["decode.hr.loss_seg"], expected_hr)
    # Context features (feature_scale 0.5) are returned for the FD loss.
    assert [f.shape[-1] for f in out["features"]] == [8, 4, 2, 1]
    total = sum(v for k, v in out.items() if "loss" in k)
    total.backward()
    assert model.backbone.patch_embed1.proj.weight.grad.abs().sum() > 0
    assert model.decode_head.scale_attention.conv_seg.weight.grad.abs().sum() > 0


def test_logit_constraint_loss_choice_and_zero_weight():
    model = build_segmentor(
        tiny_cfg(decode_head={"channels": 16, "dilations": [1, 2], "loss": "logit_constraint"})
    )
    assert model.loss_name == "logit_constraint"
    img = torch.randn(1, 3, 64, 64)
    label = torch.randint(0, NUM_CLASSES, (1, 64, 64))
    out = model.forward_train(img, label, seg_weight=torch.zeros(1, 64, 64))
    assert out["decode.loss_seg"].item() == 0.0
    assert out["decode.hr.loss_seg"].item() == 0.0


# --------------------------------------------------------------- inference
def test_slide_equals_whole_when_one_window_covers_image(model):
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = model.inference(img, "whole")
        slide = model.inference(img, "slide")  # crop 64 = image: one window
    assert whole.shape == (2, NUM_CLASSES, 64, 64)
    torch.testing.assert_close(slide, whole)


def test_slide_stitches_disjoint_windows_and_batching_is_equivalent(model):
    img = torch.randn(1, 3, 64, 128)
    saved = dict(model.test_cfg)
    try:
        model.test_cfg.update(crop_size=[64, 64], stride=[64, 64])
        with torch.no_grad():
            batched = model.slide_inference(img)
            model.test_cfg["batched_slide"] = False
            looped = model.slide_inference(img)
            left = model.whole_inference(img[..., :64])
            right = model.whole_inference(img[..., 64:])
    finally:
        model.test_cfg.clear()
        model.test_cfg.update(saved)
    torch.testing.assert_close(batched, looped)
    torch.testing.assert_close(batched, torch.cat([left, right], dim=-1))


def test_hr_slide_inference_single_window_equals_direct():
    model = build_segmentor(tiny_cfg(hr_crop_size=[64, 64])).eval()
    img = torch.randn(1, 3, 64, 64)  # = hr_crop_size: one detail window
    with torch.no_grad():
        slid = model.encode_decode(img)
        model.hr_slide_inference = False
        try:
            direct = model.encode_decode(img)
        finally:
            model.hr_slide_inference = True
    torch.testing.assert_close(slid, direct)


def test_hr_slide_inference_overlapping_windows_average(model):
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.extract_slide_feat(img)
        assert feats["boxes"] == [(y, y + 32, x, x + 32) for y in (0, 16, 32) for x in (0, 16, 32)]
        hr = model.decode_head.decode_hr(feats, 1)
        windows = model.decode_head.head(feats["features"])  # 9 x 8 x 8
        count = torch.zeros(1, 1, 16, 16)
        acc = torch.zeros(1, NUM_CLASSES, 16, 16)
        for i, (y1, y2, x1, x2) in enumerate(feats["boxes"]):
            acc[:, :, y1 // 4 : y2 // 4, x1 // 4 : x2 // 4] += windows[i : i + 1]
            count[:, :, y1 // 4 : y2 // 4, x1 // 4 : x2 // 4] += 1
    torch.testing.assert_close(hr, acc / count)


def test_eval_is_deterministic_and_train_mode_is_not(model):
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(img), model(img))
        model.train()
        try:
            a = model.decode_head.head([f for f in model.backbone(img)])
            b = model.decode_head.head([f for f in model.backbone(img)])
        finally:
            model.eval()
    assert not torch.allclose(a, b)  # dropout active in training


def test_sizes_not_multiple_of_8_still_give_input_resolution(model):
    with torch.no_grad():
        out = model.inference(torch.randn(1, 3, 90, 135), "whole")
        out_slide = model(torch.randn(1, 3, 70, 90))
    assert out.shape == (1, NUM_CLASSES, 90, 135)
    assert out_slide.shape == (1, NUM_CLASSES, 70, 90)


def test_forward_rejects_non_image_batch(model):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="smaller than hr_crop_size"):
        model.forward_train(torch.randn(1, 3, 24, 64), torch.zeros(1, 24, 64, dtype=torch.long))


# --------------------------------------------------------------- builder
def test_state_dict_roots_match_mic(model):
    roots = {".".join(k.split(".")[:2]) for k in model.state_dict()}
    assert roots == {
        "backbone.patch_embed1",
        "backbone.patch_embed2",
        "backbone.patch_embed3",
        "backbone.patch_embed4",
        "backbone.block1",
        "backbone.block2",
        "backbone.block3",
        "backbone.block4",
        "backbone.norm1",
        "backbone.norm2",
        "backbone.norm3",
        "backbone.norm4",
        "decode_head.head",
        "decode_head.scale_attention",
    }


def test_builder_validation_errors_name_the_key():
    with pytest.raises(
        ModelConfigError,
        match=r"model\.decode_head\.chanels"
        r".*Did you mean channels.*Valid keys",
    ):
        normalize_model_cfg(tiny_cfg(decode_head={"chanels": 8}))
    with pytest.raises(ModelConfigError, match="Unknown key model.hr_crop"):
        normalize_model_cfg(tiny_cfg(hr_crop=[8, 8]))
    with pytest.raises(ModelConfigError, match="mit_b5"):
        normalize_model_cfg(tiny_cfg(backbone="mit_b6"))
    with pytest.raises(ModelConfigError, match="logit_constraint"):
        normalize_model_cfg(tiny_cfg(decode_head={"loss": "dice"}))
    with pytest.raises(ModelConfigError, match="scales"):
        normalize_model_cfg(tiny_cfg(scales=[1, 0.5, 0.25]))
    with pytest.raises(ModelConfigError, match="hr_crop_size"):
        normalize_model_cfg(tiny_cfg(hr_crop_size=[32]))
    with pytest.raises(ModelConfigError, match="test_cfg.mode"):
        normalize_model_cfg(tiny_cfg(test_cfg={"mode": "tiles"}))


def test_max_windows_per_batch_is_validated_and_reaches_the_model():
    for bad in (0, -2, True, 1.5, "2", [2]):
        with pytest.raises(
            ModelConfigError,
            match=r"model\.test_cfg\.max_windows_per_batch "
            r"must be a positive integer .* or null",
        ):
            normalize_model_cfg(tiny_cfg(test_cfg={"max_windows_per_batch": bad}))
    cfg = normalize_model_cfg(tiny_cfg(test_cfg={"max_windows_per_batch": 3}))
    assert cfg["test_cfg"]["max_windows_per_batch"] == 3
    assert cfg["test_cfg"]["mode"] == "slide"  # the rest keeps its defaults
    assert (
        normalize_model_cfg(tiny_cfg(test_cfg={"max_windows_per_batch": None}))["test_cfg"][
            "max_windows_per_batch"
        ]
        is None
    )
    model = build_segmentor(tiny_cfg(test_cfg={"max_windows_per_batch": 2}))
    assert model.max_windows_per_batch == 2
    with pytest.raises(ValueError, match="max_windows_per_batch"):
        HRDASegmentor(
            model.backbone,
            NUM_CLASSES,
            channels=16,
            dilations=(1, 2),
            hr_crop_size=(32, 32),
            test_cfg={"max_windows_per_batch": 0},
        )


def test_builder_defaults_are_mic_values():
    cfg = normalize_model_cfg({"backbone": "mit_b5"})
    assert cfg["scales"] == [1, 0.5] and cfg["hr_crop_size"] == [512, 512]
    assert cfg["hr_loss_weight"] == 0.1 and cfg["crop_coord_divisible"] == 8
    assert cfg["decode_head"]["dilations"] == [1, 6, 12, 18]
    assert cfg["test_cfg"] == {
        "mode": "slide",
        "crop_size": [1024, 1024],
        "stride": [512, 512],
        "batched_slide": True,
        "max_windows_per_batch": None,
    }


def test_presets_build(model):
    from uda.config import load_config

    cfg = load_config("default")
    for role in ("teacher", "student"):
        seg = build_segmentor(cfg[role]["model"])
        assert isinstance(seg, HRDASegmentor)
        assert count_parameters(seg) > 0
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
