"""What the synthetic generator writes (:class:`SyntheticConfig`) and where it put it (:class:`EmbeddedDataset`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..layouts import ACDC_CONDITIONS


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Sizes are (width, height) as mmcv's ``img_scale``.

    Args:
        seed: Master seed; every image has its own stream derived from it,
            its domain, split, condition and index.
        num_source_train: Cityscapes-layout train images.
        num_source_val: Cityscapes-layout val images.
        num_target_train: ACDC train images per condition.
        num_target_val: ACDC val images per condition.
        num_target_test: ACDC test images per condition.
        source_size: Source resolution (Cityscapes is 2048x1024, 2:1).
        target_size: Target resolution (ACDC is 1920x1080, 16:9).
        conditions: ACDC conditions to generate.
    """

    seed: int = 0
    num_source_train: int = 48
    num_source_val: int = 16
    num_target_train: int = 12
    num_target_val: int = 4
    num_target_test: int = 4
    source_size: tuple[int, int] = (256, 128)
    target_size: tuple[int, int] = (256, 144)
    conditions: tuple[str, ...] = ACDC_CONDITIONS

    def __post_init__(self) -> None:
        # Normalise lists (from json/CLI) to tuples so that configs compare.
        object.__setattr__(self, "source_size", tuple(self.source_size))
        object.__setattr__(self, "target_size", tuple(self.target_size))
        object.__setattr__(self, "conditions", tuple(self.conditions))
        for name in (
            "num_source_train",
            "num_source_val",
            "num_target_train",
            "num_target_val",
            "num_target_test",
        ):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("source_size", "target_size"):
            size = getattr(self, name)
            if len(size) != 2 or min(size) < 32:
                raise ValueError(f"{name} must be (width, height) >= 32 px, got {size}")
        bad = [c for c in self.conditions if c not in ACDC_CONDITIONS]
        if bad or not self.conditions:
            raise ValueError(
                f"conditions must be a non-empty subset of {list(ACDC_CONDITIONS)}, got {self.conditions}"
            )

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class EmbeddedDataset:
    """Where :func:`~uda.data.synthetic.embedded.ensure_embedded` put the two datasets."""

    cityscapes_root: Path
    acdc_root: Path
    config: SyntheticConfig
