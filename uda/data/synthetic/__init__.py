"""The seeded synthetic Cityscapes→ACDC dataset (see :mod:`.street` for now)."""

from .street import (
    GENERATOR_VERSION,
    STAMP_FILE,
    EmbeddedDataset,
    NotGeneratedError,
    SyntheticConfig,
    clean_embedded,
    ensure_embedded,
    generate,
    is_generated,
    main,
    render_scene,
)

__all__ = [
    "GENERATOR_VERSION",
    "STAMP_FILE",
    "EmbeddedDataset",
    "NotGeneratedError",
    "SyntheticConfig",
    "clean_embedded",
    "ensure_embedded",
    "generate",
    "is_generated",
    "main",
    "render_scene",
]
