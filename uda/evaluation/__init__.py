"""Evaluation of a segmentor on ACDC: mIoU on val, submission PNGs for test.

One module per step: :mod:`.inputs` (what may be asked, the dataset, the
model), :mod:`.prediction` (every image predicted at its original size, as
mmsegmentation 0.30 predicts it), :mod:`.scoring` (mIoU and friends, overall
and per condition), :mod:`.submission` (the test PNGs and their zip) and
:mod:`.report` (MLflow logging, the printed table). The figures and panels
are drawn by :mod:`uda.visualize`, the confusion-matrix maths is
:mod:`uda.metrics`.

The package needs torch, numpy and Pillow; matplotlib only for the figures,
mlflow only inside ``load_model`` and the ``log_*`` functions, so it is
usable without MLflow::

    from uda.evaluation import build_dataset, evaluate
    from uda.registry import load_segmentor

    model, _ = load_segmentor('models:/cs2acdc-student@serving', 'cuda')
    result = evaluate(model, build_dataset('data/acdc', 'val'), device='cuda')
    print(result.table.miou, result.table.per_condition_miou)
"""

from .inputs import (
    MODES,
    SPLITS,
    EvaluationError,
    build_dataset,
    check_mode,
    check_precision,
    check_split,
    load_model,
)
from .prediction import PredictedImage, predict_dataset
from .report import format_table, log_evaluation, log_submission
from .scoring import EvaluationResult, evaluate
from .submission import SubmissionResult, save_label_png, submission_filename, write_submission

__all__ = [
    "SPLITS",
    "MODES",
    "EvaluationError",
    "PredictedImage",
    "EvaluationResult",
    "SubmissionResult",
    "check_split",
    "check_mode",
    "check_precision",
    "build_dataset",
    "load_model",
    "predict_dataset",
    "evaluate",
    "submission_filename",
    "save_label_png",
    "write_submission",
    "format_table",
    "log_evaluation",
    "log_submission",
]
