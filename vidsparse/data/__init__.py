"""Synthetic data: procedural, seeded "moving shapes" videos with attribute-token conditions.

See :mod:`vidsparse.data.shapes`. Only torch is imported.
"""

from . import shapes
from .shapes import *  # noqa: F403 - the public names are listed once, in shapes.__all__

__all__ = list(shapes.__all__)
