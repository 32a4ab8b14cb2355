"""What registered models, aliases and version kinds are called: the project's
registered model names (one owner), the ``iter-<N>`` alias, and MLflow's rules
for names and aliases, checked by every entry point before any work."""

from __future__ import annotations

import re
from typing import Any

from mlflow.exceptions import MlflowException

from .errors import RegistryError

__all__ = [
    "TEACHER_MODEL_NAME",
    "STUDENT_MODEL_NAME",
    "SOURCE_ONLY_MODEL_NAME",
    "KINDS",
    "iteration_alias",
    "validate_model_name",
    "validate_alias",
    "check_name",
    "check_kind",
    "ROLE_MODEL_NAMES",
    "DEFAULT_TEACHER_URI",
]

#: The registered models a training run (or an import of that role)
#: registers into, unless ``-P model_name`` says otherwise.
TEACHER_MODEL_NAME = "cs2acdc-teacher"
STUDENT_MODEL_NAME = "cs2acdc-student"
#: The baseline main trains beside the teacher: the teacher's architecture on the source only.
SOURCE_ONLY_MODEL_NAME = "cs2acdc-source-only"
#: Where each role's versions go by default (``teacher`` / ``distill`` training, ``import``).
ROLE_MODEL_NAMES = {"teacher": TEACHER_MODEL_NAME, "student": STUDENT_MODEL_NAME}
#: The teacher a distillation (and a soup scored by teacher agreement) uses by default.
DEFAULT_TEACHER_URI = f"models:/{TEACHER_MODEL_NAME}/latest"
#: What a registered version holds (its ``kind`` tag).
KINDS = ("checkpoint", "soup", "import")
_MAX_NAME_LENGTH = 256  # the name column of MLflow's SQL registry
_MAX_ALIAS_LENGTH = 255  # MLflow's MAX_REGISTERED_MODEL_ALIAS_LENGTH
_ALIAS_PATTERN = re.compile(r"^[\w\-]+$")  # MLflow's alias rule


def iteration_alias(iteration: int) -> str:
    """The alias naming a checkpoint's iteration: ``iter-<N>``."""
    return f"iter-{int(iteration)}"


def check_name(name: str) -> None:
    """The library's own guard on a registered model name (entry points check
    earlier, with their parameter's name: :func:`validate_model_name`).

    Raises:
        RegistryError: Not a string, invalid, or with surrounding spaces.
    """
    if not isinstance(name, str):
        raise RegistryError(f"Registered model name {name!r} is not a string.")
    if validate_model_name(name, "Registered model name") != name:
        raise RegistryError(f"Registered model name {name!r} has surrounding spaces; pass {name.strip()!r}.")


def check_kind(kind: str) -> None:
    """``kind`` is one of :data:`KINDS` (a programming error otherwise).

    Raises:
        ValueError: Another kind.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")


def _name_problem(name: str) -> str | None:
    """Why MLflow (or this project) refuses ``name``, or None."""
    if "/" in name or ":" in name:
        return "MLflow does not allow '/' or ':' in names"
    if "'" in name:
        return "a single quote cannot be used in registry searches"
    if "%" in name:
        return "MLflow's file-based registry does not allow '%'"
    if name == "." or name.startswith(".."):
        return "MLflow refuses names that read as a relative path ('.', '..')"
    if len(name) > _MAX_NAME_LENGTH:
        return f"it has {len(name)} characters, the registry stores at most {_MAX_NAME_LENGTH}"
    try:  # MLflow's own rule, in case a newer version adds to it
        from mlflow.utils.validation import _validate_model_name
    except ImportError:  # pragma: no cover
        return None
    try:
        _validate_model_name(name)
    except MlflowException as err:
        return err.message.rstrip(".")
    return None


def validate_model_name(name: Any, parameter: str = "model_name") -> str:
    """A registered model name, checked by MLflow's rules before any work.

    MLflow refuses names with ``/`` or ``:`` (and ``%`` in its file store,
    ``.`` / ``..`` path names); this project also refuses a single quote
    (registry search strings quote names with it).

    Args:
        name: The name as given (surrounding spaces are removed).
        parameter: How the message calls it (``model_name``).

    Returns:
        The stripped name.

    Raises:
        RegistryError: Empty or invalid; the message says why and suggests
            a valid name.
    """
    text = "" if name is None else str(name).strip()
    if not text:
        raise RegistryError(f"{parameter} is empty; pass a registered model name such as cs2acdc-student.")
    problem = _name_problem(text)
    if problem is not None:
        shown = text if len(text) <= 80 else text[:60] + "…"
        fixed = re.sub(r"[/:'%]+", "-", text).strip(".-")
        fix = (
            f"use e.g. {fixed!r}"
            if fixed and len(fixed) <= 80
            else "use a shorter name such as cs2acdc-student"
        )
        raise RegistryError(f"{parameter} {shown!r} is not a valid registered model name: {problem}; {fix}.")
    return text


def validate_alias(alias: Any, parameter: str = "alias") -> str:
    """An alias name, checked by MLflow's rule (letters, digits, ``_``,
    ``-``; at most 255 characters).

    Returns:
        The stripped alias.

    Raises:
        RegistryError: Empty or invalid (says why, gives an example).
    """
    text = "" if alias is None else str(alias).strip()
    if not text:
        raise RegistryError(f"{parameter} is empty; pass an alias such as iter-4000 or serving.")
    if not _ALIAS_PATTERN.match(text) or len(text) > _MAX_ALIAS_LENGTH:
        raise RegistryError(
            f"{parameter} {text!r} is not a valid alias: MLflow aliases "
            f'have only letters, digits, "_" and "-" (at most '
            f"{_MAX_ALIAS_LENGTH}), e.g. iter-4000 or serving."
        )
    if text.lower() == "latest" or re.fullmatch(r"[vV]\d+", text):
        # MLflow reserves these: models:/NAME/latest and version references.
        raise RegistryError(
            f"{parameter} {text!r} is not a valid alias: MLflow reserves "
            f'"latest" and v<number>; use e.g. iter-4000 or serving.'
        )
    return text
