"""A small, seeded synthetic Cityscapes→ACDC dataset in the real folder layouts.

It lets every entry point run on a laptop CPU with the same readers and code
as the real data. Scenes are rendered from a simple 3-D street model (flat
ground seen by a pinhole camera, building facades along the road, billboard
objects), so geometry follows perspective: objects are bigger lower in the
image, facade windows converge to the vanishing point, and a depth map comes
for free. All 19 Cityscapes classes appear, rare ones rarely.

- Source (Cityscapes layout, ``leftImg8bit`` + ``gtFine``): clear weather,
  a few "cities", 2:1 images with an ignored ego-vehicle hood at the bottom.
- Target (ACDC layout, ``rgb_anon`` + ``gt``, conditions fog/night/rain/snow,
  sequences): *different* scenes (more vegetation, other facade colours,
  wider 16:9 camera) rendered with the condition's appearance.
  ``gt`` is written for train and val like the real ACDC (the UDA readers
  never hand out train labels); test has none.

Ownership: every dataset folder it writes carries a marker
(:data:`~uda.data.paths.GENERATED_MARKER`), and it replaces or removes no
folder without one. Entry points only ever point it at the project's own
:data:`~uda.data.paths.EMBEDDED_ROOT` (see :mod:`uda.data.roots`).

Modules, one concern each:

- the scene: :mod:`.camera`, :mod:`.canvas`, :mod:`.imaging`, :mod:`.palette`,
  :mod:`.objects`, :mod:`.street` (composition), :mod:`.conditions` (the
  appearance of each condition), :mod:`.render` (one scene from its seed);
- the datasets on disk: :mod:`.config` (what to generate), :mod:`.writer`
  (the layouts and file names), :mod:`.ownership` (which folders are the
  generator's, ``--clean``), :mod:`.stamp`, :mod:`.embedded` (generate once,
  reuse), :mod:`.cli` (``python -m uda.data.synthetic``).
"""

from .cli import main
from .config import EmbeddedDataset, SyntheticConfig
from .embedded import ensure_embedded
from .ownership import NotGeneratedError, clean_embedded, is_generated
from .render import render_scene
from .stamp import GENERATOR_VERSION
from .writer import generate

__all__ = [
    "GENERATOR_VERSION",
    "NotGeneratedError",
    "SyntheticConfig",
    "EmbeddedDataset",
    "generate",
    "ensure_embedded",
    "clean_embedded",
    "is_generated",
    "render_scene",
    "main",
]
