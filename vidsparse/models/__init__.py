"""The embedded tiny video diffusion model and the rectified-flow conventions.

* :mod:`vidsparse.models.tiny_wan`: build / load the tiny diffusers ``WanTransformer3DModel``.
* :mod:`vidsparse.models.flow`: ``x_t = (1 - t) x0 + t noise``, velocity ``noise - x0``,
  ``timestep = 1000 t``, and an Euler sampler with classifier-free guidance.

Importing this package does not import diffusers; the model functions do on first call.
"""

from .flow import (
    NUM_TRAIN_TIMESTEPS,
    TIMESTEP_SAMPLING,
    model_timestep,
    noisy_sample,
    predict_velocity,
    sample,
    sample_timesteps,
    shift_time,
    time_grid,
    velocity_target,
)
from .tiny_wan import (
    PARAM_BUDGET_BYTES,
    SAMPLING_DEFAULTS,
    build_tiny_wan,
    count_parameters,
    default_weights_dir,
    describe_model,
    fp16_bytes,
    load_sampling_defaults,
    load_tiny_wan,
    tiny_wan_config,
    token_grid,
)

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "TIMESTEP_SAMPLING",
    "noisy_sample",
    "velocity_target",
    "model_timestep",
    "sample_timesteps",
    "shift_time",
    "time_grid",
    "predict_velocity",
    "sample",
    "PARAM_BUDGET_BYTES",
    "tiny_wan_config",
    "build_tiny_wan",
    "load_tiny_wan",
    "SAMPLING_DEFAULTS",
    "load_sampling_defaults",
    "default_weights_dir",
    "count_parameters",
    "fp16_bytes",
    "token_grid",
    "describe_model",
]
