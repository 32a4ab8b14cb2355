"""The registry's exceptions: what a user named is not in the store, or not usable."""

from __future__ import annotations

from uda.errors import UserError

__all__ = ["RegistryError", "ModelNotFoundError", "UnknownModelError"]


class RegistryError(UserError):
    """A registered model, version or alias that does not exist or is not
    usable; the message lists what exists."""


class ModelNotFoundError(RegistryError, FileNotFoundError):
    """A model reference that names no file, folder, model or run (still a
    ``FileNotFoundError`` for callers that catch that for paths)."""


class UnknownModelError(ModelNotFoundError):
    """No registered model by that name (the message lists those that
    exist); callers add what to run first."""
