"""Timestep and sigma schedules for SD-Turbo and SDXL-Turbo.

Reference: diffusers' model configs for stabilityai/sd-turbo and stabilityai/sdxl-turbo
(`scheduler/scheduler_config.json`): scaled_linear betas 0.00085-0.012 over 1000 steps,
epsilon prediction, ``timestep_spacing="trailing"``, ``steps_offset=1``.

* Trailing spacing (diffusers ``EulerDiscreteScheduler.set_timesteps``)::

      step_ratio = num_train_timesteps / N
      timesteps  = round(arange(num_train_timesteps, 0, -step_ratio)) - 1

  so N=4 gives 999, 749, 499, 249.
* img2img strength (diffusers ``StableDiffusion*Img2ImgPipeline.get_timesteps``) keeps the
  last ``min(int(N * strength), N)`` of those timesteps ("diffusers" strength mode). At 1-2 steps
  that quantizes strength (steps=2: 0.3 runs nothing, 0.5-0.99 all run t=499).
* "exact" strength mode: always N steps, trailing-spaced over the first ``round(T * strength)``
  timesteps, so the first one is the timestep strength selects: steps=2, strength=0.3 runs 299, 149.
  It equals "diffusers" at ``N / strength`` total steps whenever that is a whole number.
* "stability" spacing is the grid of Stability AI's own demo script and of ComfyUI's built-in
  ``SDTurboScheduler`` (comfy_extras/nodes_custom_sampler.py): 999, 899, ..., 99, entered at
  index ``10 - int(10 * denoise)`` and cut to N entries.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000
SPACINGS = ("trailing", "stability")
STRENGTH_MODES = ("diffusers", "exact")
_STABILITY_GRID = [999 - 100 * i for i in range(10)]  # 999, 899, ..., 99


class TurboScheduleError(ValueError):
    """A step count / strength pair that yields no usable schedule."""


def _check_steps(steps: int, num_train_timesteps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TurboScheduleError(f"steps must be an integer, got {steps!r}.")
    if not 1 <= steps <= num_train_timesteps:
        raise TurboScheduleError(
            f"steps={steps} is out of range: use 1 to 4 for Turbo models "
            f"(at most {num_train_timesteps}).")


def _check_strength(strength: float) -> None:
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
        raise TurboScheduleError(f"strength must be a finite number, got {strength!r}.")
    if not 0.0 < strength <= 1.0:
        raise TurboScheduleError(
            f"strength={strength} is out of range: use a value in (0, 1] "
            "(1.0 for text-to-image, e.g. 0.5 for image-to-image).")


def trailing_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """diffusers' trailing timesteps: ``round(arange(T, 0, -T/N)) - 1`` (round half to even, as numpy)."""
    _check_steps(steps, num_train_timesteps)
    step_ratio = num_train_timesteps / steps
    return [int(round(num_train_timesteps - i * step_ratio)) - 1 for i in range(steps)]


def exact_timesteps(steps: int, strength: float = 1.0) -> list[int]:
    """``steps`` timesteps from the one ``strength`` selects, ``T * strength - 1``, down in steps of
    ``T * strength / steps``: the tail of the trailing grid of ``steps / strength`` steps, whole or not.

    So where ``steps / strength`` is a whole number N this is diffusers' img2img schedule at N steps
    (``trailing_timesteps(N)`` cut to its last ``int(N * strength)``), and in between it moves smoothly:
    steps=2, strength=0.3 gives 299, 149.
    """
    _check_steps(steps, NUM_TRAIN_TIMESTEPS)
    _check_strength(strength)
    if NUM_TRAIN_TIMESTEPS * strength < steps:
        raise TurboScheduleError(
            f"strength={strength} leaves fewer than {steps} timesteps for {steps} steps. Raise strength to at "
            f"least {steps / NUM_TRAIN_TIMESTEPS:g}, or use fewer steps.")
    total = steps / strength
    if abs(total - round(total)) < 1e-6:        # a whole number of steps: the very arithmetic of the grid
        total = round(total)
    step_ratio = NUM_TRAIN_TIMESTEPS / total
    first = total - steps
    return [int(round(NUM_TRAIN_TIMESTEPS - (first + i) * step_ratio)) - 1 for i in range(steps)]


def effective_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` an img2img pass runs: ``min(int(steps * strength), steps)``.

    Raises TurboScheduleError when that is 0, instead of silently doing nothing.
    """
    _check_steps(steps, NUM_TRAIN_TIMESTEPS)
    _check_strength(strength)
    n = min(int(steps * strength), steps)
    if n < 1:
        need = math.ceil(1.0 / strength) if strength > 0 else steps
        raise TurboScheduleError(
            f"steps * strength = {steps} * {strength} = {steps * strength:g} < 1, so no step would run. "
            f"Raise strength to at least {1.0 / steps:g}, or steps to at least {need}.")
    return n


def stability_timesteps(steps: int, strength: float = 1.0) -> list[int]:
    """The 999, 899, ... grid of ComfyUI's built-in SDTurboScheduler, with its denoise rule.

    Matches that node exactly where it yields a schedule; where it would silently return an
    empty one (denoise < 0.1), this raises instead.
    """
    _check_steps(steps, len(_STABILITY_GRID))
    _check_strength(strength)
    start = len(_STABILITY_GRID) - int(len(_STABILITY_GRID) * strength)
    timesteps = _STABILITY_GRID[start:start + steps]
    if not timesteps:
        raise TurboScheduleError(
            f"strength={strength} is below 0.1, where the stability grid has no step left. "
            "Raise strength to at least 0.1, or use spacing='trailing'.")
    return timesteps


def turbo_timesteps(steps: int, strength: float = 1.0, spacing: str = "trailing",
                    strength_mode: str = "diffusers") -> list[int]:
    """The discrete timesteps a Turbo pass evaluates, highest first."""
    if strength_mode not in STRENGTH_MODES:
        raise TurboScheduleError(f"Unknown strength_mode {strength_mode!r}: use one of {', '.join(STRENGTH_MODES)}.")
    if spacing == "trailing":
        if strength_mode == "exact":
            return exact_timesteps(steps, strength)
        return trailing_timesteps(steps)[steps - effective_steps(steps, strength):]
    if spacing == "stability":
        if strength_mode == "exact":
            raise TurboScheduleError("strength_mode 'exact' needs spacing 'trailing'; 'stability' keeps the built-in "
                                     "SDTurboScheduler's own denoise rule.")
        return stability_timesteps(steps, strength)
    raise TurboScheduleError(f"Unknown spacing {spacing!r}: use one of {', '.join(SPACINGS)}.")


def turbo_sigmas(sigma_of_timestep: Callable[[torch.Tensor], torch.Tensor], steps: int,
                 strength: float = 1.0, spacing: str = "trailing", strength_mode: str = "diffusers") -> torch.Tensor:
    """Sigmas at ``turbo_timesteps(...)`` from a model's own sigma table, with a final 0 appended.

    ``sigma_of_timestep`` maps a float tensor of timesteps to sigmas (ComfyUI's
    ``model_sampling.sigma``, or ``scaled_linear_sigmas().__getitem__`` for integer steps).
    """
    timesteps = torch.tensor(turbo_timesteps(steps, strength, spacing, strength_mode), dtype=torch.float32)
    sigmas = sigma_of_timestep(timesteps).to(torch.float32).cpu()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def scaled_linear_sigmas(beta_start: float = 0.00085, beta_end: float = 0.012,
                         num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The Turbo models' sigma table: ``sqrt((1 - alphā_t) / alphā_t)`` for scaled_linear betas."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5

