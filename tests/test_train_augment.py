"""DACS augmentations (ClassMix, jitter, blur, pseudo weights), MIC masks."""

import math

import pytest
import torch

from uda.config import load_config
from uda.train.augment import DACSAugmentation, StrongAugParams, get_class_masks, one_mix
from uda.train.photometric import (
    _jitter_one,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    hsv_to_rgb,
    rgb_to_hsv,
)
from uda.train.teacher import pseudo_label_and_weight
from uda.train.masking import (
    MASK_MODES,
    BlockMaskGenerator,
    build_mask_generator,
    mask_mode_uses_aug,
    select_masked_batch,
)

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
NO_AUG = StrongAugParams(color_jitter=False, blur=False)
ALL_AUG = StrongAugParams(color_jitter=True, blur=True)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def normalised(rgb255):
    """Normalise a (B, 3, H, W) 0-255 image like the data pipeline."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (rgb255 - mean) / std


def random_images(batch=2, height=16, width=24, seed=0):
    g = gen(seed)
    return normalised(torch.randint(0, 256, (batch, 3, height, width), generator=g).float())


# ------------------------------------------------------------- ClassMix
def test_class_masks_pick_half_of_the_classes_per_image():
    # Both images contain the same 6 values (5 classes + ignore): n = 6, so
    # exactly 3 classes are taken per image and whole classes are pasted.
    label = torch.tensor([0, 1, 2, 3, 4, 255]).repeat_interleave(4).view(1, 1, 4, 6).repeat(2, 1, 1, 1)
    label[1] = label[1].flip(-1)
    chosen_255 = 0
    for seed in range(40):
        masks = get_class_masks(label, gen(seed))
        assert masks.shape == label.shape and masks.dtype == torch.int64
        for img_label, mask in zip(label, masks):
            picked = torch.unique(img_label[mask.bool()])
            assert picked.numel() == 3
            # every pixel of a picked class is in the mask, no other pixel
            assert torch.equal(mask.bool(), torch.isin(img_label, picked))
            chosen_255 += int(255 in picked.tolist())
    # The ignore value is a candidate like any class (MIC/DACS).
    assert 0 < chosen_255 < 80


def test_class_masks_odd_count_rounds_up():
    label = torch.tensor([0, 1, 2, 3, 4]).view(1, 1, 1, 5).repeat(1, 1, 2, 1)
    for seed in range(10):
        mask = get_class_masks(label, gen(seed))
        assert int(mask.sum()) == 2 * 3  # ceil(5 / 2) classes, 2 rows


def test_class_masks_draw_from_the_whole_batch():
    # Image 0 has classes {0, 1}, image 1 {2, 3}: the candidates are all four
    # (MIC calls unique() on the batch), so image 0 sometimes gets no pixel.
    label = torch.tensor([[[0, 1]], [[2, 3]]])[:, None]
    counts = set()
    for seed in range(30):
        counts.add(int(get_class_masks(label, gen(seed))[0].sum()))
    assert counts == {0, 1, 2}


def test_class_masks_are_reproducible_with_a_seed():
    label = torch.randint(0, 19, (2, 1, 8, 8), generator=gen(3))
    assert torch.equal(get_class_masks(label, gen(7)), get_class_masks(label, gen(7)))


def test_mix_takes_masked_pixels_from_source():
    src, trg = random_images(seed=1), random_images(seed=2)
    src_lbl = torch.randint(0, 6, (2, 1, 16, 24), generator=gen(4))
    src_lbl[:, :, :2] = 255
    plabel = torch.randint(0, 19, (2, 16, 24), generator=gen(5))
    pweight = torch.tensor([0.25, 0.75]).view(2, 1, 1).expand(2, 16, 24)
    aug = DACSAugmentation(MEAN, STD)
    out = aug.mix(src, src_lbl, trg, plabel, pweight, gen(6), NO_AUG)
    m = out.mask.bool()
    assert 0 < int(m.sum()) < m.numel()
    m3 = m.expand_as(src)
    assert torch.equal(out.img[m3], src[m3])
    assert torch.equal(out.img[~m3], trg[~m3])
    assert out.label.shape == (2, 1, 16, 24) and out.label.dtype == torch.int64
    assert torch.equal(out.label[m], src_lbl[m])
    assert torch.equal(out.label[~m], plabel[:, None][~m])
    w = out.weight[:, None]
    assert out.weight.shape == (2, 16, 24)
    assert bool((w[m] == 1).all())
    assert torch.equal(w[~m], pweight[:, None][~m])


def test_jitter_and_blur_leave_labels_unchanged_and_are_reproducible():
    src, trg = random_images(seed=1), random_images(seed=2)
    src_lbl = torch.randint(0, 6, (2, 1, 16, 24), generator=gen(4))
    plabel = torch.randint(0, 19, (2, 16, 24), generator=gen(5))
    pweight = torch.full((2, 16, 24), 0.5)
    aug = DACSAugmentation(MEAN, STD)
    plain = aug.mix(src, src_lbl, trg, plabel, pweight, gen(9), NO_AUG)
    strong = aug.mix(src, src_lbl, trg, plabel, pweight, gen(9), ALL_AUG)
    again = aug.mix(src, src_lbl, trg, plabel, pweight, gen(9), ALL_AUG)
    assert torch.equal(plain.label, strong.label)
    assert torch.equal(plain.weight, strong.weight)
    assert not torch.allclose(plain.img, strong.img, atol=1e-3)
    assert torch.equal(strong.img, again.img)
    other = aug.mix(src, src_lbl, trg, plabel, pweight, gen(10), ALL_AUG)
    assert not torch.equal(strong.img, other.img)


def test_step_decisions_follow_mic_probabilities():
    aug = DACSAugmentation(MEAN, STD, color_jitter_probability=0.2)
    g = gen(0)
    draws = [aug.sample_params(g) for _ in range(4000)]
    jitter = sum(p.color_jitter for p in draws) / len(draws)
    blur = sum(p.blur for p in draws) / len(draws)
    # MIC jitters when u > p: 80 % of the steps for p = 0.2; blurs half.
    assert abs(jitter - 0.8) < 0.03
    assert abs(blur - 0.5) < 0.03
    no_blur = DACSAugmentation(MEAN, STD, blur=False)
    assert not any(no_blur.sample_params(g).blur for _ in range(200))


def test_from_config_and_bad_arguments():
    aug = DACSAugmentation.from_config(load_config("default"))
    assert aug.color_jitter_strength == 0.2
    assert aug.color_jitter_probability == 0.2 and aug.blur
    with pytest.raises(ValueError, match="mean and std"):
        DACSAugmentation([1, 2], STD)
    with pytest.raises(ValueError, match="strength"):
        DACSAugmentation(MEAN, STD, color_jitter_strength=0.7)
    with pytest.raises(ValueError, match="same shape"):
        aug.mix(
            random_images(),
            torch.zeros(2, 16, 24, dtype=torch.long),
            random_images(height=8),
            torch.zeros(2, 16, 24, dtype=torch.long),
            torch.ones(2, 16, 24),
        )
    with pytest.raises(ValueError, match="shape"):
        one_mix(torch.ones(1, 1, 2, 2), torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 3))


# -------------------------------------------------------- colour jitter
def test_hsv_round_trip_and_hue_convention():
    rgb = torch.rand(2, 3, 5, 7, generator=gen(0))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(rgb_to_hsv(red).flatten(), torch.tensor([0.0, 1.0, 1.0]), atol=1e-5)
    green = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    assert math.isclose(float(rgb_to_hsv(green)[0]), 2 * math.pi / 3, rel_tol=1e-6)


def test_jitter_steps_have_kornia_semantics():
    grey = torch.full((3, 1, 1), 0.5)
    # brightness adds, contrast multiplies (no blend with the mean), both clamp
    out = _jitter_one(grey, 0.1, 1.0, 1.0, 0.0, [0])
    assert torch.allclose(out, torch.full_like(grey, 0.6))
    out = _jitter_one(grey, 0.0, 1.2, 1.0, 0.0, [1])
    assert torch.allclose(out, torch.full_like(grey, 0.6))
    assert torch.allclose(_jitter_one(grey, 0.0, 2.5, 1.0, 0.0, [1]), torch.ones_like(grey))
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    # a third of a turn of hue takes red to green
    out = _jitter_one(red, 0.0, 1.0, 1.0, 1 / 3, [3])
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)
    # saturation 0.5 halves the chroma: (1, 0, 0) -> (1, 0.5, 0.5)
    out = _jitter_one(red, 0.0, 1.0, 0.5, 0.0, [2])
    assert torch.allclose(out.flatten(), torch.tensor([1.0, 0.5, 0.5]), atol=1e-5)
    # the order matters: add then multiply != multiply then add
    a = _jitter_one(grey, 0.1, 1.2, 1.0, 0.0, [0, 1])
    b = _jitter_one(grey, 0.1, 1.2, 1.0, 0.0, [1, 0])
    assert not torch.allclose(a, b)


def test_color_jitter_strength_zero_is_identity_and_bounded_otherwise():
    img = random_images(seed=3)
    same = color_jitter(img, MEAN, STD, 0.0, gen(0))
    assert torch.allclose(same, img, atol=1e-4)
    out = color_jitter(img, MEAN, STD, 0.2, gen(0))
    unit = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert float(unit.min()) > -1e-3 and float(unit.max()) < 255 + 1e-3
    assert not torch.allclose(out, img, atol=1e-3)


# ----------------------------------------------------------------- blur
def test_blur_kernel_size_rule():
    # ceil(0.1 * size), made odd by subtracting 1 if even (MIC):
    # 1024 -> 103, 1080 -> 108 -> 107, 100 -> 10 -> 9
    assert [blur_kernel_size(n) for n in (1024, 1080, 512, 128, 100, 64, 8)] == [103, 107, 51, 13, 9, 7, 1]


def test_gaussian_blur_normalised_symmetric_and_constant_preserving():
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[..., 10, 10] = 1
    out = gaussian_blur(impulse, 1.0, (7, 7))
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-5)
    assert torch.allclose(out, out.flip(-1)) and torch.allclose(out, out.transpose(-1, -2))
    x = torch.arange(-3, 4, dtype=torch.float64)
    g = torch.exp(-(x**2) / 2)
    g = g / g.sum()
    assert math.isclose(float(out[0, 0, 10, 10]), float(g[3] ** 2), rel_tol=1e-5)
    const = torch.full((1, 3, 16, 24), 0.7)
    assert torch.allclose(gaussian_blur(const, 1.15), const, atol=1e-6)


# ------------------------------------------------------- pseudo weights
def test_pseudo_label_weight_is_fraction_of_confident_pixels():
    logits = torch.zeros(2, 3, 2, 2)
    # image 0: pixels with a confident class 2 (logit 10 -> p ~ 0.9999)
    logits[0, 2, 0, :] = 10  # 2 confident pixels, label 2
    logits[0, 1, 1, 0] = 1  # unconfident, label 1
    logits[1, 0, 0, 0] = 10  # 1 confident pixel in image 1
    labels, weight = pseudo_label_and_weight(logits, 0.968)
    assert labels.dtype == torch.int64 and labels.shape == (2, 2, 2)
    assert labels[0, 0, 0] == 2 and labels[0, 1, 0] == 1
    assert labels[1, 0, 0] == 0
    # MIC: one weight over the whole batch: 3 confident of 8 pixels
    assert weight.shape == (2, 2, 2)
    assert torch.allclose(weight, torch.full((2, 2, 2), 3 / 8))
    _, per_image = pseudo_label_and_weight(logits, 0.968, "image")
    assert torch.allclose(per_image[0], torch.full((2, 2), 2 / 4))
    assert torch.allclose(per_image[1], torch.full((2, 2), 1 / 4))
    # softmax of 10 against two zeros is 0.99991: above 0.9999, below 0.99992
    _, w = pseudo_label_and_weight(logits, 0.9999)
    assert float(w[0, 0, 0]) == 3 / 8
    _, w = pseudo_label_and_weight(logits, 0.99992)
    assert float(w[0, 0, 0]) == 0
    with pytest.raises(ValueError, match="reduction"):
        pseudo_label_and_weight(logits, 0.9, "pixel")


# -------------------------------------------------------------- masking
def test_block_mask_ratio_and_block_structure():
    masker = BlockMaskGenerator(mask_ratio=0.7, mask_block_size=8)
    imgs = torch.randn(4, 3, 256, 256)
    mask = masker.generate_mask(imgs, gen(0))
    assert mask.shape == (4, 1, 256, 256) and mask.dtype == imgs.dtype
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    blocks = mask.view(4, 1, 32, 8, 32, 8)
    # constant inside every 8x8 block
    assert torch.equal(blocks.amax(dim=(3, 5)), blocks.amin(dim=(3, 5)))
    kept = float(blocks[:, :, :, 0, :, 0].mean())  # 4096 blocks
    assert abs(kept - 0.3) < 0.03
    masked = masker.mask_image(imgs, gen(0))
    assert torch.equal(masked, imgs * mask)
    assert torch.equal(masker.generate_mask(imgs, gen(0)), mask)
    assert not torch.equal(masker.generate_mask(imgs, gen(1)), mask)


def test_block_mask_grid_rounds_like_mic():
    # 100 / 16 = 6.25 -> 6 block rows, 70 / 16 = 4.375 -> 4 block columns,
    # upsampled by nearest neighbour (row i comes from block floor(i*6/100)).
    masker = BlockMaskGenerator(0.5, 16)
    mask = masker.generate_mask(torch.zeros(1, 3, 100, 70), gen(2))
    grid = (torch.rand((1, 1, 6, 4), generator=gen(2)) > 0.5).float()
    rows = torch.arange(100) * 6 // 100
    cols = torch.arange(70) * 4 // 70
    assert torch.equal(mask[0, 0], grid[0, 0][rows][:, cols])


def test_build_mask_generator_from_presets_and_errors():
    cfg = load_config("default")
    masker = build_mask_generator(cfg["uda"]["mask_generator"])
    assert (masker.mask_ratio, masker.mask_block_size) == (0.7, 8)
    full_cfg = load_config("cs2acdc")["uda"]["mask_generator"]
    full = build_mask_generator(full_cfg)
    assert full.mask_block_size == 64
    assert build_mask_generator(None) is None
    with pytest.raises(ValueError, match="block"):
        build_mask_generator({"type": "random"})
    with pytest.raises(ValueError, match="mask_ratio"):
        BlockMaskGenerator(1.0, 8)
    with pytest.raises(ValueError, match="mask_block_size"):
        BlockMaskGenerator(0.5, 0)


def test_masked_batch_selection_per_mode():
    src, trg = random_images(seed=1), random_images(seed=2)
    src_lbl = torch.randint(0, 6, (2, 1, 16, 24), generator=gen(4))
    plabel = torch.randint(0, 19, (2, 16, 24), generator=gen(5))
    pweight = torch.full((2, 16, 24), 0.4)
    img, lbl, w = select_masked_batch("separate", src, src_lbl, trg, plabel, pweight)
    # first source image (weight 1) + first target image (pseudo weight)
    assert torch.equal(img, torch.stack([src[0], trg[0]]))
    assert torch.equal(lbl, torch.stack([src_lbl[0], plabel[0][None]]))
    assert torch.equal(w, torch.stack([torch.ones(16, 24), pweight[0]]))
    img, lbl, w = select_masked_batch("separatetrgaug", src, src_lbl, trg, plabel, pweight)
    assert torch.equal(img, trg) and torch.equal(lbl, plabel[:, None])
    assert torch.equal(w, pweight)
    img, lbl, w = select_masked_batch("separatesrc", src, src_lbl[:, 0], trg, plabel, pweight)
    assert torch.equal(img, src) and torch.equal(lbl, src_lbl) and w is None
    assert [mask_mode_uses_aug(m) for m in MASK_MODES] == [False, False, False, True, True, True]
    with pytest.raises(ValueError, match="mask_mode"):
        select_masked_batch("masked", src, src_lbl, trg, plabel, pweight)
