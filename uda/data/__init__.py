"""Datasets: Cityscapes/ACDC readers, pipelines, rare-class sampling, labels,
the synthetic embedded dataset, the rule of which roots may be written, and
the digest of a root's file list that runs log with their dataset inputs.

Submodules are imported lazily, so ``import uda.data.labels`` (serving path)
pulls in neither torch datasets nor mmseg.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    # labels
    "CLASSES": "labels",
    "PALETTE": "labels",
    "NUM_CLASSES": "labels",
    "IGNORE_INDEX": "labels",
    "THING_CLASSES": "labels",
    "label_to_train_id": "labels",
    "train_id_to_label_id": "labels",
    "colorize": "labels",
    # layouts
    "Sample": "layouts",
    "DatasetLayoutError": "layouts",
    "MissingLabelsError": "layouts",
    "ACDC_CONDITIONS": "layouts",
    "scan_cityscapes": "layouts",
    "scan_acdc": "layouts",
    # pipelines / datasets
    "TrainPipeline": "pipelines",
    "TestPipeline": "pipelines",
    "IMG_NORM_CFG": "pipelines",
    "SegmentationDataset": "dataset",
    "cityscapes_dataset": "dataset",
    "acdc_dataset": "dataset",
    # the digest of a dataset's file list
    "file_list_digest": "fingerprint",
    # rare-class sampling
    "RareClassSampler": "rcs",
    "draw_rare_class_sample": "rcs",
    "load_or_compute_class_counts": "rcs",
    # synthetic data
    "EmbeddedDataset": "synthetic",
    "SyntheticConfig": "synthetic",
    "ensure_embedded": "synthetic",
    # which roots the project may write (embedded) and which it only reads
    "EMBEDDED_ROOT": "paths",
    "prepare_roots": "roots",
    "classify_root": "roots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
