"""Entry-point scripts loaded as modules, so that tests call their ``main`` in-process."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def load_entry_module(name: str) -> ModuleType:
    """``entrypoints/<name>.py`` as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"entry_{name}", PROJECT_ROOT / "entrypoints" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
