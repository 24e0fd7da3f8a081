"""Synthetic data: procedural, seeded "moving shapes" videos with attribute-token conditions.

See :mod:`vidsparse.data.shapes`. Only torch is imported.
"""

from .shapes import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    SPLIT_VOCAB,
    SPLITS,
    Conditions,
    ShapesConfig,
    conditions_from_text,
    describe,
    embed,
    make_batch,
    render,
    sample_conditions,
)

__all__ = [
    "ShapesConfig",
    "Conditions",
    "SHAPES",
    "COLOURS",
    "MOTIONS",
    "BACKGROUNDS",
    "SPLITS",
    "SPLIT_VOCAB",
    "sample_conditions",
    "render",
    "embed",
    "describe",
    "conditions_from_text",
    "make_batch",
]
