"""The class table in uda.data.labels against the official Cityscapes table."""

import numpy as np
import pytest

from uda.data import labels
from references import reference

cs_labels = reference("cityscapesscripts.helpers.labels")


def _official_train_labels():
    return sorted((lb for lb in cs_labels.labels if 0 <= lb.trainId < 255), key=lambda lb: lb.trainId)


def test_classes_palette_label_ids_match_official_table():
    official = _official_train_labels()
    assert [lb.trainId for lb in official] == list(range(19))
    assert labels.CLASSES == tuple(lb.name for lb in official)
    assert labels.PALETTE == tuple(tuple(lb.color) for lb in official)
    assert labels.LABEL_IDS == tuple(lb.id for lb in official)
    assert labels.NUM_CLASSES == 19 and labels.IGNORE_INDEX == 255


def test_label_to_train_id_matches_official_table_for_every_label_id():
    all_ids = np.arange(256, dtype=np.uint8)
    mapped = labels.label_to_train_id(all_ids)
    expected = np.full(256, 255, dtype=np.uint8)
    for lb in cs_labels.labels:
        if 0 <= lb.id < 256:
            expected[lb.id] = lb.trainId if 0 <= lb.trainId < 255 else 255
    np.testing.assert_array_equal(mapped, expected)
    assert mapped.dtype == np.uint8


def test_train_id_to_label_id_round_trip_and_ignore():
    train_ids = np.array([[0, 18, 255], [10, 13, 6]], dtype=np.int64)
    label_ids = labels.train_id_to_label_id(train_ids)
    expected = [[cs_labels.trainId2label[int(t)].id for t in row] for row in train_ids]
    np.testing.assert_array_equal(label_ids, expected)
    np.testing.assert_array_equal(labels.label_to_train_id(label_ids), train_ids)


def test_colorize_uses_palette_and_black_for_ignore():
    train_ids = np.array([[0, 1], [255, 18]], dtype=np.uint8)
    rgb = labels.colorize(train_ids)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == cs_labels.name2label["road"].color
    assert tuple(rgb[0, 1]) == cs_labels.name2label["sidewalk"].color
    assert tuple(rgb[1, 0]) == (0, 0, 0)
    assert tuple(rgb[1, 1]) == cs_labels.name2label["bicycle"].color


def test_label_ids_passed_as_train_ids_raise_clear_error():
    with pytest.raises(ValueError, match="label_to_train_id"):
        labels.colorize(np.array([[26, 7]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        labels.label_to_train_id(np.array([300]))
    with pytest.raises(ValueError, match="integer"):
        labels.train_id_to_label_id(np.array([0.5]))


def test_thing_classes_are_mic_feature_distance_classes():
    # MIC/DAFormer: imnet_feature_dist_classes=[6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    assert labels.THING_CLASSES == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    assert [labels.CLASSES[c] for c in labels.THING_CLASSES] == [
        "traffic light",
        "traffic sign",
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    ]
    assert sorted(labels.THING_CLASSES + labels.STUFF_CLASSES) == list(range(19))


def test_labels_module_is_pure_numpy():
    import subprocess
    import sys

    code = (
        "import sys, uda.data.labels; "
        'bad = [m for m in ("mmcv", "mmseg", "mlflow") '
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_matches_mmseg_cityscapes_dataset():
    CityscapesDataset = reference("mmseg.datasets").CityscapesDataset
    assert tuple(CityscapesDataset.CLASSES) == labels.CLASSES
    assert tuple(map(tuple, CityscapesDataset.PALETTE)) == labels.PALETTE
