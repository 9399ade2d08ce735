"""Few-step families where users sample: Turbo Family Schedule, and the sampler the KSampler names share.

``samplers/families.py`` holds each family's reference (timesteps, sigmas, sampler step, initial noise,
prediction). This module puts it into ComfyUI's machinery:

* :func:`family_model_schedule`: the family's :class:`~samplers.families.FamilySchedule` for a MODEL, its
  sigmas looked up in the model's own ``model_sampling`` table (flow families compute theirs), after
  :func:`check_family_model` refused a family on a model it was not made for.
* :func:`family_sampler`: a ``comfy.samplers.KSAMPLER`` for SamplerCustom(Advanced). Euler and flow
  families get :class:`~nodes.sampler.TurboKSAMPLER` (noise x sigma, the reference's ``init_noise_sigma``;
  on flow models ComfyUI's CONST noise scaling, ``sigma * noise + (1 - sigma) * latent``, is the
  reference's ``scale_noise``); LCM, TCD and DDIM families :func:`sample_turbo_family` (below).
* :func:`x0_model`: the MODEL patched to x0 prediction, as core ModelSamplingDiscrete ``x0`` does, for
  SDXL-Lightning 1-step.

The initial noise of the LCM / TCD / DDIM families ("unit" in ``samplers/families.py``): ComfyUI's
``KSAMPLER.sample`` scales the noise by ``sigmas[0]`` (by ``sqrt(1 + sigma²)`` only when ``sigmas[0]`` is
sigma_max) before the sampler function runs, so at DMD2's t=399 the model would see noise 24 % too small.
:func:`sample_turbo_family` therefore rebuilds its starting latent from the raw noise and the latent
ComfyUI hands its denoiser (``KSamplerX0Inpaint.noise`` / ``.latent_image``, set by ``KSAMPLER.sample``
in 0.3.75 and 0.33 alike): an all-zero latent is text-to-image and starts at ``noise * sqrt(1 + sigma0²)``,
where the model input is the unit noise itself; any other latent is image-to-image, ``latent + sigma0 *
noise`` (every diffusers scheduler's ``add_noise``). The same function behind the KSampler names does the
same, so core KSampler, SamplerCustom and this node agree.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_sampling
import comfy.samplers
from comfy_api.latest import io

from ..samplers import families as fam
from ..samplers.schedule import NUM_TRAIN_TIMESTEPS
from .errors import TurboError
from .loader import FAMILY_ATTACHMENT
from .sampler import TurboKSAMPLER

# ComfyUI's model config class (or a base class of it) -> the architecture names families.py uses.
ARCHITECTURES = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl", "SD3": "sd3", "Flux": "flux"}
ARCHITECTURE_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}
FLOW_ARCHITECTURES = ("sd3", "flux")
FLOW_FAMILIES = tuple(n for n in fam.FAMILY_NAMES if set(fam.FAMILIES[n].architectures) & set(FLOW_ARCHITECTURES))
# The families the node offers (and the KSampler names follow).
NODE_FAMILIES = tuple(fam.FAMILY_NAMES)
# Turbo Family Schedule's extra choice: the family Load Turbo Checkpoint loaded the MODEL as.
FROM_LOADER = "from loader"
FAMILY_SAMPLERS = ("lcm", "tcd", "ddim")   # the sampler kinds sample_turbo_family runs

log = logging.getLogger("comfy_turbo")


def _family_error(error: Exception) -> TurboError:
    return TurboError(str(error))


def model_architecture(model) -> tuple[str, str]:
    """(families.py's architecture name or ComfyUI's class name, ComfyUI's model config class name)."""
    config = model.model.model_config
    for cls in type(config).__mro__:
        if cls.__name__ in ARCHITECTURES:
            return ARCHITECTURES[cls.__name__], type(config).__name__
    return type(config).__name__, type(config).__name__


def _describe(architecture: str) -> str:
    return ARCHITECTURE_NAMES.get(architecture, architecture)


def check_family_model(family: str, model) -> None:
    """Refuse ``family`` on a MODEL it was not made for: another architecture (flux.1-schnell on SDXL),
    flow sampling under a VP family or the reverse (a ModelSamplingSD3 / Flux patch), v-prediction, or a
    model already patched to ComfyUI's LCM prediction (the family applies LCM's boundary itself)."""
    try:
        spec = fam.family_spec(family)
    except fam.FamilyError as e:
        raise _family_error(e) from None
    architecture, config_name = model_architecture(model)
    wanted = " / ".join(_describe(a) for a in spec.architectures)
    if architecture not in spec.architectures:
        fits = [n for n in NODE_FAMILIES if architecture in fam.FAMILIES[n].architectures]
        hint = (f"families for {_describe(architecture)}: {', '.join(fits)}" if fits
                else f"no family here is made for {_describe(architecture)}")
        raise TurboError(f"{family} is a family of {wanted} models, but this MODEL is {_describe(architecture)} "
                         f"(ComfyUI's {config_name}). Load a {wanted} model, or pick another family ({hint}).")
    sampling = model.get_model_object("model_sampling")
    is_flow = isinstance(sampling, comfy.model_sampling.CONST)
    flow_family = architecture in FLOW_ARCHITECTURES
    if is_flow and not flow_family:
        raise TurboError(f"{family} samples {wanted} on its discrete (epsilon) schedule, but this MODEL's "
                         f"model_sampling is flow ({type(sampling).__name__}, CONST): a ModelSamplingSD3 / "
                         "ModelSamplingFlux-style patch is upstream. Remove it.")
    if flow_family and not is_flow:
        raise TurboError(f"{family} is a flow family, but this MODEL's model_sampling ({type(sampling).__name__}) "
                         "is not flow (CONST).")
    if not flow_family:
        names = {cls.__name__ for cls in type(sampling).__mro__}
        if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
            raise TurboError(f"{family} models predict epsilon, but this MODEL is v-prediction "
                             f"({type(sampling).__name__}; core Load Checkpoint guesses v-prediction for some SD 2.x "
                             "files). Load it with Load Turbo Checkpoint, or put ModelSamplingDiscrete (eps) before "
                             "this node.")
        if "LCM" in names:
            raise TurboError(f"This MODEL is patched to ComfyUI's LCM prediction (ModelSamplingDiscrete 'lcm'), "
                             f"but {family} applies LCM's boundary condition in its own sampler. Remove the patch.")
        if not hasattr(sampling, "log_sigmas"):
            raise TurboError(f"{family} needs the model's discrete sigma table, but its model_sampling is "
                             f"{type(sampling).__name__}.")


def family_model_schedule(model, family: str, steps: int, strength: float = 1.0, gamma=None) -> fam.FamilySchedule:
    """The family's schedule for this MODEL: checked with :func:`check_family_model`, its sigmas from
    the model's own ``model_sampling.sigma`` (the table the model samples with, as Turbo Scheduler)."""
    check_family_model(family, model)
    sampling = model.get_model_object("model_sampling")
    try:
        return fam.family_schedule(family, int(steps), float(strength), gamma=gamma,
                                   sigma_of_timestep=sampling.sigma)
    except fam.FamilyError as e:
        raise _family_error(e) from None


class TurboX0Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.X0):
    """ComfyUI's discrete sampling with x0 prediction: what core ModelSamplingDiscrete ``x0`` builds."""


def x0_model(model):
    """A clone of ``model`` predicting x0 (the raw output is the denoised latent), as core
    ModelSamplingDiscrete with sampling ``x0`` patches it: SDXL-Lightning 1-step's ``prediction_type="sample"``."""
    patched = model.clone()
    patched.add_object_patch("model_sampling", TurboX0Sampling(model.model.model_config))
    return patched


def _timestep_of(sampling, sigma) -> int:
    return int(sampling.timestep(torch.as_tensor(sigma, dtype=torch.float32).reshape(1)).reshape(-1)[0])


def _estimate_ddim_steps(timesteps: list) -> int:
    """DDIM's N (it lands at ``t - 1000 // N``) from trailing timesteps: ``round(1000 / gap)`` of the first
    gap (16 steps: 999 - 937 = 62 -> 16); 1 with one timestep (its step lands at t=0 either way)."""
    if len(timesteps) < 2 or timesteps[0] <= timesteps[1]:
        return 1
    return max(1, round(NUM_TRAIN_TIMESTEPS / (timesteps[0] - timesteps[1])))


def schedule_from_sigmas(sampling, sigmas: torch.Tensor, sampler: str, gamma=None,
                         ddim_steps=None) -> fam.FamilySchedule:
    """A :class:`FamilySchedule` for ``sampler`` ("lcm", "tcd", "ddim") over the sigmas given, which
    SamplerCustom or KSampler hands the sampler: the timesteps are the model table's (``sampling.timestep``),
    the landing points and LCM's boundary scalings follow from them as in ``samplers/families.py``'s
    builders, so sigmas from Turbo Family Schedule give exactly that schedule.
    ``ddim_steps``: DDIM's full step count (the node passes it; the KSampler name estimates it)."""
    if sampler not in FAMILY_SAMPLERS:
        raise TurboError(f"Unknown family sampler {sampler!r}: use one of {', '.join(FAMILY_SAMPLERS)}.")
    sig = sigmas.detach().to("cpu", torch.float32)
    if sig.ndim != 1 or sig.shape[0] < 2 or not torch.isfinite(sig).all():
        raise TurboError(f"SIGMAS {tuple(sig.shape)} hold no finite step; connect Turbo Family Schedule's SIGMAS.")
    timesteps = [_timestep_of(sampling, s) for s in sig[:-1]]
    ends_at_zero = float(sig[-1]) == 0.0
    next_timesteps = timesteps[1:] + [0 if ends_at_zero else _timestep_of(sampling, sig[-1])]

    def table(ts):
        return sampling.sigma(torch.tensor(ts, dtype=torch.float32)).to(torch.float32).cpu()

    landing, boundary = sig[1:].clone(), ()
    if sampler == "lcm":
        boundary = tuple(fam.lcm_boundary_scalings(t) for t in timesteps)
    elif sampler == "tcd":
        gamma = fam.FAMILIES["tcd"].gamma if gamma is None else float(gamma)
        landing = table([fam.tcd_intermediate_timestep(t, gamma) for t in next_timesteps])
    else:
        n = int(ddim_steps) if ddim_steps else _estimate_ddim_steps(timesteps)
        landing = table([max(t - NUM_TRAIN_TIMESTEPS // n, 0) for t in timesteps])
        if not ends_at_zero:
            # Cut short (KSamplerAdvanced's end_at_step): land where the next step starts.
            landing[-1] = sig[-1]
    return fam.FamilySchedule("(sigmas)", len(timesteps), 1.0, tuple(timesteps), sig, landing, sampler, "epsilon",
                              "unit", 0.0, gamma if sampler == "tcd" else None, boundary)


def _start(model, x: torch.Tensor, schedule: fam.FamilySchedule) -> torch.Tensor:
    """The reference's starting latent from ComfyUI's raw noise and latent (see the module doc)."""
    noise, latent = getattr(model, "noise", None), getattr(model, "latent_image", None)
    if noise is None or latent is None:
        return x                       # called outside KSAMPLER: x is taken as already noised
    text_to_image = not bool(torch.any(latent != 0))
    return fam.start_latent(schedule, noise.to(x), None if text_to_image else latent.to(x))


@torch.no_grad()
def sample_turbo_family(model, x, sigmas, extra_args=None, callback=None, disable=None, sampler: str = "lcm",
                        gamma=None, ddim_steps=None, noise_sampler=None):
    """k-diffusion's sampler signature, for ``comfy.samplers.KSAMPLER``: one model call per step of
    ``samplers/families.py``'s LCM, TCD or DDIM loop over ``sigmas``, starting from unit noise for
    text-to-image (see the module doc); fresh noise from a generator seeded with ``seed + 1``, as
    ``samplers/euler.py``'s."""
    sampling = model.inner_model.inner_model.model_sampling
    schedule = schedule_from_sigmas(sampling, sigmas, sampler, gamma, ddim_steps)
    x = _start(model, x, schedule)
    return fam.sample_family(model, x, schedule, extra_args, callback, disable, noise_sampler)


def family_sampler(schedule: fam.FamilySchedule):
    """The SAMPLER for ``schedule``'s family (see the module doc)."""
    if schedule.sampler in ("euler", "euler_ancestral"):
        return TurboKSAMPLER(schedule.eta, 1.0, "diffusers")
    return comfy.samplers.KSAMPLER(sample_turbo_family, extra_options={
        "sampler": schedule.sampler, "gamma": schedule.gamma, "ddim_steps": schedule.steps})


def attached_family(model) -> str | None:
    """The family Load Turbo Checkpoint loaded the MODEL as (its attachment), or None from another loader."""
    get = getattr(model, "get_attachment", None)
    return get(FAMILY_ATTACHMENT) if get is not None else None


def note_loaded_family(model, family: str) -> None:
    """Log when ``family`` is not the one Load Turbo Checkpoint loaded the MODEL as: allowed (a merge may
    sample well with another recipe), but never silent."""
    loaded = attached_family(model)
    if loaded is not None and loaded != family:
        log.warning("comfy-turbo: Turbo Family Schedule samples a model loaded as %s with the %s recipe; "
                    "set the same family on both nodes unless you mean to.", loaded, family)


def loaded_family(model) -> str:
    """The family of ``FROM_LOADER``: the one Load Turbo Checkpoint loaded the MODEL as (its 'turbo'
    default is sd-turbo on SD 2.x, sdxl-turbo on SDXL). A MODEL from another loader carries none; then
    only an architecture that a single family fits (SD 2.x, SD3, Flux) has an answer, and the rest is a
    clear error rather than a guess."""
    loaded = attached_family(model)
    if loaded is not None:
        return loaded
    architecture, config_name = model_architecture(model)
    fits = [n for n in NODE_FAMILIES if architecture in fam.FAMILIES[n].architectures]
    if len(fits) == 1:
        return fits[0]
    raise TurboError(
        f"family '{FROM_LOADER}' needs a MODEL from Load Turbo Checkpoint, which records the family it loaded; "
        f"this {_describe(architecture)} MODEL (ComfyUI's {config_name}) came from another loader, and "
        + (f"{len(fits)} families fit it ({', '.join(fits)}). Pick its family here." if fits
           else "no family here is made for it."))


def family_outputs(model, family: str, steps: int, strength: float = 1.0, gamma: float = -1.0):
    """(MODEL, SIGMAS, SAMPLER) of Turbo Family Schedule; ``gamma`` < 0 is the family's default."""
    if family == FROM_LOADER:
        family = loaded_family(model)
    elif family not in NODE_FAMILIES:
        raise TurboError(f"Unknown family {family!r}: use one of {FROM_LOADER}, {', '.join(NODE_FAMILIES)}.")
    else:
        note_loaded_family(model, family)
    gamma = None if gamma is None or gamma < 0 else float(gamma)
    schedule = family_model_schedule(model, family, steps, strength, gamma)
    out_model = x0_model(model) if schedule.prediction == "sample" else model
    return out_model, schedule.sigmas, family_sampler(schedule)


class TurboFamilySchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TurboFamilySchedule",
            display_name="Turbo Family Schedule",
            category="sampling/turbo",
            description=(
                "A few-step family sampled as its authors sample it in diffusers: the family's sigmas from the "
                "model's own table, the matching SAMPLER (Euler, Euler ancestral, LCM, TCD, DDIM trailing or "
                "flow Euler, one model call per step, with the family's initial noise) and the MODEL (patched to "
                "x0 prediction for SDXL-Lightning 1-step). Connect all three to SamplerCustom at cfg 1.0."),
            inputs=[
                io.Model.Input("model", tooltip="The distilled model (or a base model with the family's LoRA)."),
                io.Combo.Input("family", options=[FROM_LOADER, *NODE_FAMILIES], default=FROM_LOADER,
                               tooltip="Whose recipe. 'from loader': the family set on Load Turbo Checkpoint "
                                       "(its 'turbo': sd-turbo or sdxl-turbo by the file), so swapping the "
                                       "checkpoint keeps the graph right. Or name it: sd-turbo, sdxl-turbo, sdxl-lightning, dmd2, hyper-sd (N-step "
                                       "LoRAs), hyper-sd-1step-unet, hyper-sd-unified (TCD), lcm, tcd, pcm; the "
                                       "flow models sd3.5-large-turbo and flux.1-schnell."),
                io.Int.Input("steps", default=4, min=1, max=16,
                             tooltip="Steps on the full schedule; each family takes its own counts (dmd2: 1 or 4, "
                                     "sdxl-lightning: 1, 2, 4, 8, lcm / tcd: 1 to 8, pcm: 2, 4, 8, 16, "
                                     "turbo and flow families: 1 to 4)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 for text-to-image. Image-to-image: the last int(steps*strength) steps "
                                       "run, as diffusers' img2img pipelines do (flow: any strength above 0)."),
                io.Float.Input("gamma", default=-1.0, min=-1.0, max=1.0, step=0.01, optional=True,
                               tooltip="TCD's stochasticity (diffusers' eta), for tcd and hyper-sd-unified only. "
                                       "-1: the family's default (tcd 0.3, hyper-sd-unified 1.0)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model to sample: the input, or for "
                                                              "sdxl-lightning 1-step a clone predicting x0."),
                io.Sigmas.Output(display_name="SIGMAS", tooltip="The family's sigmas, ending in 0."),
                io.Sampler.Output(display_name="SAMPLER", tooltip="The family's sampler, for SamplerCustom."),
            ],
        )

    @classmethod
    def execute(cls, model, family, steps, strength=1.0, gamma=-1.0) -> io.NodeOutput:
        return io.NodeOutput(*family_outputs(model, family, steps, strength, gamma))
