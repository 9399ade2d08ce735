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

* the few-step families (``samplers/families.py``; ``nodes/families.py`` for the SamplerCustom route):
  core KSampler's scheduler functions get only (model_sampling, steps), so each family has a scheduler
  name of its own, ``turbo_<family>`` (``-`` and ``.`` as ``_``: ``turbo_dmd2``, ``turbo_sdxl_lightning``),
  giving that family's sigmas from the model's table at strength 1; steps outside the family's range
  stop with its message. The samplers ``turbo_lcm``, ``turbo_tcd`` (gamma 0.3, the TCD card's) and
  ``turbo_ddim`` run ``nodes.families.sample_turbo_family``, one model call per step, text-to-image
  from unit noise (``family_recipes()`` says which pair each family takes).

Registering twice adds nothing: the lists are extended in place (the core nodes hold these very lists)
and only with names not there yet.
"""
from __future__ import annotations

import functools

import comfy.k_diffusion.sampling as k_diffusion_sampling
import comfy.samplers

from ..samplers import families as fam
from ..samplers import sample_turbo_euler, turbo_sigmas
from .errors import TurboError

SCHEDULER = "turbo_trailing"
SAMPLERS = {"turbo_euler": 0.0, "turbo_euler_ancestral": 1.0}
FAMILY_SAMPLER_NAMES = {"turbo_lcm": {"sampler": "lcm"}, "turbo_tcd": {"sampler": "tcd", "gamma": 0.3},
                        "turbo_ddim": {"sampler": "ddim"}}
# The reference sampler step -> the KSampler sampler name that runs it.
_SAMPLER_OF_KIND = {"euler": "turbo_euler", "euler_ancestral": "turbo_euler_ancestral", "lcm": "turbo_lcm",
                    "tcd": "turbo_tcd", "ddim": "turbo_ddim"}


def family_scheduler_name(family: str) -> str:
    return "turbo_" + family.replace("-", "_").replace(".", "_")


def _family_names() -> tuple:
    from .families import NODE_FAMILIES
    return tuple(n for n in NODE_FAMILIES if n not in ("sd-turbo", "sdxl-turbo"))   # those: turbo_trailing


def family_recipes() -> dict:
    """family -> (scheduler name, sampler name) for core KSampler (sdxl-lightning 1-step also needs
    ModelSamplingDiscrete x0; hyper-sd-unified's reference gamma is 1.0, turbo_tcd's 0.3)."""
    recipes = {}
    for family in _family_names():
        kind = fam.family_schedule(family, fam.FAMILIES[family].steps[-1]).sampler
        recipes[family] = (family_scheduler_name(family), _SAMPLER_OF_KIND[kind])
    return recipes


def family_scheduler(family: str, model_sampling, steps: int):
    """A ``SchedulerHandler`` with ``use_ms`` for one family: its sigmas from the model's table (flow
    families: computed, as their pipelines do)."""
    import comfy.model_sampling

    from .families import FLOW_FAMILIES
    is_flow = isinstance(model_sampling, comfy.model_sampling.CONST)
    flow_family = family in FLOW_FAMILIES
    if is_flow != flow_family:
        raise TurboError(
            f"The scheduler {family_scheduler_name(family)} ({family}) samples on "
            f"{'flow' if flow_family else 'the discrete (epsilon) schedule'}, but this model's model_sampling is "
            f"{'flow' if is_flow else 'not flow'} ({type(model_sampling).__name__}): pick the family of this model.")
    try:
        return fam.family_schedule(family, int(steps), sigma_of_timestep=model_sampling.sigma).sigmas
    except fam.FamilyError as e:
        raise TurboError(f"{e} (KSampler scheduler {family_scheduler_name(family)}; with denoise < 1 KSampler asks "
                         f"for int(steps / denoise) steps: use Turbo Family Schedule's strength instead)") from None


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
    from .families import sample_turbo_family
    for family in _family_names():
        name = family_scheduler_name(family)
        comfy.samplers.SCHEDULER_HANDLERS.setdefault(
            name, comfy.samplers.SchedulerHandler(functools.partial(family_scheduler, family), use_ms=True))
        _append_once(comfy.samplers.SCHEDULER_NAMES, name)
    for name, options in FAMILY_SAMPLER_NAMES.items():
        attribute = f"sample_{name}"
        if not hasattr(k_diffusion_sampling, attribute):
            sampler = functools.partial(sample_turbo_family, **options)
            functools.update_wrapper(sampler, sample_turbo_family)
            setattr(k_diffusion_sampling, attribute, sampler)
        _append_once(comfy.samplers.KSAMPLER_NAMES, name)
        _append_once(comfy.samplers.SAMPLER_NAMES, name)
