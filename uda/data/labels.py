"""The 19 Cityscapes training classes: names, colours and id mappings.

This is the one module that owns the class definitions of the project; every
other module (datasets, metrics, serving, visualisation) imports them from
here. It is pure numpy on purpose: the serving path imports it and must not
pull in mmcv, mmseg or mlflow.

The numbers are those of the official Cityscapes label table
(``cityscapesscripts.helpers.labels``): the 19 evaluated classes get trainIds
0..18 in labelId order, every other labelId maps to the ignore index 255.
ACDC uses the same 19 classes and the same encodings.
"""

from __future__ import annotations


import numpy as np

__all__ = [
    "CLASSES",
    "PALETTE",
    "NUM_CLASSES",
    "IGNORE_INDEX",
    "LABEL_IDS",
    "THING_CLASSES",
    "STUFF_CLASSES",
    "label_to_train_id",
    "train_id_to_label_id",
    "colorize",
]

#: Class names in trainId order (identical to mmseg's ``CityscapesDataset.CLASSES``).
CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

#: Official Cityscapes colours (RGB) in trainId order.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

NUM_CLASSES: int = len(CLASSES)

#: Label value that losses and metrics ignore (Cityscapes' trainId 255).
IGNORE_INDEX: int = 255

#: Cityscapes labelId of each trainId (official table: road=7 ... bicycle=33).
LABEL_IDS: tuple[int, ...] = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

#: trainIds of the "thing" classes on which MIC/DAFormer compute the ImageNet
#: feature distance (traffic light, traffic sign, person ... bicycle).
THING_CLASSES: tuple[int, ...] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

#: trainIds of the remaining ("stuff") classes.
STUFF_CLASSES: tuple[int, ...] = tuple(c for c in range(NUM_CLASSES) if c not in THING_CLASSES)

# Colour of ignored pixels in colourised maps ('unlabeled' in the official table).
_IGNORE_COLOR = (0, 0, 0)
# labelId of ignored pixels when converting back ('unlabeled' = 0, which is
# what cityscapesscripts' trainId2label[255] resolves to).
_IGNORE_LABEL_ID = 0


def _build_luts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    label_to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    train_to_label = np.full(256, _IGNORE_LABEL_ID, dtype=np.uint8)
    colors = np.zeros((256, 3), dtype=np.uint8)
    colors[:] = _IGNORE_COLOR
    for train_id, label_id in enumerate(LABEL_IDS):
        label_to_train[label_id] = train_id
        train_to_label[train_id] = label_id
        colors[train_id] = PALETTE[train_id]
    # Read-only so that a caller cannot corrupt the mapping by accident.
    for lut in (label_to_train, train_to_label, colors):
        lut.flags.writeable = False
    return label_to_train, train_to_label, colors


_LABEL_TO_TRAIN, _TRAIN_TO_LABEL, _TRAIN_COLORS = _build_luts()


def _as_byte_indices(values: np.ndarray, what: str) -> np.ndarray:
    """Checks that ``values`` is an integer array in [0, 255] for a table lookup."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} must be an integer array, got dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"{what} must lie in [0, 255], got values in [{values.min()}, {values.max()}]")
    return values


def label_to_train_id(label_ids: np.ndarray) -> np.ndarray:
    """Maps Cityscapes labelIds (``*_labelIds.png``) to trainIds.

    Args:
        label_ids: Integer array of labelIds, any shape.

    Returns:
        uint8 array of the same shape: trainIds 0..18, and ``IGNORE_INDEX``
        for every labelId that is not one of the 19 evaluated classes.
    """
    return _LABEL_TO_TRAIN[_as_byte_indices(label_ids, "label_ids")]


def _check_train_ids(train_ids: np.ndarray) -> np.ndarray:
    train_ids = _as_byte_indices(train_ids, "train_ids")
    invalid = (train_ids >= NUM_CLASSES) & (train_ids != IGNORE_INDEX)
    if invalid.any():
        bad = np.unique(train_ids[invalid])[:10].tolist()
        raise ValueError(
            f"train_ids must be in 0..{NUM_CLASSES - 1} or {IGNORE_INDEX}, "
            f"found {bad}; is this a labelId map? Convert it with "
            "label_to_train_id() first."
        )
    return train_ids


def train_id_to_label_id(train_ids: np.ndarray) -> np.ndarray:
    """Maps trainIds back to Cityscapes labelIds (e.g. for benchmark submission).

    Args:
        train_ids: Integer array of trainIds (0..18 or ``IGNORE_INDEX``).

    Returns:
        uint8 array of labelIds; ignored pixels become 0 ('unlabeled').

    Raises:
        ValueError: if a value is neither a trainId nor ``IGNORE_INDEX``.
    """
    return _TRAIN_TO_LABEL[_check_train_ids(train_ids)]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """Paints a trainId map with the official Cityscapes colours.

    Args:
        train_ids: Integer array of shape (H, W) with trainIds 0..18 or
            ``IGNORE_INDEX``.

    Returns:
        uint8 RGB array of shape (H, W, 3); ignored pixels are black.

    Raises:
        ValueError: if a value is neither a trainId nor ``IGNORE_INDEX``.
    """
    return _TRAIN_COLORS[_check_train_ids(train_ids)]
