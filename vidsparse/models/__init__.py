"""The embedded tiny video diffusion model and the rectified-flow conventions.

* :mod:`vidsparse.models.tiny_wan`: build / load the tiny diffusers ``WanTransformer3DModel``.
* :mod:`vidsparse.models.flow`: ``x_t = (1 - t) x0 + t noise``, velocity ``noise - x0``,
  ``timestep = 1000 t``, and an Euler sampler with classifier-free guidance.

Importing this package does not import diffusers; the model functions do on first call.
"""

from . import flow, tiny_wan
from .flow import *  # noqa: F403 - public names are listed once, in each module's __all__
from .tiny_wan import *  # noqa: F403

__all__ = [*flow.__all__, *tiny_wan.__all__]
