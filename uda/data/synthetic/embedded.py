"""The embedded default: generated once under ``data/embedded``, reused while
the generator version and the parameters match, replaced atomically otherwise."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from ..paths import EMBEDDED_ROOT, GENERATED_MARKER
from .config import EmbeddedDataset, SyntheticConfig
from .ownership import check_replaceable, is_generated
from .stamp import STAMP_FILE, exclusive, read_stamp, stamp_of
from .writer import generate


def ensure_embedded(
    root: os.PathLike = EMBEDDED_ROOT, progress: bool = False, force: bool = False, **params
) -> EmbeddedDataset:
    """Returns the embedded synthetic dataset, generating it if needed.

    The datasets live in ``<root>/cityscapes`` and ``<root>/acdc``; a stamp
    file ``<root>/embedded.json`` records the generator version and the
    parameters. With the same version and parameters the existing copy is
    reused; otherwise it is regenerated into a temporary folder and moved in
    place, the stamp written last, so an interrupted run never leaves a
    half-written dataset that looks complete.

    Args:
        root: Folder for the embedded data (default: the project's own
            ``data/embedded``). Its ``cityscapes``/``acdc`` folders are only
            ever replaced when this generator wrote them.
        progress: Show a progress bar while generating.
        force: Regenerate even when an up-to-date copy exists.
        **params: :class:`SyntheticConfig` fields (seed, sizes, counts ...).

    Returns:
        The dataset roots and the config used.

    Raises:
        TypeError: for an unknown parameter name.
        NotGeneratedError: if a dataset folder under ``root`` holds data that
            this generator did not write; nothing is changed then.
    """
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise TypeError(f"Unknown synthetic dataset parameter(s) {unknown}; valid: {sorted(fields)}")
    config = SyntheticConfig(**params)
    root = Path(root)
    result = EmbeddedDataset(root / "cityscapes", root / "acdc", config)
    # Before the lock file is written: a foreign root is refused untouched.
    for folder in (result.cityscapes_root, result.acdc_root):
        check_replaceable(folder)
    with exclusive(root / ".lock"):
        stamp = read_stamp(root) or {}
        if (
            not force
            and {k: stamp.get(k) for k in stamp_of(config)} == stamp_of(config)
            and is_generated(result.cityscapes_root)
            and is_generated(result.acdc_root)
        ):
            return result
        tmp = root / f".tmp-{uuid.uuid4().hex[:8]}"
        try:
            start = time.perf_counter()
            generate(tmp, config, progress=progress)
            # Again, just before replacing: files may have appeared meanwhile
            # (and a pre-marker copy is only known as ours by the stamp).
            for folder in (result.cityscapes_root, result.acdc_root):
                check_replaceable(folder)
            (root / STAMP_FILE).unlink(missing_ok=True)
            for name in ("cityscapes", "acdc"):
                # Keep the tracked README that lets MLflow `path` parameters
                # default to these folders before anything is generated.
                readme = root / name / "README.md"
                if readme.is_file():
                    shutil.copy2(readme, tmp / name / "README.md")
                if (root / name).exists():
                    old = root / f".old-{name}-{uuid.uuid4().hex[:8]}"
                    os.replace(root / name, old)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(tmp / name, root / name)
            stamp = dict(
                stamp_of(config), markers=GENERATED_MARKER, seconds=round(time.perf_counter() - start, 2)
            )
            with open(tmp / STAMP_FILE, "w") as f:
                json.dump(stamp, f, indent=2)
            os.replace(tmp / STAMP_FILE, root / STAMP_FILE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result
