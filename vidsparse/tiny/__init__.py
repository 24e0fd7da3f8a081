"""The tiny-model harness: vidsparse's demo, quality yardstick and test bed, apart from the library.

* :mod:`.model`: build / load the embedded tiny diffusers ``WanTransformer3DModel`` (assets/tiny_wan).
* :mod:`.flow`: the Euler sampler with classifier-free guidance (training maths: vidsparse.training.flow).
* :mod:`.data`: procedural, seeded "moving shapes" videos with attribute-token conditions;
  :class:`.source.ShapesSource` is their DataSource for :mod:`vidsparse.training.distill`.
* :mod:`.classifier`: the shape classifier that judges samples.
* :mod:`.pretrain`, :mod:`.ablation`: training recipes; :mod:`.demo`, :mod:`.evaluate`: ``vidsparse demo`` / ``eval``.

The library core never imports this package (tests/test_layering.py checks). Importing it does
not import diffusers; the model functions do on first call.
"""

from . import data, flow, model
from .data import *  # noqa: F403 - public names are listed once, in each module's __all__
from .flow import *  # noqa: F403
from .model import *  # noqa: F403

__all__ = [*data.__all__, *flow.__all__, *model.__all__]
