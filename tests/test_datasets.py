"""Readers, pipelines, torch datasets and rare-class sampling on generated data."""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uda.data.dataset import SegmentationDataset, acdc_dataset, cityscapes_dataset
from uda.data.layouts import (
    ACDC_CONDITIONS,
    DatasetLayoutError,
    MissingLabelsError,
    detect_acdc_layout,
    scan_acdc,
    scan_cityscapes,
)
from uda.data.pipelines import IMG_MEAN, IMG_STD, TestPipeline, TrainPipeline, mmseg_available, rescale_size
from uda.data.rcs import (
    SAMPLES_WITH_CLASS_FILE,
    STATS_DICT_FILE,
    STATS_FILE,
    RareClassSampler,
    count_class_pixels,
    draw_rare_class_sample,
    load_or_compute_class_counts,
    rcs_class_probabilities,
)
from uda.data.synthetic import SyntheticConfig, generate

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Under CI=true the mmseg parity tests must run: a missing mmseg fails them (tests/references.py).
needs_mmseg = pytest.mark.skipif(not mmseg_available() and not IN_CI, reason="mmseg/mmcv-full not importable")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return generate(
        root,
        SyntheticConfig(
            seed=1,
            num_source_train=6,
            num_source_val=2,
            num_target_train=3,
            num_target_val=2,
            num_target_test=1,
            source_size=(96, 48),
            target_size=(96, 54),
        ),
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flatten_like_mic(acdc: Path, keep_nested: bool) -> None:
    """The MIC README's rsync commands: rgb_anon/*/train/*/* -> rgb_anon/train/."""
    for split in ("train", "val"):
        for kind, pattern in (("rgb_anon", "*"), ("gt", "*_labelTrainIds.png")):
            out = acdc / kind / split
            out.mkdir(parents=True, exist_ok=True)
            for f in acdc.glob(f"{kind}/*/{split}/*/{pattern}"):
                shutil.copy2(f, out / f.name)
    if not keep_nested:
        for kind in ("rgb_anon", "gt"):
            for condition in ACDC_CONDITIONS:
                shutil.rmtree(acdc / kind / condition, ignore_errors=True)


def _label(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


# ---------------------------------------------------------------- readers


def test_cityscapes_reader(data):
    train = scan_cityscapes(data.cityscapes_root, "train")
    val = scan_cityscapes(data.cityscapes_root, "val")
    assert len(train) == 6 and len(val) == 2
    assert [s.image_path for s in train] == sorted(s.image_path for s in train)
    for s in train + val:
        assert s.condition == "clear" and s.has_label and s.label_path.is_file()
        assert s.image_path.parent.name == s.sequence  # the city
        assert s.label_path.name == s.name + "_gtFine_labelTrainIds.png"
    assert {s.split for s in val} == {"val"}


def test_acdc_nested_reader_conditions_and_labels(data):
    acdc = data.acdc_root
    assert detect_acdc_layout(acdc, "val") == "nested"
    train = scan_acdc(acdc, "train")
    val = scan_acdc(acdc, "val")
    test = scan_acdc(acdc, "test")
    assert Counter(s.condition for s in train) == {c: 3 for c in ACDC_CONDITIONS}
    assert Counter(s.condition for s in val) == {c: 2 for c in ACDC_CONDITIONS}
    assert len(test) == 4
    # the target train gt is on disk (as in ACDC), but never handed out
    assert list(acdc.glob("gt/*/train/*/*_gt_labelTrainIds.png"))
    assert all(s.label_path is None for s in train + test)
    for s in val:
        assert s.label_path.is_file()
        assert s.image_path.parts[-4] == s.condition  # rgb_anon/<cond>/val/<seq>
        assert s.image_path.parent.name == s.sequence and s.name.startswith(s.sequence)
    night = scan_acdc(acdc, "val", conditions=["night"])
    assert [s.condition for s in night] == ["night", "night"]


def test_acdc_flat_layout_recovers_conditions_from_nested_copy(data, tmp_path):
    acdc = _copy(data.acdc_root, tmp_path / "acdc")
    _flatten_like_mic(acdc, keep_nested=True)
    nested = {s.name: s.condition for s in scan_acdc(acdc, "val", layout="nested")}
    flat = scan_acdc(acdc, "val", layout="flat")
    assert len(flat) == 8
    assert all(s.image_path.parent == acdc / "rgb_anon" / "val" for s in flat)
    assert all(s.label_path.parent == acdc / "gt" / "val" for s in flat)
    assert {s.name: s.condition for s in flat} == nested
    assert all(s.sequence == s.name.split("_frame_")[0] for s in flat)
    assert all(s.label_path is None for s in scan_acdc(acdc, "train", layout="flat"))
    fog = scan_acdc(acdc, "val", conditions=["fog"], layout="flat")
    assert {s.condition for s in fog} == {"fog"} and len(fog) == 2


def test_acdc_flat_only_layout(data, tmp_path):
    acdc = _copy(data.acdc_root, tmp_path / "acdc")
    _flatten_like_mic(acdc, keep_nested=False)
    assert detect_acdc_layout(acdc, "train") == "flat"
    val = scan_acdc(acdc, "val")  # auto
    assert len(val) == 8 and {s.condition for s in val} == {"unknown"}
    assert all(s.label_path.is_file() for s in val)
    with pytest.raises(DatasetLayoutError, match="condition of 8 images is unknown"):
        scan_acdc(acdc, "val", conditions=["night"])
    # MIC's rsync does not flatten test
    with pytest.raises(DatasetLayoutError, match="rsync") as err:
        scan_acdc(acdc, "test")
    assert "rgb_anon/<condition>/{train,val,test}" in str(err.value)


def test_missing_root_and_wrong_layout_give_one_clear_error(data, tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist") as err:
        scan_cityscapes(tmp_path / "nowhere", "train")
    assert isinstance(err.value, FileNotFoundError)
    assert "leftImg8bit/" in str(err.value) and "gtFine/" in str(err.value)
    # the ACDC root given as Cityscapes root, and vice versa
    with pytest.raises(DatasetLayoutError, match="leftImg8bit"):
        scan_cityscapes(data.acdc_root, "train")
    with pytest.raises(DatasetLayoutError, match="rgb_anon") as err:
        scan_acdc(data.cityscapes_root, "val")
    assert "flattened" in str(err.value)
    # the parent folder instead of the dataset root
    with pytest.raises(DatasetLayoutError):
        scan_acdc(data.acdc_root.parent, "val")
    empty = tmp_path / "cs"
    (empty / "leftImg8bit" / "train" / "x").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="No \\*_leftImg8bit.png"):
        scan_cityscapes(empty, "train")
    with pytest.raises(ValueError, match="split"):
        scan_cityscapes(data.cityscapes_root, "trainval")
    with pytest.raises(ValueError, match="hail"):
        scan_acdc(data.acdc_root, "val", conditions=["hail"])


def test_missing_condition_folder(data, tmp_path):
    acdc = _copy(data.acdc_root, tmp_path / "acdc")
    shutil.rmtree(acdc / "rgb_anon" / "snow")
    assert {s.condition for s in scan_acdc(acdc, "val")} == {"fog", "night", "rain"}
    with pytest.raises(DatasetLayoutError, match="snow"):
        scan_acdc(acdc, "val", conditions=["night", "snow"])


def test_images_without_labels_are_named(data, tmp_path):
    cs = _copy(data.cityscapes_root, tmp_path / "cs")
    removed = sorted(cs.glob("gtFine/train/*/*_labelTrainIds.png"))
    for f in removed:
        f.unlink()
    with pytest.raises(MissingLabelsError) as err:
        scan_cityscapes(cs, "train")
    message = str(err.value)
    assert "6 of 6 images have no label file" in message and "... and 1 more" in message
    assert removed[0].name in message
    assert "convert_datasets/cityscapes.py" in message  # labelIds are there
    acdc = _copy(data.acdc_root, tmp_path / "acdc")
    gone = next(acdc.glob("gt/rain/val/*/*_labelTrainIds.png"))
    gone.unlink()
    with pytest.raises(MissingLabelsError, match=gone.name):
        scan_acdc(acdc, "val")
    # unlabelled splits do not care
    assert len(scan_acdc(acdc, "train")) == 12


# ---------------------------------------------------------------- pipelines


@pytest.mark.parametrize("backend", ["numpy", pytest.param("mmseg", marks=needs_mmseg)])
def test_test_pipeline_item(data, backend):
    ds = acdc_dataset(data.acdc_root, "val", train=False, img_scale=None, backend=backend)
    item = ds[0]
    assert set(item) == {"img", "gt", "condition", "filename", "ori_size"}
    assert item["img"].dtype == torch.float32 and item["img"].shape == (3, 54, 96)
    assert item["gt"].dtype == torch.int64 and item["gt"].shape == (54, 96)
    assert item["ori_size"].tolist() == [54, 96]
    assert item["condition"] == ds.samples[0].condition
    assert isinstance(item["filename"], str) and item["filename"].endswith("_rgb_anon.png")
    rgb = np.asarray(Image.open(item["filename"]).convert("RGB"), np.float32)
    expected = (rgb - np.array(IMG_MEAN)) / np.array(IMG_STD)
    np.testing.assert_allclose(item["img"].permute(1, 2, 0).numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(item["gt"].numpy(), _label(ds.samples[0].label_path))


def test_test_pipeline_resize_keeps_ratio_and_label_size(data):
    ds = cityscapes_dataset(data.cityscapes_root, "val", train=False, img_scale=(48, 24), backend="numpy")
    item = ds[0]
    assert item["img"].shape == (3, 24, 48)
    assert item["gt"].shape == (48, 96)  # scored at the original size, as mmseg
    assert rescale_size(1920, 1080, (2048, 1024)) == (1820, 1024)
    assert rescale_size(2048, 1024, (2048, 1024)) == (2048, 1024)
    assert rescale_size(1920, 1080, (1920, 1080)) == (1920, 1080)


def test_unlabelled_target_items_have_no_gt_and_collate(data):
    ds = acdc_dataset(data.acdc_root, "train", train=False, img_scale=None, backend="numpy")
    assert all("gt" not in ds[i] for i in range(len(ds)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["img"].shape == (2, 3, 54, 96) and batch["ori_size"].shape == (2, 2)
    assert len(batch["condition"]) == 2 and len(batch["filename"]) == 2
    assert ds.conditions == [s.condition for s in ds.samples]


@needs_mmseg
def test_mmseg_and_numpy_test_pipelines_agree(data):
    sample = scan_acdc(data.acdc_root, "val")[0]
    a = TestPipeline((64, 36), backend="numpy")(sample)
    b = TestPipeline((64, 36), backend="mmseg")(sample)
    assert a["img"].shape == b["img"].shape == (36, 64, 3)
    np.testing.assert_allclose(a["img"], b["img"], atol=1e-4)


@needs_mmseg
def test_train_pipeline_crop_flip_pad_and_cat_max_ratio(data):
    np.random.seed(0)  # mmseg transforms draw from numpy's global generator
    pipeline = TrainPipeline(img_scale=(96, 48), crop_size=(32, 32), cat_max_ratio=0.75)
    assert [s["type"] for s in pipeline.config(True)] == [
        "LoadImageFromFile",
        "LoadAnnotations",
        "Resize",
        "RandomCrop",
        "RandomFlip",
        "Normalize",
        "Pad",
    ]
    ds = SegmentationDataset(scan_cityscapes(data.cityscapes_root, "train"), pipeline)
    item = ds[0]
    assert item["img"].shape == (3, 32, 32) and item["gt"].shape == (32, 32)
    assert item["ori_size"].tolist() == [48, 96]
    labelled = item["gt"][item["gt"] != 255]
    assert labelled.bincount().max() / labelled.numel() < 0.75 or labelled.numel() == 0
    # crop larger than the image: padded with ignore
    big = SegmentationDataset(ds.samples, TrainPipeline((96, 48), (64, 128)))[0]
    assert big["img"].shape == (3, 64, 128) and (big["gt"][48:] == 255).all()
    # target train: same geometry, no label
    target = SegmentationDataset(scan_acdc(data.acdc_root, "train"), TrainPipeline((96, 54), (32, 32)))[0]
    assert target["img"].shape == (3, 32, 32) and "gt" not in target


@pytest.mark.skipif(mmseg_available(), reason="only without mmseg")
def test_train_pipeline_without_mmseg_says_what_to_install():
    with pytest.raises(ImportError, match="mmcv-full"):
        TrainPipeline((96, 48), (32, 32))


# ---------------------------------------------------------------- rare-class sampling


def _recount(samples):
    return np.stack([np.bincount(_label(s.label_path).ravel(), minlength=256)[:19] for s in samples])


def test_class_stats_equal_direct_recount_in_mic_format(data):
    samples = scan_cityscapes(data.cityscapes_root, "train")
    counts = load_or_compute_class_counts(samples, data.cityscapes_root)
    np.testing.assert_array_equal(counts, _recount(samples))
    stats = json.loads((data.cityscapes_root / STATS_FILE).read_text())
    assert [Path(e["file"]).name for e in stats] == [s.label_path.name for s in samples]
    for entry, row in zip(stats, counts):
        assert {k: v for k, v in entry.items() if k != "file"} == {
            str(c): int(n) for c, n in enumerate(row) if n > 0
        }
    with_class = json.loads((data.cityscapes_root / SAMPLES_WITH_CLASS_FILE).read_text())
    for c, entries in with_class.items():
        assert sorted(n for _, n in entries) == sorted(counts[:, int(c)][counts[:, int(c)] > 0])
    by_file = json.loads((data.cityscapes_root / STATS_DICT_FILE).read_text())
    assert len(by_file) == len(samples)


def test_class_stats_cache_is_reused_and_refreshed(data, tmp_path):
    cs = _copy(data.cityscapes_root, tmp_path / "cs")
    samples = scan_cityscapes(cs, "train")
    true_counts = _recount(samples)
    # A MIC-written file (cwd-relative paths, its own order) is recognised by
    # file name and reused as is: plant a marker count to prove it is read.
    mic_style = [
        dict(
            {str(c): int(n) for c, n in enumerate(row) if n > 0},
            file=f"data/cityscapes/{s.label_path.relative_to(cs).as_posix()}",
        )
        for s, row in zip(samples, true_counts)
    ][::-1]
    mic_style[-1]["18"] = 123456
    (cs / STATS_FILE).write_text(json.dumps(mic_style))
    counts = load_or_compute_class_counts(samples, cs)
    assert counts[0, 18] == 123456
    assert (cs / SAMPLES_WITH_CLASS_FILE).is_file()
    # A label edited after the cache was written: recomputed from the files.
    earlier = samples[0].label_path.stat().st_mtime - 10
    os.utime(cs / STATS_FILE, (earlier, earlier))
    np.testing.assert_array_equal(load_or_compute_class_counts(samples, cs), true_counts)
    # Up to date now: not rewritten.
    mtime = (cs / STATS_FILE).stat().st_mtime_ns
    load_or_compute_class_counts(samples, cs)
    assert (cs / STATS_FILE).stat().st_mtime_ns == mtime
    # A different set of files: recomputed.
    np.testing.assert_array_equal(load_or_compute_class_counts(samples[:3], cs), true_counts[:3])


def test_rcs_probabilities_follow_mic_formula():
    counts = np.zeros((3, 19), np.int64)
    counts[:, 0] = [5000, 6000, 7000]
    counts[0, 13] = 900
    counts[2, 16] = 40
    classes, probs = rcs_class_probabilities(counts, temperature=0.01)
    totals = counts.sum(0)
    assert classes.tolist() == [16, 13, 0]  # present classes, rarest first
    freq = totals[[16, 13, 0]] / totals.sum()
    expected = np.exp((1 - freq) / 0.01) / np.exp((1 - freq) / 0.01).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-9)
    assert probs[0] > probs[1] > probs[2]
    # a high temperature flattens the distribution toward uniform
    _, flat = rcs_class_probabilities(counts, temperature=1000.0)
    np.testing.assert_allclose(flat, 1 / 3, atol=1e-3)


def test_rare_class_sampler(data):
    samples = scan_cityscapes(data.cityscapes_root, "train")
    counts = _recount(samples)
    present = np.flatnonzero(counts.sum(0))
    # the largest threshold every present class still passes in some image
    min_pixels = int(min(counts[:, c].max() for c in present)) - 1
    sampler = RareClassSampler.from_samples(
        samples, data.cityscapes_root, temperature=0.01, min_pixels=min_pixels, min_crop_ratio=2.0
    )
    assert sampler.min_crop_pixels == 2 * min_pixels
    assert sorted(sampler.samples_with_class) == present.tolist()
    for c, candidates in sampler.samples_with_class.items():
        assert candidates.tolist() == np.flatnonzero(counts[:, c] > min_pixels).tolist()
    rng = np.random.default_rng(0)
    draws = [sampler.sample(rng) for _ in range(4000)]
    assert all(counts[i, c] > min_pixels for i, c in draws)
    freq = Counter(c for _, c in draws)
    for c, p in zip(sampler.classes, sampler.probabilities):
        assert abs(freq[int(c)] / len(draws) - p) < 0.03
    with pytest.raises(ValueError, match="min_pixels"):
        RareClassSampler(counts, min_pixels=10**6)


def test_crop_check_uses_min_pixels_times_crop_ratio():
    sampler = RareClassSampler(np.full((1, 19), 100), min_pixels=10, min_crop_ratio=2.0)
    gt = torch.full((8, 8), 255)
    gt[:3, :7] = 5  # 21 pixels > 10 * 2
    gt[3, :4] = 6  # 4 pixels
    assert sampler.crop_is_enough(gt, 5) and not sampler.crop_is_enough(gt, 6)
    assert sampler.crop_is_enough(gt.numpy(), 5)
    gt[:3, :7] = 255
    gt[0, :5] = 5
    gt[1, :5] = 5  # exactly 20 pixels: MIC requires more than the threshold
    assert not sampler.crop_is_enough(gt, 5)
    no_crop_check = RareClassSampler(np.full((1, 19), 100), min_pixels=10, min_crop_ratio=0)
    assert no_crop_check.crop_is_enough(gt, 6)


def test_draw_rare_class_sample_redraws_crops_until_class_is_present(data):
    samples = scan_cityscapes(data.cityscapes_root, "train")
    counts = _recount(samples)

    class RandomCrops:  # a minimal dataset whose items are random 8x8 label crops
        def __init__(self):
            self.rng = np.random.default_rng(1)
            self.reads = 0

        def __getitem__(self, i):
            self.reads += 1
            label = _label(samples[i].label_path)
            y = self.rng.integers(0, label.shape[0] - 8)
            x = self.rng.integers(0, label.shape[1] - 8)
            return {"gt": torch.from_numpy(label[y : y + 8, x : x + 8].astype(np.int64))}

    dataset = RandomCrops()
    sampler = RareClassSampler(counts, temperature=0.01, min_pixels=5, min_crop_ratio=1.0)
    rng = np.random.default_rng(0)
    reads_per_draw, hits = [], 0
    for _ in range(30):
        before = dataset.reads
        item, c = draw_rare_class_sample(dataset, sampler, rng)
        reads_per_draw.append(dataset.reads - before)
        enough = sampler.crop_is_enough(item["gt"], c)
        hits += enough
        # MIC: stop at the first crop with enough pixels, else after 10 redraws
        assert enough or reads_per_draw[-1] == 11
        assert 1 <= reads_per_draw[-1] <= 11
    assert max(reads_per_draw) > 1 and hits > 0


def test_class_pixel_counter_ignores_255():
    label = np.array([[0, 0, 255], [18, 255, 255]], np.uint8)
    counts = count_class_pixels(label)
    assert counts.shape == (19,) and counts[0] == 2 and counts[18] == 1 and counts.sum() == 3


@needs_mmseg
def test_file_suffixes_follow_mmseg_cityscapes_dataset():
    import inspect

    from mmseg.datasets import CityscapesDataset

    from uda.data.layouts import CITYSCAPES_IMG_SUFFIX, CITYSCAPES_SEG_SUFFIX

    defaults = {k: p.default for k, p in inspect.signature(CityscapesDataset.__init__).parameters.items()}
    assert defaults["img_suffix"] == CITYSCAPES_IMG_SUFFIX
    assert defaults["seg_map_suffix"] == CITYSCAPES_SEG_SUFFIX
