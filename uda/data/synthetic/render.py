"""One scene rendered from its seed: the street drawn, then seen in its condition, as 8-bit RGB and trainIds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..labels import IGNORE_INDEX
from .conditions import CONDITION_RENDERERS, daylight
from .street import SceneBuilder, ego_hood


def render_scene(
    seed_key: Sequence[int], width: int, height: int, condition: str = "clear", force_class: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Renders one scene: an RGB image and its trainId label map.

    Args:
        seed_key: Integers seeding this scene (e.g. ``(seed, domain, split, i)``).
        width: Image width.
        height: Image height.
        condition: 'clear' (Cityscapes-like source scene, with an ignored ego
            hood) or an ACDC condition (ACDC-like scene in that condition).
        force_class: A trainId the scene must contain (used to guarantee that
            every class occurs in a split).

    Returns:
        ``(rgb uint8 (H, W, 3), train_ids uint8 (H, W))``.
    """
    if condition != "clear" and condition not in CONDITION_RENDERERS:
        raise ValueError(
            f"condition must be 'clear' or one of {list(CONDITION_RENDERERS)}, got {condition!r}"
        )
    rng = np.random.default_rng(np.random.SeedSequence(list(seed_key)))
    domain = "cityscapes" if condition == "clear" else "acdc"
    builder = SceneBuilder(rng, width, height, domain, force_class)
    canvas = builder.build()
    label = canvas.label.copy()
    if condition == "clear":
        hood = ego_hood(builder.cam, rng)
        label[hood] = IGNORE_INDEX
        img = daylight(canvas, rng, hood)
    else:
        img = CONDITION_RENDERERS[condition](canvas, rng, builder.cam)
    # Mild gamma so that the dark end is not crushed, then 8-bit.
    img = np.clip(img, 0, 1) ** (1 / 1.1)
    rgb = np.round(img * 255).astype(np.uint8)
    return rgb, label
