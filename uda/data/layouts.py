"""Readers for the real Cityscapes and ACDC folder layouts.

They turn a dataset root into a sorted list of :class:`Sample` records (image
path, label path or None, split, condition) and check the layout on the way,
so that a wrong path gives one clear :class:`DatasetLayoutError` that prints
the expected tree, instead of a traceback from inside a data loader.

File naming follows mmsegmentation 0.30 / MIC: an image ``<name><img_suffix>``
is paired with the label ``<name><seg_map_suffix>`` at the same relative path
under the annotation folder (``CityscapesDataset``: ``_leftImg8bit.png`` /
``_gtFine_labelTrainIds.png``; MIC's ``ACDCDataset``: ``_rgb_anon.png`` /
``_gt_labelTrainIds.png``), and samples are sorted by that relative path as
``CustomDataset.load_annotations`` sorts them.

The readers only list files; they import neither mmcv nor torch, so
evaluation and serving can use them with Pillow alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Sequence

from uda.errors import UserError

__all__ = [
    "Sample",
    "DatasetLayoutError",
    "MissingLabelsError",
    "ACDC_CONDITIONS",
    "SOURCE_CONDITION",
    "UNKNOWN_CONDITION",
    "CITYSCAPES_IMG_SUFFIX",
    "CITYSCAPES_SEG_SUFFIX",
    "ACDC_IMG_SUFFIX",
    "ACDC_SEG_SUFFIX",
    "CITYSCAPES_LAYOUT",
    "ACDC_LAYOUT",
    "scan_cityscapes",
    "scan_acdc",
    "detect_acdc_layout",
]

PathLike = str | os.PathLike

#: ACDC's adverse conditions, in the order of the ACDC paper.
ACDC_CONDITIONS: tuple[str, ...] = ("fog", "night", "rain", "snow")
#: Condition of every Cityscapes (source) sample.
SOURCE_CONDITION = "clear"
#: Condition of a flattened-ACDC sample whose condition cannot be recovered.
UNKNOWN_CONDITION = "unknown"

# mmseg 0.30 CityscapesDataset defaults.
CITYSCAPES_IMG_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_SEG_SUFFIX = "_gtFine_labelTrainIds.png"
# MIC's ACDCDataset (mmseg/datasets/acdc.py).
ACDC_IMG_SUFFIX = "_rgb_anon.png"
ACDC_SEG_SUFFIX = "_gt_labelTrainIds.png"

CITYSCAPES_LAYOUT = """\
<root>/
├── leftImg8bit/
│   ├── train/<city>/<city>_<seq>_<frame>_leftImg8bit.png
│   └── val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
└── gtFine/
    ├── train/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png
    └── val/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png
(the *_labelTrainIds.png files are made from the downloaded *_polygons.json by
mmseg/MIC's tools/convert_datasets/cityscapes.py)"""

ACDC_LAYOUT = """\
either as downloaded (rgb_anon_trainvaltest.zip + gt_trainval.zip):
<root>/
├── rgb_anon/<condition>/{train,val,test}/<sequence>/<name>_rgb_anon.png
└── gt/<condition>/{train,val}/<sequence>/<name>_gt_labelTrainIds.png
    with <condition> in fog, night, rain, snow
or flattened as in the MIC README (rsync ... rgb_anon/*/train/*/* rgb_anon/train/):
<root>/
├── rgb_anon/{train,val,test}/<name>_rgb_anon.png
└── gt/{train,val}/<name>_gt_labelTrainIds.png"""

# How many offending files an error message names.
_NAMED_IN_ERRORS = 5


class DatasetLayoutError(UserError, FileNotFoundError):
    """A dataset root is missing or is not laid out as expected.

    The message names what was looked for, where, and the expected tree.
    """


class MissingLabelsError(DatasetLayoutError):
    """Images that need a label (source, target val) have no label file."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, as found on disk.

    Attributes:
        image_path: The RGB image.
        label_path: The ``*_labelTrainIds.png`` label map, or None where the
            sample is used without a label (target train, test splits).
        split: 'train', 'val' or 'test'.
        condition: 'clear' for Cityscapes; 'fog', 'night', 'rain', 'snow' or
            'unknown' for ACDC.
        name: File name without the image suffix, e.g.
            'aachen_000000_000019' or 'GOPR0475_frame_000041'.
        sequence: The city (Cityscapes) or recording sequence (ACDC).
    """

    image_path: Path
    label_path: Path | None
    split: str
    condition: str
    name: str
    sequence: str

    @property
    def has_label(self) -> bool:
        return self.label_path is not None


def _layout_error(
    message: str, root: Path, layout: str, cls: type = DatasetLayoutError
) -> DatasetLayoutError:
    return cls(f"{message}\nDataset root: {root}\nExpected layout:\n{layout}")


def _check_split(split: str, allowed: Sequence[str], dataset: str) -> None:
    if split not in allowed:
        raise ValueError(f"{dataset} has no split {split!r}; choose one of {list(allowed)}")


def _check_root(root: PathLike, dataset: str, layout: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise _layout_error(f"{dataset} root {what}.", root, layout)
    return root


def _scan(folder: Path, suffix: str) -> list[str]:
    """Lists files ending in ``suffix`` below ``folder`` (recursively) as
    sorted relative posix paths, like ``mmcv.scandir(folder, suffix,
    recursive=True)`` followed by mmseg's sort."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(folder)
        for filename in filenames:
            if filename.endswith(suffix) and not filename.startswith("."):
                found.append((rel_dir / filename).as_posix())
    return sorted(found)


def _missing_labels_error(
    missing: list[tuple[Path, Path]], total: int, root: Path, layout: str, hint: str = ""
) -> MissingLabelsError:
    named = "\n".join(f"  {image} -> expected {label}" for image, label in missing[:_NAMED_IN_ERRORS])
    more = f"\n  ... and {len(missing) - _NAMED_IN_ERRORS} more" if len(missing) > _NAMED_IN_ERRORS else ""
    return _layout_error(
        f"{len(missing)} of {total} images have no label file:\n{named}{more}{hint}",
        root,
        layout,
        MissingLabelsError,
    )


def scan_cityscapes(root: PathLike, split: str = "train") -> list[Sample]:
    """Lists the images (and their labels) of one Cityscapes split.

    Args:
        root: The Cityscapes root holding ``leftImg8bit/`` and ``gtFine/``.
        split: 'train' or 'val' (labelled), or 'test' (returned unlabelled:
            Cityscapes test labels are all 'ignore').

    Returns:
        The samples sorted by relative path, condition 'clear'.

    Raises:
        DatasetLayoutError: if the root or the split folder is missing or
            holds no ``*_leftImg8bit.png``.
        MissingLabelsError: if a train/val image has no
            ``*_gtFine_labelTrainIds.png`` next to it under ``gtFine/``.
    """
    _check_split(split, ("train", "val", "test"), "Cityscapes")
    root = _check_root(root, "Cityscapes", CITYSCAPES_LAYOUT)
    img_dir = root / "leftImg8bit" / split
    ann_dir = root / "gtFine" / split
    if not img_dir.is_dir():
        raise _layout_error(f"Cityscapes images folder {img_dir} not found.", root, CITYSCAPES_LAYOUT)
    images = _scan(img_dir, CITYSCAPES_IMG_SUFFIX)
    if not images:
        raise _layout_error(
            f"No *{CITYSCAPES_IMG_SUFFIX} files found below {img_dir}.", root, CITYSCAPES_LAYOUT
        )
    labelled = split != "test"
    samples, missing = [], []
    for rel in images:
        stem = rel[: -len(CITYSCAPES_IMG_SUFFIX)]
        label = ann_dir / (stem + CITYSCAPES_SEG_SUFFIX) if labelled else None
        if label is not None and not label.is_file():
            missing.append((img_dir / rel, label))
        rel_path = Path(stem)
        samples.append(
            Sample(
                image_path=img_dir / rel,
                label_path=label,
                split=split,
                condition=SOURCE_CONDITION,
                name=rel_path.name,
                sequence=rel_path.parent.name,
            )
        )
    if missing:
        first_label = missing[0][1]
        hint = ""
        if first_label.with_name(
            first_label.name.replace("_labelTrainIds.png", "_labelIds.png")
        ).is_file() or (
            first_label.with_name(first_label.name.replace("_labelTrainIds.png", "_polygons.json")).is_file()
        ):
            hint = (
                "\nThe *_gtFine_labelIds.png / *_polygons.json files are "
                "there: convert them to trainIds with mmseg/MIC "
                "`python tools/convert_datasets/cityscapes.py <root>`."
            )
        raise _missing_labels_error(missing, len(images), root, CITYSCAPES_LAYOUT, hint)
    return samples


def detect_acdc_layout(root: PathLike, split: str) -> str:
    """Tells which ACDC layout holds ``split`` under ``root``.

    Args:
        root: The ACDC root holding ``rgb_anon/`` (and ``gt/``).
        split: 'train', 'val' or 'test'.

    Returns:
        'nested' (as downloaded: ``rgb_anon/<condition>/<split>/<sequence>/``)
        when any condition folder holds the split, else 'flat'
        (``rgb_anon/<split>/``, MIC's rsync).

    Raises:
        DatasetLayoutError: if neither layout holds the split.
    """
    root = _check_root(root, "ACDC", ACDC_LAYOUT)
    rgb = root / "rgb_anon"
    if not rgb.is_dir():
        raise _layout_error(f"ACDC images folder {rgb} not found.", root, ACDC_LAYOUT)
    if any((rgb / c / split).is_dir() for c in ACDC_CONDITIONS):
        return "nested"
    if (rgb / split).is_dir():
        return "flat"
    hint = ""
    if split == "test" and (rgb / "val").is_dir():
        hint = (
            "\nMIC's rsync commands flatten only train and val; for test "
            "keep the downloaded rgb_anon/<condition>/test/ folders or run "
            "`rsync -a <root>/rgb_anon/*/test/*/* <root>/rgb_anon/test/`."
        )
    raise _layout_error(
        f"ACDC split {split!r} not found: neither {rgb}/<condition>/{split}/ "
        f"(condition in {', '.join(ACDC_CONDITIONS)}) nor {rgb / split}/ "
        f"exists.{hint}",
        root,
        ACDC_LAYOUT,
    )


def _acdc_sequence(name: str) -> str:
    """'GOPR0475_frame_000041' -> 'GOPR0475' (ACDC frame naming)."""
    head, sep, _ = name.partition("_frame_")
    return head if sep else ""


def _nested_condition_index(rgb: Path) -> dict[str, str]:
    """Maps image names to conditions using the downloaded nested folders.

    MIC's README flattens ACDC with ``rsync`` (a copy), so the nested
    ``rgb_anon/<condition>/`` folders usually still sit next to the flat
    ones; they are the only reliable source of a flat image's condition.
    """
    index = {}
    for condition in ACDC_CONDITIONS:
        cond_dir = rgb / condition
        if not cond_dir.is_dir():
            continue
        for split_dir in sorted(p for p in cond_dir.iterdir() if p.is_dir()):
            for rel in _scan(split_dir, ACDC_IMG_SUFFIX):
                index[Path(rel).name[: -len(ACDC_IMG_SUFFIX)]] = condition
    return index


def _check_conditions(conditions: Iterable[str] | None) -> tuple[str, ...] | None:
    if conditions is None:
        return None
    if isinstance(conditions, str):
        conditions = [conditions]
    conditions = tuple(conditions)
    unknown = [c for c in conditions if c not in ACDC_CONDITIONS]
    if unknown or not conditions:
        raise ValueError(f"Unknown ACDC condition(s) {unknown}; choose from {list(ACDC_CONDITIONS)}")
    return conditions


def scan_acdc(
    root: PathLike, split: str = "val", conditions: Iterable[str] | None = None, layout: str = "auto"
) -> list[Sample]:
    """Lists the images of one ACDC split, in either ACDC layout.

    Labels are handed out only for 'val': 'train' images are the unlabelled
    target of UDA (their ground truth, although shipped with ACDC, is never
    returned) and 'test' has no public ground truth.

    Args:
        root: The ACDC root holding ``rgb_anon/`` and ``gt/``.
        split: 'train', 'val' or 'test'.
        conditions: Conditions to keep (subset of fog, night, rain, snow);
            None keeps every condition present.
        layout: 'nested' (as downloaded), 'flat' (MIC's flattened
            ``rgb_anon/<split>/``) or 'auto' (nested if present, else flat).
            In the flat layout the condition is recovered from the nested
            folders when they are still present, else it is 'unknown'.

    Returns:
        The samples sorted by relative path.

    Raises:
        DatasetLayoutError: if the root, split or a requested condition is
            missing, or no ``*_rgb_anon.png`` is found.
        MissingLabelsError: if a val image has no ``*_gt_labelTrainIds.png``.
        ValueError: for an unknown split, condition or layout name.
    """
    _check_split(split, ("train", "val", "test"), "ACDC")
    conditions = _check_conditions(conditions)
    if layout not in ("auto", "nested", "flat"):
        raise ValueError(f"layout must be 'auto', 'nested' or 'flat', got {layout!r}")
    root = _check_root(root, "ACDC", ACDC_LAYOUT)
    if layout == "auto":
        layout = detect_acdc_layout(root, split)
    rgb, gt = root / "rgb_anon", root / "gt"
    labelled = split == "val"

    # (image dir, label dir, relative image path, condition or None)
    found: list[tuple[Path, Path, str, str | None]] = []
    if layout == "nested":
        present = [c for c in ACDC_CONDITIONS if (rgb / c / split).is_dir()]
        wanted = conditions if conditions is not None else tuple(present)
        absent = [c for c in wanted if c not in present]
        if absent or not wanted:
            raise _layout_error(
                f"ACDC split {split!r} has no condition folder(s) "
                f"{absent or list(ACDC_CONDITIONS)} under {rgb}/<condition>/"
                f"{split}/ (present: {present}).",
                root,
                ACDC_LAYOUT,
            )
        for condition in wanted:
            img_dir = rgb / condition / split
            ann_dir = gt / condition / split
            found += [(img_dir, ann_dir, rel, condition) for rel in _scan(img_dir, ACDC_IMG_SUFFIX)]
    else:
        img_dir = rgb / split
        if not img_dir.is_dir():
            raise _layout_error(f"ACDC images folder {img_dir} not found.", root, ACDC_LAYOUT)
        index = _nested_condition_index(rgb)
        for rel in _scan(img_dir, ACDC_IMG_SUFFIX):
            name = Path(rel).name[: -len(ACDC_IMG_SUFFIX)]
            found.append((img_dir, gt / split, rel, index.get(name, UNKNOWN_CONDITION)))
        if conditions is not None:
            unknown = sum(c == UNKNOWN_CONDITION for *_, c in found)
            if unknown:
                raise _layout_error(
                    f"Cannot select conditions {list(conditions)} in the flat "
                    f"layout: the condition of {unknown} images is unknown "
                    f"(keep the downloaded {rgb}/<condition>/ folders next to "
                    "the flat ones, or use the nested layout).",
                    root,
                    ACDC_LAYOUT,
                )
            found = [f for f in found if f[3] in conditions]

    if not found:
        raise _layout_error(
            f"No *{ACDC_IMG_SUFFIX} files found for ACDC split {split!r} ({layout} layout).",
            root,
            ACDC_LAYOUT,
        )

    samples, missing = [], []
    for img_dir, ann_dir, rel, condition in found:
        stem = rel[: -len(ACDC_IMG_SUFFIX)]
        label = ann_dir / (stem + ACDC_SEG_SUFFIX) if labelled else None
        if label is not None and not label.is_file():
            missing.append((img_dir / rel, label))
        name = Path(stem).name
        sequence = Path(stem).parent.name or _acdc_sequence(name)
        samples.append(
            Sample(
                image_path=img_dir / rel,
                label_path=label,
                split=split,
                condition=condition,
                name=name,
                sequence=sequence,
            )
        )
    if missing:
        raise _missing_labels_error(
            missing, len(found), root, ACDC_LAYOUT, "\nACDC val labels come from gt_trainval.zip."
        )
    return samples
