"""The Turbo schedule and sampler under names that core KSampler-style nodes take.

KSampler, KSamplerAdvanced, BasicScheduler and KSamplerSelect (and nodes of other packs built the same
way: FaceDetailer, UltimateSDUpscale, Efficiency Nodes) choose a scheduler and a sampler by name from
``comfy.samplers``' lists. This adds, in both ComfyUI 0.3.75 and 0.33:

* scheduler ``turbo_trailing``: diffusers' trailing timesteps for any step count, from the model's own
  sigma table (``SCHEDULER_HANDLERS`` / ``SCHEDULER_NAMES``). With ``denoise`` < 1 ComfyUI's own rule
  applies: it builds ``int(steps / denoise)`` steps and runs the last ``steps``.
* samplers ``turbo_euler`` (eta 0, sd-turbo's) and ``turbo_euler_ancestral`` (eta 1, sdxl-turbo's):
  ``samplers.sample_turbo_euler`` as ``comfy.k_diffusion.sampling.sample_<name>``, which
  ``comfy.samplers.ksampler`` looks up, listed in ``KSAMPLER_NAMES`` / ``SAMPLER_NAMES``. Use cfg 1.0:
  ComfyUI then skips the negative, one UNet call per step.

Registering twice adds nothing: the lists are extended in place (the core nodes hold these very lists)
and only with names not there yet.
"""
from __future__ import annotations

import functools

import comfy.k_diffusion.sampling as k_diffusion_sampling
import comfy.samplers

from ..samplers import sample_turbo_euler, turbo_sigmas

SCHEDULER = "turbo_trailing"
SAMPLERS = {"turbo_euler": 0.0, "turbo_euler_ancestral": 1.0}


def turbo_trailing_scheduler(model_sampling, steps: int):
    """A ``SchedulerHandler`` with ``use_ms``: (model_sampling, steps) -> sigmas ending in 0."""
    return turbo_sigmas(model_sampling.sigma, int(steps))


def _append_once(names: list, name: str) -> None:
    if name not in names:
        names.append(name)


def register() -> None:
    comfy.samplers.SCHEDULER_HANDLERS.setdefault(
        SCHEDULER, comfy.samplers.SchedulerHandler(turbo_trailing_scheduler, use_ms=True))
    _append_once(comfy.samplers.SCHEDULER_NAMES, SCHEDULER)
    for name, eta in SAMPLERS.items():
        attribute = f"sample_{name}"
        if not hasattr(k_diffusion_sampling, attribute):
            sampler = functools.partial(sample_turbo_euler, eta=eta)
            functools.update_wrapper(sampler, sample_turbo_euler)
            setattr(k_diffusion_sampling, attribute, sampler)
        _append_once(comfy.samplers.KSAMPLER_NAMES, name)
        _append_once(comfy.samplers.SAMPLER_NAMES, name)
