"""Pure-torch sampling math for SD-Turbo / SDXL-Turbo. Imports nothing from ComfyUI."""
from .schedule import (
    NUM_TRAIN_TIMESTEPS,
    SPACINGS,
    STRENGTH_MODES,
    TurboScheduleError,
    effective_steps,
    exact_timesteps,
    scaled_linear_sigmas,
    stability_timesteps,
    trailing_timesteps,
    turbo_sigmas,
    turbo_timesteps,
)
from .euler import (
    NOISE_SCALES,
    ancestral_step,
    sample_turbo_euler,
    seeded_noise_sampler,
)

__all__ = [
    "NUM_TRAIN_TIMESTEPS", "SPACINGS", "STRENGTH_MODES", "TurboScheduleError", "effective_steps", "exact_timesteps",
    "scaled_linear_sigmas", "stability_timesteps", "trailing_timesteps", "turbo_sigmas",
    "turbo_timesteps", "NOISE_SCALES", "ancestral_step",
    "sample_turbo_euler", "seeded_noise_sampler",
]
