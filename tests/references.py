"""The reference implementations the parity tests compare against (mmseg, mmcv,
cityscapesscripts).

Outside CI a missing one skips the test, as ``pytest.importorskip`` does; under
``CI=true`` it fails the test instead, so a faithfulness check can never
disappear from CI because an install went wrong.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def reference(module: str) -> ModuleType:
    """Import ``module``, a reference implementation the test needs."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        try:
            return importlib.import_module(module)
        except ImportError as err:
            pytest.fail(
                f"CI=true: the reference {module} cannot be imported ({err}); "
                "the parity test would silently skip.",
                pytrace=False,
            )
    return pytest.importorskip(module)
