"""Bounded-memory slide inference and the shapes real data has.

``test_cfg.max_windows_per_batch`` caps the images of one backbone pass
(slide windows per forward, detail windows per pass); the logits must equal
MIC's all-at-once path up to float batch-size effects. Real frames are
1920x1080: 1080 is no multiple of 16 or 32, the last slide window is
clamped to the border, and served images have any size. The geometries
below are the full recipe's (window 1024, stride 512, detail window 512 =
half a window) scaled down with the image, so the clamped windows fall
where they fall on a real frame.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from uda.config import load_config
from uda.models import build_segmentor
from uda.models.hrda import HRDASegmentor, bounded_slide
from uda.models.windows import CPU_PASS_PIXELS, default_windows_per_batch, slide_windows

NUM_CLASSES = 5
# Relative/absolute tolerance for "same logits up to batch-size effects".
TOL = dict(rtol=1e-5, atol=1e-6)  # logits of these random models are ~0.1


def geometry_cfg(window: int) -> dict:
    """mit_nano with the full recipe's window geometry scaled to ``window``."""
    return {
        "backbone": "mit_nano",
        "drop_path_rate": 0.0,
        "num_classes": NUM_CLASSES,
        "decode_head": {"channels": 16, "dilations": [1, 2]},
        "hr_crop_size": [window // 2, window // 2],
        "test_cfg": {
            "mode": "slide",
            "crop_size": [window, window],
            "stride": [window // 2, window // 2],
            "batched_slide": True,
        },
    }


_MODELS: dict = {}


def model_for(window: int) -> HRDASegmentor:
    if window not in _MODELS:
        torch.manual_seed(0)
        _MODELS[window] = build_segmentor(geometry_cfg(window)).eval()
    return _MODELS[window]


# (height, width, window): 1080x1920 / 8 (135x240, windows 128), / 4 with an
# odd width (270x481, windows 256: 2 x 3 windows as on a real frame) and a
# small odd size (97x131, windows 64).
SIZES = [(135, 240, 128), (270, 481, 256), (97, 131, 64)]
_UNBOUNDED: dict = {}


def _image(height: int, width: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(height * 10007 + width)
    return torch.randn(batch, 3, height, width, generator=gen)


class BackbonePasses:
    """Records the batch size of every backbone pass (a forward hook: the
    model runs unchanged)."""

    def __init__(self, model: HRDASegmentor) -> None:
        self.sizes: list[int] = []
        self._handle = model.backbone.register_forward_hook(
            lambda module, args, out: self.sizes.append(args[0].shape[0])
        )

    def __enter__(self) -> "BackbonePasses":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def unbounded(height: int, width: int, window: int) -> torch.Tensor:
    key = (height, width, window)
    if key not in _UNBOUNDED:
        model = model_for(window)
        assert model.max_windows_per_batch is None  # MIC's default
        with torch.no_grad():
            _UNBOUNDED[key] = model.slide_inference(_image(height, width))
    return _UNBOUNDED[key]


# ------------------------------------------------------------ windows
def test_1080p_slide_windows_last_window_clamped_and_exact_cover():
    boxes = slide_windows(1080, 1920, (1024, 1024), (512, 512))
    # Rows start at 0 and 1080 - 1024 = 56 (clamped, not 512); columns at 0,
    # 512 and 1920 - 1024 = 896 (clamped, not 1024).
    assert boxes == [(y, y + 1024, x, x + 1024) for y in (0, 56) for x in (0, 512, 896)]
    # Detail windows of one 1024x1024 slide window: 3 x 3, stride 256.
    assert slide_windows(1024, 1024, (512, 512), (256, 256)) == [
        (y, y + 512, x, x + 512) for y in (0, 256, 512) for x in (0, 256, 512)
    ]
    # Detail windows of a whole 1920x1080 frame ('whole' mode): the last
    # row is clamped to 1080 - 512 = 568.
    rows = sorted({b[0] for b in slide_windows(1080, 1920, (512, 512), (256, 256))})
    assert rows == [0, 256, 512, 568]


@pytest.mark.parametrize("height,width,window", SIZES + [(1080, 1920, 1024), (73, 101, 128), (64, 1000, 64)])
def test_slide_windows_cover_exactly_and_never_leave_the_image(height, width, window):
    stride = window // 2
    boxes = slide_windows(height, width, (window, window), (stride, stride))
    cover = torch.zeros(height, width, dtype=torch.int32)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width
        assert (y2 - y1, x2 - x1) == (min(window, height), min(window, width))
        cover[y1:y2, x1:x2] += 1
    assert int(cover.min()) >= 1
    # The last window of each direction ends exactly at the border.
    assert max(b[1] for b in boxes) == height
    assert max(b[3] for b in boxes) == width
    assert boxes[-1][1] == height and boxes[-1][3] == width
    # Row-major, rows top-down (the serving strip stitcher relies on it),
    # and every step but the clamped last one is the stride.
    assert boxes == sorted(boxes, key=lambda b: (b[0], b[2]))
    ys = sorted({b[0] for b in boxes})
    xs = sorted({b[2] for b in boxes})
    for starts in (ys, xs):
        steps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(s == stride for s in steps[:-1])
        assert all(0 < s <= stride for s in steps[-1:])


# ------------------------------------------------------------ bounded
@pytest.mark.parametrize("bound", [1, 2, 3])
@pytest.mark.parametrize("height,width,window", SIZES)
def test_bounded_slide_equals_unbounded(height, width, window, bound):
    model = model_for(window)
    reference = unbounded(height, width, window)
    with BackbonePasses(model) as passes, torch.no_grad():
        bounded = model.slide_inference(_image(height, width), max_windows_per_batch=bound)
    assert bounded.shape == (1, NUM_CLASSES, height, width)
    torch.testing.assert_close(bounded, reference, **TOL)
    # The bound holds for every backbone pass (context and detail).
    assert max(passes.sizes) <= bound
    assert model.max_windows_per_batch is None  # not changed by the call


@pytest.mark.parametrize("height,width,window", SIZES)
def test_unbounded_path_is_one_context_and_one_detail_pass(height, width, window):
    model = model_for(window)
    n_windows = len(slide_windows(height, width, (window, window), (window // 2, window // 2)))
    with BackbonePasses(model) as passes, torch.no_grad():
        model.slide_inference(_image(height, width))
    # MIC: every window in one pass, every detail window (9 per window) in
    # one more.
    assert passes.sizes == [n_windows, 9 * n_windows]


@pytest.mark.parametrize("height,width,window", SIZES)
def test_batched_slide_equals_unbatched(height, width, window, monkeypatch):
    model = model_for(window)
    reference = unbounded(height, width, window)
    monkeypatch.setitem(model.test_cfg, "batched_slide", False)
    with BackbonePasses(model) as passes, torch.no_grad():
        looped = model.slide_inference(_image(height, width))
    torch.testing.assert_close(looped, reference, **TOL)
    assert max(passes.sizes) == 9  # one window, its 9 detail windows


def test_bound_via_test_cfg_and_context_manager(monkeypatch):
    height, width, window = SIZES[0]
    model = model_for(window)
    reference = unbounded(height, width, window)
    with model.limit_windows_per_batch(2):
        assert model.test_cfg["max_windows_per_batch"] == 2
        with BackbonePasses(model) as passes, torch.no_grad():
            out = model(_image(height, width))
    assert model.max_windows_per_batch is None  # restored
    assert max(passes.sizes) <= 2
    torch.testing.assert_close(out, reference, **TOL)
    with pytest.raises(RuntimeError, match="boom"):
        with model.limit_windows_per_batch(1):
            raise RuntimeError("boom")
    assert model.max_windows_per_batch is None  # restored on errors too
    with pytest.raises(ValueError, match="positive integer or null"):
        model.set_windows_per_batch(0)


def test_image_batches_are_bounded_per_pass_with_same_logits():
    height, width, window = 97, 131, 64
    model = model_for(window)
    img = _image(height, width, batch=3)
    with torch.no_grad():
        reference = model.slide_inference(img)
        whole_ref = model.whole_inference(img)
        with BackbonePasses(model) as passes:
            out = model.slide_inference(img, max_windows_per_batch=2)
            with model.limit_windows_per_batch(2):
                whole = model.whole_inference(img)
    # 3 images, 2 per pass: rows are split too, never more than 2 at once.
    assert max(passes.sizes) <= 2
    torch.testing.assert_close(out, reference, **TOL)
    torch.testing.assert_close(whole, whole_ref, **TOL)
    for k in range(3):  # and each image is what it is alone
        with torch.no_grad():
            alone = model.slide_inference(img[k : k + 1])
        torch.testing.assert_close(out[k : k + 1], alone, **TOL)


def test_around_batch_hook_sees_every_group_and_can_stop_it():
    height, width, window = 135, 240, 128
    model = model_for(window)
    seen = []

    @contextlib.contextmanager
    def around(start, total):
        seen.append((start, total))
        yield

    with torch.no_grad():
        out = model.slide_inference(_image(height, width), max_windows_per_batch=4, around_batch=around)
    assert seen == [(0, 6), (4, 6)]  # 2 x 3 windows, 4 per forward
    torch.testing.assert_close(out, unbounded(height, width, window), **TOL)

    class Stop(Exception):
        pass

    @contextlib.contextmanager
    def deadline(start, total):
        if start >= 2:
            raise Stop
        yield

    with BackbonePasses(model) as passes, torch.no_grad():
        with pytest.raises(Stop):
            model.slide_inference(_image(height, width), max_windows_per_batch=1, around_batch=deadline)
    # Two windows ran (1 context + 9 detail passes each), then it stopped.
    assert len(passes.sizes) == 2 * (1 + 9)


# ------------------------------------------------ slide vs whole, stitching
@pytest.mark.parametrize("height,width", [(97, 131), (73, 101), (64, 64)])
@pytest.mark.parametrize("bound", [None, 1])
def test_slide_equals_whole_when_one_window_covers_the_image(height, width, bound, monkeypatch):
    model = model_for(64)
    monkeypatch.setitem(model.test_cfg, "crop_size", [128, 160])
    img = _image(height, width)
    assert slide_windows(height, width, (128, 160), (32, 32)) == [(0, height, 0, width)]
    with torch.no_grad():
        whole = model.inference(img, "whole")
        slide = model.slide_inference(img, max_windows_per_batch=bound)
    assert slide.shape == (1, NUM_CLASSES, height, width)
    torch.testing.assert_close(slide, whole, **TOL)


@pytest.mark.parametrize("height,width,window", SIZES)
def test_slide_is_the_count_weighted_average_of_per_window_outputs(height, width, window):
    """Independent stitching reference: each window segmented alone with
    ``whole_inference``, placed at its (clamped) box, averaged by count."""
    model = model_for(window)
    img = _image(height, width)
    boxes = slide_windows(height, width, (window, window), (window // 2, window // 2))
    acc = torch.zeros(1, NUM_CLASSES, height, width)
    count = torch.zeros(1, 1, height, width)
    with torch.no_grad():
        for y1, y2, x1, x2 in boxes:
            acc[..., y1:y2, x1:x2] += model.whole_inference(img[..., y1:y2, x1:x2].contiguous())
            count[..., y1:y2, x1:x2] += 1
    torch.testing.assert_close(unbounded(height, width, window), acc / count, **TOL)


# ------------------------------------------------ HRDA fusion at odd sizes
def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("height,width", [(97, 131), (135, 240), (70, 90)])
@pytest.mark.parametrize("bound", [None, 1, 4])
def test_hrda_fusion_at_non_multiple_of_32_matches_the_formula(height, width, bound):
    """``whole`` inference of an odd-sized input against the fusion formula
    evaluated from the model's parts: context at half scale, detail by
    32x32 windows (stride 16, last one clamped) averaged on the 1/4 grid,
    ``up(a) * detail + up((1 - a) * context)``, aligned to the detail grid
    where the sizes differ, resized to the input."""
    model = model_for(64)
    img = _image(height, width)
    head = model.decode_head
    with torch.no_grad():
        with model.limit_windows_per_batch(bound):
            out = model.inference(img, "whole")
        lr_in = F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False)
        lr_feats = model.backbone(lr_in)
        lr = head.head(lr_feats)
        att = torch.sigmoid(head.scale_attention(lr_feats))
        grid = (height // 4, width // 4)  # detail windows are 32 = 4 * 8
        detail = torch.zeros(1, NUM_CLASSES, *grid)
        count = torch.zeros(1, 1, *grid)
        for y1, y2, x1, x2 in slide_windows(height, width, (32, 32), (16, 16)):
            window = head.head(model.backbone(img[..., y1:y2, x1:x2].contiguous()))
            assert window.shape[2:] == (8, 8)
            detail[..., y1 // 4 : y1 // 4 + 8, x1 // 4 : x1 // 4 + 8] += window
            count[..., y1 // 4 : y1 // 4 + 8, x1 // 4 : x1 // 4 + 8] += 1
        assert int(count.min()) >= 1
        detail = detail / count
        fused = _resize(_up(att), grid) * detail + _resize(_up((1 - att) * lr), grid)
        expected = _resize(fused, (height, width))
    assert out.shape == (1, NUM_CLASSES, height, width)
    torch.testing.assert_close(out, expected, **TOL)


def test_odd_size_exercises_the_grid_alignment():
    # 97x131: the context grid upsampled (24x34) differs from the detail
    # grid (24x32), the case MIC would fail on; the formula test above
    # covers it.
    model = model_for(64)
    with torch.no_grad():
        lr_feats = model.backbone(
            F.interpolate(_image(97, 131), scale_factor=0.5, mode="bilinear", align_corners=False)
        )
        lr = model.decode_head.head(lr_feats)
    assert tuple(_up(lr).shape[2:]) == (24, 34)


# ------------------------------------------------ the real default preset
@pytest.fixture(scope="module")
def preset_student():
    torch.manual_seed(0)
    return build_segmentor(load_config("default")["student"]["model"]).eval()


def test_default_preset_student_bounded_equals_unbounded(preset_student):
    model = preset_student
    assert model.max_windows_per_batch is None  # preset default: MIC's
    img = _image(135, 240)
    with torch.no_grad():
        reference = model.slide_inference(img)
        with BackbonePasses(model) as passes:
            bounded = model.slide_inference(img, max_windows_per_batch=2)
        with bounded_slide(model, "cpu") as bound:
            assert bound == 64  # 2**18 pixels of 64x64 images per pass
            device_default = model.slide_inference(img)
    assert max(passes.sizes) <= 2
    assert bounded.shape == (1, 19, 135, 240)
    torch.testing.assert_close(bounded, reference, **TOL)
    torch.testing.assert_close(device_default, reference, **TOL)
    assert model.max_windows_per_batch is None


# ------------------------------------------------ device defaults
def test_default_windows_per_batch_by_device():
    assert default_windows_per_batch("cuda") is None
    assert default_windows_per_batch(torch.device("cuda", 1), (1024, 1024)) is None
    assert default_windows_per_batch("cpu", 512 * 512) == 1
    assert default_windows_per_batch("cpu", 64 * 64) == 64
    assert default_windows_per_batch("cpu", 2048 * 2048) == 1  # never 0
    assert default_windows_per_batch("cpu") == 1
    assert CPU_PASS_PIXELS == 2**18
    # The full recipe's geometry (1024 windows at context scale 0.5, 512
    # detail windows): one 512x512 image per pass on a CPU, none on CUDA.
    full = model_for(1024)
    assert full.pass_image_pixels() == 512 * 512
    assert full.device_windows_per_batch("cpu") == 1
    assert full.device_windows_per_batch("cuda") is None
    assert model_for(128).device_windows_per_batch("cpu") == 64


def test_bounded_slide_keeps_an_explicit_bound_and_restores(monkeypatch):
    model = model_for(64)
    with bounded_slide(model, "cpu") as bound:
        assert bound == 256 and model.max_windows_per_batch == 256  # 32²
    assert model.max_windows_per_batch is None
    with bounded_slide(model, "cuda") as bound:
        assert bound is None and model.max_windows_per_batch is None
    monkeypatch.setitem(model.test_cfg, "max_windows_per_batch", 5)
    with bounded_slide(model, "cpu") as bound:  # the config wins
        assert bound == 5
    with bounded_slide(model, "cuda") as bound:
        assert bound == 5
    assert model.max_windows_per_batch == 5
    with bounded_slide(torch.nn.Identity(), "cpu") as bound:  # other models
        assert bound is None
