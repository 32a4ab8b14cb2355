"""Checkpoints as registered MLflow model versions (being split into modules)."""

from .references import *  # noqa: F401,F403
from .references import __all__  # noqa: F401
