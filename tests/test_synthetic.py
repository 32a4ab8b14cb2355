"""The synthetic Cityscapes/ACDC generator: layouts, content, determinism, caching."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uda.data import labels
from uda.data.layouts import scan_acdc, scan_cityscapes
from uda.data.paths import EMBEDDED_ROOT
from uda.data.synthetic import SyntheticConfig, ensure_embedded, generate, main
from uda.data.synthetic.stamp import STAMP_FILE

SMALL = dict(
    num_source_train=22,
    num_source_val=2,
    num_target_train=2,
    num_target_val=2,
    num_target_test=1,
    source_size=(128, 64),
    target_size=(128, 72),
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return generate(root, SyntheticConfig(seed=3, **SMALL))


def _digests(root: Path) -> dict:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_layout_is_exactly_cityscapes_and_acdc(small):
    cs, acdc = small.cityscapes_root, small.acdc_root
    img = next((cs / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))
    city = img.parent.name
    stem = img.name[: -len("_leftImg8bit.png")]
    assert stem.startswith(city + "_") and len(stem.split("_")) == 3
    gt = cs / "gtFine" / "train" / city
    assert (gt / f"{stem}_gtFine_labelTrainIds.png").is_file()
    assert (gt / f"{stem}_gtFine_labelIds.png").is_file()
    for condition in labels_conditions():
        for split in ("train", "val", "test"):
            seqs = list((acdc / "rgb_anon" / condition / split).iterdir())
            assert seqs and all(s.is_dir() for s in seqs)
            frame = next(seqs[0].glob("*_rgb_anon.png"))
            assert frame.name.startswith(seqs[0].name + "_frame_")
        # ground truth for train and val (as ACDC ships it), none for test
        assert list((acdc / "gt" / condition / "train").glob("*/*_gt_labelTrainIds.png"))
        assert list((acdc / "gt" / condition / "val").glob("*/*_gt_labelTrainIds.png"))
        assert not (acdc / "gt" / condition / "test").exists()
    assert Image.open(img).size == (128, 64)
    assert Image.open(frame).size == (128, 72)


def labels_conditions():
    return ("fog", "night", "rain", "snow")


def test_label_ids_files_agree_with_train_ids(small):
    for sample in scan_cityscapes(small.cityscapes_root, "train")[:3]:
        train_ids = _read(sample.label_path)
        label_ids = _read(Path(str(sample.label_path).replace("_labelTrainIds.png", "_labelIds.png")))
        np.testing.assert_array_equal(labels.label_to_train_id(label_ids), train_ids)
        assert (label_ids[train_ids == 255] == 1).all()  # ego vehicle hood


def test_source_train_has_all_19_classes_rare_ones_rare(small):
    counts = np.zeros(19, np.int64)
    for sample in scan_cityscapes(small.cityscapes_root, "train"):
        label = _read(sample.label_path)
        assert set(np.unique(label)) <= set(range(19)) | {255}
        counts += np.bincount(label.ravel(), minlength=256)[:19]
    assert (counts > 0).all(), [labels.CLASSES[c] for c in np.flatnonzero(counts == 0)]
    share = counts / counts.sum()
    road, building = share[labels.CLASSES.index("road")], share[labels.CLASSES.index("building")]
    for rare in ("train", "motorcycle", "traffic light", "rider", "bicycle"):
        assert share[labels.CLASSES.index(rare)] < 0.1 * min(road, building), rare


def test_scene_geometry_sky_on_top_road_below_objects_grow_downward(small):
    sky_rows, road_rows, _car_rows = [], [], []
    for sample in scan_cityscapes(small.cityscapes_root, "train"):
        label = _read(sample.label_path)
        rows = np.arange(label.shape[0])[:, None].repeat(label.shape[1], 1)
        sky_rows += rows[label == 10].tolist()
        road_rows += rows[label == 0].tolist()
    assert np.mean(sky_rows) < 0.3 * 64 < 0.6 * 64 < np.mean(road_rows)
    # perspective: objects on the ground are taller the lower their base
    heights, bases = [], []
    for sample in scan_cityscapes(small.cityscapes_root, "train"):
        label = _read(sample.label_path)
        for cls in (11, 13):
            cols = np.flatnonzero((label == cls).any(0))
            if cols.size:
                ys = np.flatnonzero((label[:, cols] == cls).any(1))
                bases.append(ys.max())
                heights.append(ys.max() - ys.min() + 1)
    assert np.corrcoef(bases, heights)[0, 1] > 0.3


def test_conditions_have_their_appearance(small):
    def mean_stats(samples):
        imgs = [_read(s.image_path).astype(np.float32) / 255 for s in samples]
        return (
            np.mean([i.mean() for i in imgs]),
            np.mean([i.std() for i in imgs]),
            np.mean([(i.max(2) - i.min(2)).mean() for i in imgs]),
        )

    clear = mean_stats(scan_cityscapes(small.cityscapes_root, "train")[:6])
    by_cond = {
        c: mean_stats(
            scan_acdc(small.acdc_root, "val", conditions=[c])
            + scan_acdc(small.acdc_root, "train", conditions=[c])
        )
        for c in labels_conditions()
    }
    brightness, contrast, saturation = 0, 1, 2
    assert by_cond["night"][brightness] < 0.5 * clear[brightness]
    assert by_cond["fog"][contrast] < 0.8 * clear[contrast]
    assert by_cond["snow"][brightness] > clear[brightness]
    assert by_cond["snow"][saturation] < 0.8 * clear[saturation]
    assert by_cond["rain"][saturation] < 0.8 * clear[saturation]


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small):
    again = generate(tmp_path / "again", SyntheticConfig(seed=3, **SMALL))
    first = _digests(small.cityscapes_root.parent)
    assert _digests(again.cityscapes_root.parent) == first
    other = generate(tmp_path / "other", SyntheticConfig(seed=4, **SMALL))
    second = _digests(other.cityscapes_root.parent)
    assert second.keys() == first.keys()
    images = [k for k in first if k.endswith("_leftImg8bit.png")]
    assert all(first[k] != second[k] for k in images)


def test_rcs_statistics_are_written_during_generation(small):
    cs = small.cityscapes_root
    stats = json.loads((cs / "sample_class_stats.json").read_text())
    assert len(stats) == 22
    assert all(e["file"].startswith("gtFine/train/") for e in stats)
    assert (cs / "samples_with_class.json").is_file()


def test_ensure_embedded_reuses_and_regenerates(tmp_path):
    params = dict(SMALL, num_source_train=2, num_target_train=1, num_target_val=1, conditions=("night",))
    first = ensure_embedded(tmp_path, **params)
    assert first.cityscapes_root == tmp_path / "cityscapes"
    stamp = json.loads((tmp_path / STAMP_FILE).read_text())
    assert stamp["params"]["conditions"] == ["night"] and "generator_version" in stamp
    marker = first.cityscapes_root / "leftImg8bit"
    mtime = marker.stat().st_mtime_ns
    again = ensure_embedded(tmp_path, **params)  # same params: reused
    assert again == first and marker.stat().st_mtime_ns == mtime
    changed = ensure_embedded(tmp_path, **dict(params, seed=1))
    assert changed.config.seed == 1
    assert json.loads((tmp_path / STAMP_FILE).read_text())["params"]["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".old"))]
    assert len(scan_acdc(tmp_path / "acdc", "val")) == 1


def test_interrupted_generation_is_not_reused(tmp_path):
    params = dict(
        SMALL,
        num_source_train=1,
        num_source_val=1,
        num_target_train=1,
        num_target_val=1,
        num_target_test=0,
        conditions=("fog",),
    )
    ensure_embedded(tmp_path, **params)
    (tmp_path / STAMP_FILE).unlink()  # as if the run died before the stamp
    (tmp_path / "acdc" / "rgb_anon" / "fog" / "val").rename(tmp_path / "junk")
    ensure_embedded(tmp_path, **params)
    assert len(scan_acdc(tmp_path / "acdc", "val")) == 1


def test_bad_parameters_raise_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="num_sorce_train"):
        ensure_embedded(tmp_path, num_sorce_train=3)
    with pytest.raises(ValueError, match="conditions"):
        SyntheticConfig(conditions=("hail",))
    with pytest.raises(ValueError, match="source_size"):
        SyntheticConfig(source_size=(16, 8))


def test_command_line(tmp_path, capsys):
    rc = main(
        [
            "--root",
            str(tmp_path),
            "--seed",
            "2",
            "--num-source",
            "1",
            "--num-source-val",
            "1",
            "--num-target-train",
            "1",
            "--num-target-val",
            "1",
            "--num-target-test",
            "0",
            "--source-size",
            "64x32",
            "--target-size",
            "64x36",
            "--conditions",
            "fog",
            "snow",
        ]
    )
    assert rc == 0
    out = capsys.readouterr()
    assert "cityscapes" in out.out and "MB" in out.out
    assert "6/6 images" in out.err  # progress lines when not on a terminal
    assert len(scan_acdc(tmp_path / "acdc", "train")) == 2


def test_default_root_is_fixed_inside_the_project():
    # Never derived from the working directory or from a user's dataset root.
    assert EMBEDDED_ROOT == Path(__file__).resolve().parent.parent / "data" / "embedded"
    assert EMBEDDED_ROOT.is_absolute()
