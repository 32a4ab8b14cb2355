"""Where a backbone's ImageNet weights live (``<role>.model.pretrained``).

The full recipe names the original's files under ``pretrained/`` (its README
links NVlabs' ``fan_hybrid_large_in22k_1k.pth.tar`` as
``pretrained/fan_large_16_p4_hybrid.pth.tar``; MIC's teacher starts from
SegFormer's ``pretrained/mit_b5.pth``). Nothing is downloaded: a missing file
is one error that says which file to put where, and ``pretrained: null``
trains from scratch on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

from uda.data.paths import PROJECT_DIR
from uda.errors import UserError

__all__ = ["PretrainedWeightsMissing", "expected_file", "resolve_pretrained"]

# Published ImageNet files per backbone: (file name, who publishes it).
_NVLABS = "NVlabs FAN (ImageNet-22k, fine-tuned on 1k)"
_SEGFORMER = "SegFormer (ImageNet-1k)"
_PUBLISHED = {
    "fan_tiny_8_p4_hybrid": ("fan_hybrid_tiny.pth.tar", "NVlabs FAN"),
    "fan_small_12_p4_hybrid": ("fan_hybrid_small.pth.tar", "NVlabs FAN"),
    "fan_base_16_p4_hybrid": ("fan_hybrid_base_in22k_1k.pth.tar", _NVLABS),
    "fan_large_16_p4_hybrid": ("fan_hybrid_large_in22k_1k.pth.tar", _NVLABS),
    **{f"mit_b{i}": (f"mit_b{i}.pth", _SEGFORMER) for i in range(6)},
}


class PretrainedWeightsMissing(UserError, FileNotFoundError):
    """The ImageNet weights a preset names are not where it says."""


def expected_file(backbone: str) -> tuple[str, str] | None:
    """``(published file name, publisher)`` of a backbone's ImageNet
    weights, or None for the project's own tiny backbones."""
    return _PUBLISHED.get(backbone)


def _candidates(path: Path) -> list[Path]:
    """Where a ``pretrained`` path may be: the working folder, then the
    project (none when the package is installed without it)."""
    if path.is_absolute():
        return [path]
    found = [Path.cwd() / path]
    if PROJECT_DIR is not None and (PROJECT_DIR / path) not in found:
        found.append(PROJECT_DIR / path)
    return found


def resolve_pretrained(path: str | None, backbone: str, key: str = "model.pretrained") -> str | None:
    """The existing file ``path`` names, absolute; None stays None.

    A relative path is looked up in the current folder, then in the project.

    Args:
        path: The ``pretrained`` value of a model section.
        backbone: Its ``backbone`` (names the file to download).
        key: The config key, for the message (``student.model.pretrained``).

    Raises:
        PretrainedWeightsMissing: No such file; the message says which
            file to put there, and how to train from scratch instead.
    """
    if path is None:
        return None
    given = Path(os.path.expanduser(str(path)))
    candidates = _candidates(given)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    target = candidates[-1]
    published = expected_file(backbone)
    if published is None:
        what = f"ImageNet weights for {backbone}"
        how = f"Put them at {target}"
    else:
        name, who = published
        what = f"{who} weights {name}"
        how = (
            f"Download {name} and put it there, e.g. mkdir -p "
            f"{target.parent} && ln -s /path/to/{name} {target}"
        )
    looked = " or ".join(str(c) for c in candidates)
    raise PretrainedWeightsMissing(
        f"{key} is {str(path)!r}, but no such file exists (looked for "
        f"{looked}). The recipe starts {backbone} from the {what}. {how}; "
        f'or set {key}=null (-P cfg_options="{key}=null") to train from '
        f"scratch."
    )
