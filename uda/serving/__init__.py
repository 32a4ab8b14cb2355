"""The segmentor as an MLflow pyfunc model (being split into modules)."""

from .request import *  # noqa: F401,F403
from .request import __all__  # noqa: F401
