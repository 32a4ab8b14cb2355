"""Checkpoints as registered MLflow model versions.

A checkpoint is logged once, as the ``checkpoint`` artifact of a pyfunc
model (:func:`uda.serving.log_segmentor`). The registered version points at
that logged model: registering copies no weights, so every checkpoint is
stored exactly once. The training loop's resume state (optimizer,
schedulers) is a separate file that is not logged here.

Typical use, inside a run::

    version = log_and_register('work/iter_4000.pth', 'cs2acdc-student',
                               iteration=4000, metrics={'val_mIoU': 61.2})
    # -> version N of 'cs2acdc-student', alias 'iter-4000', tags
    #    iteration/run_id/kind/preset/val_mIoU; calling it again after a
    #    resume returns the same version.
    set_alias_safely('cs2acdc-student', 'serving', version.version)
    model, model_cfg = load_segmentor('models:/cs2acdc-student@iter-4000')

One concern per module: :mod:`~uda.registry.names` (names and their rules),
:mod:`~uda.registry.references` (every model URI form, checked),
:mod:`~uda.registry.versions` (look-ups and the store's paged searches),
:mod:`~uda.registry.artifacts` (a logged model's files),
:mod:`~uda.registry.registration` (log and register),
:mod:`~uda.registry.aliases` (moving aliases safely),
:mod:`~uda.registry.loading` (back to torch, and the load check).
"""

from .aliases import set_alias, set_alias_safely
from .artifacts import download_checkpoint, version_metadata
from .errors import ModelNotFoundError, RegistryError, UnknownModelError
from .loading import load_segmentor, verify_loadable
from .names import (
    DEFAULT_TEACHER_URI,
    KINDS,
    ROLE_MODEL_NAMES,
    SOURCE_ONLY_MODEL_NAME,
    STUDENT_MODEL_NAME,
    TEACHER_MODEL_NAME,
    iteration_alias,
    validate_alias,
    validate_model_name,
)
from .references import MODEL_URI_FORMS, ModelReference, check_model_uri
from .registration import discard_unfinished_models, log_and_register, register_checkpoint
from .versions import (
    find_versions,
    get_registered_model,
    iteration_of,
    logged_model_id,
    resolve_alias,
    run_versions,
    source_run_id,
    version_model_id,
)

__all__ = [
    "RegistryError",
    "version_model_id",
    "logged_model_id",
    "TEACHER_MODEL_NAME",
    "STUDENT_MODEL_NAME",
    "SOURCE_ONLY_MODEL_NAME",
    "KINDS",
    "register_checkpoint",
    "log_and_register",
    "discard_unfinished_models",
    "resolve_alias",
    "verify_loadable",
    "set_alias",
    "set_alias_safely",
    "load_segmentor",
    "iteration_alias",
    "MODEL_URI_FORMS",
    "ModelNotFoundError",
    "UnknownModelError",
    "ModelReference",
    "validate_model_name",
    "validate_alias",
    "check_model_uri",
    "get_registered_model",
    "find_versions",
    "source_run_id",
    "iteration_of",
    "run_versions",
    "ROLE_MODEL_NAMES",
    "DEFAULT_TEACHER_URI",
    "version_metadata",
    "download_checkpoint",
]
