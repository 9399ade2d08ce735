"""Few-step families: each distilled model's schedule and sampler as its authors run it in diffusers.

Pure torch, like the rest of ``samplers/`` (no ComfyUI). A node layer turns a :class:`FamilySchedule`
into SIGMAS and a sampler and drives :func:`sample_family` with one model call per step.

Conventions (the ones ComfyUI's samplers use, so ComfyUI's model wrapper plugs in unchanged)
----------------------------------------------------------------------------------------------
* ``x`` is the latent in ComfyUI's sampling space. For the SD/SDXL ("VP") families that is
  k-diffusion's ``x = x0 + sigma * eps``, ``sigma = sqrt((1 - alphā_t) / alphā_t)``; diffusers' DDPM-space
  latent (what LCM / TCD / DDIM schedulers hold) is ``x / sqrt(1 + sigma²)``. For the flow families it
  is the flow latent ``x = (1 - sigma) x0 + sigma * noise`` itself.
* ``denoised`` is the model's x0 estimate, what ComfyUI's model wrapper returns:
  ``x - sigma * eps`` (epsilon), the raw output (``prediction="sample"``, x0) or ``x - sigma * v``
  (flow) (:func:`denoised_from_output`; ComfyUI ``comfy/model_sampling.py`` EPS / X0 / CONST).
* The model's input is ``x / sqrt(1 + sigma²)`` for VP families (diffusers' ``scale_model_input`` for
  Euler, the DDPM latent itself for LCM / TCD / DDIM), ``x`` for flow (:func:`model_input`), with the
  family's ``timesteps[i]`` as its timestep.

Initial noise (``FamilySchedule.initial_noise``, applied by :func:`start_latent`)
--------------------------------------------------------------------------------
* ``"sigma"``: text-to-image starts at ``x = noise * sigmas[0]``: diffusers' Euler schedulers with
  trailing spacing (``init_noise_sigma = sigma_max``). Model input ``noise * sigma / sqrt(1 + sigma²)``.
* ``"unit"``: text-to-image starts where the model input is the unit noise itself:
  ``x = noise * sqrt(1 + sigmas[0]²)``, i.e. LCM / TCD / DDIM with ``init_noise_sigma = 1`` at their
  first timestep. ComfyUI's KSampler does this only when ``sigmas[0]`` is sigma_max; at DMD2's 399 it
  scales by sigma instead (model input 24 % too small), at Hyper-SD's 800 by 1.9 %.
* Flow families start from ``noise`` (sigma 1), either way.
* Image-to-image (a latent given): ``x = latent + sigmas[0] * noise`` for VP families (every
  scheduler's ``add_noise``), ``(1 - sigma) * latent + sigma * noise`` for flow (``scale_noise``).

Strength follows the reference pipeline's ``get_timesteps``: SD/SDXL img2img pipelines run the last
``min(int(N * strength), N)`` of the N-step schedule; SD3 / Flux img2img pipelines skip the first
``int(N - N * strength)`` steps (no ``int`` around ``N * strength``), so there any strength > 0 runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .euler import NoiseSampler, ancestral_step, sample_turbo_euler, seeded_noise_sampler
from .schedule import NUM_TRAIN_TIMESTEPS, TurboScheduleError, scaled_linear_sigmas, trailing_timesteps

SAMPLER_KINDS = ("euler", "euler_ancestral", "lcm", "tcd", "ddim")
PREDICTIONS = ("epsilon", "sample", "flow")
INITIAL_NOISE = ("sigma", "unit")
LCM_ORIGINAL_STEPS = 50       # LCMScheduler / TCDScheduler ``original_inference_steps`` default
LCM_TIMESTEP_SCALING = 10.0   # LCMScheduler ``timestep_scaling`` default
LCM_SIGMA_DATA = 0.5          # LCMScheduler.get_scalings_for_boundary_condition_discrete

SigmaOfTimestep = Callable[[torch.Tensor], torch.Tensor]


class FamilyError(TurboScheduleError):
    """A family asked for something outside what its reference supports (a ValueError)."""


# ---------------------------------------------------------------------------------------------
# Schedule pieces
# ---------------------------------------------------------------------------------------------
def lcm_timesteps(steps: int, original_steps: int = LCM_ORIGINAL_STEPS,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """LCMScheduler.set_timesteps (and TCDScheduler's, without ``original_inference_steps``):
    the grid ``k*i - 1`` (i = 1..50, k = 20: 19, 39, ..., 999), reversed, sampled at indices
    ``floor(linspace(0, 50, N, endpoint=False))``. 4 steps: 999, 759, 499, 259.
    diffusers/schedulers/scheduling_lcm.py, scheduling_tcd.py."""
    k = num_train_timesteps // original_steps
    grid = [k * i - 1 for i in range(original_steps, 0, -1)]
    return [grid[math.floor(i * (len(grid) / steps))] for i in range(steps)]


def lcm_boundary_scalings(timestep: float, timestep_scaling: float = LCM_TIMESTEP_SCALING) -> tuple[float, float]:
    """LCM's boundary condition ``(c_skip, c_out)`` at ``timestep`` (consistency models, Song et al. 2023,
    eq. 5; diffusers ``LCMScheduler.get_scalings_for_boundary_condition_discrete``, sigma_data 0.5)."""
    scaled = timestep * timestep_scaling
    c_skip = LCM_SIGMA_DATA ** 2 / (scaled ** 2 + LCM_SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + LCM_SIGMA_DATA ** 2) ** 0.5
    return c_skip, c_out


def tcd_intermediate_timestep(next_timestep: int, gamma: float) -> int:
    """TCD's ``s = floor((1 - gamma) * t_prev)`` (Zheng et al. 2024, "Trajectory Consistency
    Distillation", strategic stochastic sampling), with diffusers' float32 arithmetic
    (``TCDScheduler.step``: ``torch.floor((1 - eta) * prev_timestep)``)."""
    return int(torch.floor((1 - gamma) * torch.tensor(int(next_timestep), dtype=torch.long)))


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """``numpy.linspace(start, stop, num)`` exactly (``start + i * step``, last value ``stop``)."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    return [start + i * step for i in range(num - 1)] + [stop]


def flow_sigmas(steps: int, shift: float, spacing: str,
                num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's sigmas as each pipeline asks for them, float32, final 0 appended.

    ``"sd3"``: ``StableDiffusion3Pipeline`` calls ``set_timesteps(N)``, which shifts
    ``linspace(sigma_max, sigma_min, N)`` where ``sigma_min = shift(1/T)`` is already shifted, so the
    shift applies twice at the low end: shift 3, 4 steps -> 1, .858, .602, .0089.
    ``"flux"``: ``FluxPipeline`` passes ``sigmas = linspace(1, 1/N, N)``, shifted once: shift 1 ->
    1, .75, .5, .25. Shift: ``shift * s / (1 + (shift - 1) * s)`` (Esser et al. 2024, SD3, eq. 23).
    diffusers/schedulers/scheduling_flow_match_euler_discrete.py; pipelines/flux/pipeline_flux.py.
    """
    if spacing == "sd3":
        train = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32).flip(0)
        train = train / num_train_timesteps
        train = shift * train / (1 + (shift - 1) * train)          # __init__, in float32
        lin = _linspace(train[0].item() * num_train_timesteps, train[-1].item() * num_train_timesteps, steps)
        sigmas = torch.tensor([t / num_train_timesteps for t in lin], dtype=torch.float64)
        sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).float()  # float64 in diffusers, then float32
    elif spacing == "flux":
        sigmas = torch.tensor(_linspace(1.0, 1.0 / steps, steps), dtype=torch.float64).float()
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)      # float32, as numpy does on float32
    else:
        raise FamilyError(f"Unknown flow spacing {spacing!r}: use 'sd3' or 'flux'.")
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# ---------------------------------------------------------------------------------------------
# A family's schedule for one run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FamilySchedule:
    """Everything one run of a family needs, highest noise first.

    ``timesteps``: what the model is called with, one per step (ints for VP families; flow
    families: ``sigma * 1000`` as float32 values). ``sigmas``: float32, ``len(timesteps) + 1``: the
    sigma of each call, then 0. ``landing_sigmas``: where step i lands before it is re-noised or
    re-expressed at ``sigmas[i + 1]``: DDIM's ``sigma(t - T // N)`` (sigma(0) after the last step, from
    ``alphā_0``), TCD's ``sigma(s)``; for the other samplers ``sigmas[1:]``. ``boundary``: LCM's
    ``(c_skip, c_out)`` per step, else empty.
    """

    family: str
    steps: int
    strength: float
    timesteps: tuple
    sigmas: torch.Tensor
    landing_sigmas: torch.Tensor
    sampler: str
    prediction: str
    initial_noise: str
    eta: float = 0.0
    gamma: Optional[float] = None
    boundary: tuple = ()

    @property
    def is_flow(self) -> bool:
        return self.prediction == "flow"


@dataclass(frozen=True)
class FamilySpec:
    """A family: its supported step counts, the architectures it exists for, and its reference."""

    name: str
    steps: tuple                  # supported step counts
    architectures: tuple          # "sd1", "sd2", "sdxl", "sd3", "flux"
    reference: str
    gamma: Optional[float] = None  # TCD's default gamma (diffusers' ``eta``), where the sampler is TCD

    def describe_steps(self) -> str:
        s = self.steps
        if len(s) > 2 and list(s) == list(range(s[0], s[-1] + 1)):
            return f"{s[0]} to {s[-1]}"
        return ", ".join(map(str, s[:-1])) + (" or " if len(s) > 1 else "") + str(s[-1])


def _check_steps(spec: FamilySpec, steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise FamilyError(f"{spec.name}: steps must be an integer, got {steps!r}.")
    if steps not in spec.steps:
        raise FamilyError(f"{spec.name} supports steps {spec.describe_steps()} ({spec.reference}); "
                          f"got steps={steps}.")


def _check_strength_value(spec: FamilySpec, strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise FamilyError(f"{spec.name}: strength must be a finite number, got {strength!r}.")
    return float(strength)


def _vp_strength_start(spec: FamilySpec, steps: int, strength) -> int:
    """Index of the first step an SD/SDXL img2img pipeline runs: ``N - min(int(N * strength), N)``
    (``StableDiffusion(XL)Img2ImgPipeline.get_timesteps``). Refuses strengths that run nothing."""
    strength = _check_strength_value(spec, strength)
    if steps == 1:
        if strength != 1.0:
            raise FamilyError(f"{spec.name} at 1 step takes strength 1 only (diffusers' img2img runs the last "
                              f"int(1 * strength) steps, none below 1); got strength={strength}.")
        return 0
    if not 1.0 / steps <= strength <= 1.0 or int(steps * strength) < 1:
        raise FamilyError(f"{spec.name} at {steps} steps takes strength from {1.0 / steps:g} to 1 (diffusers' "
                          f"img2img runs the last int({steps} * strength) of its {steps} steps); got "
                          f"strength={strength}.")
    return steps - min(int(steps * strength), steps)


def _flow_strength_start(spec: FamilySpec, steps: int, strength) -> int:
    """``int(max(N - N * strength, 0))`` (``StableDiffusion3Img2ImgPipeline`` / ``FluxImg2ImgPipeline``
    ``.get_timesteps``)."""
    strength = _check_strength_value(spec, strength)
    if not 0.0 < strength <= 1.0:
        raise FamilyError(f"{spec.name} takes strength in (0, 1] (1 for text-to-image); got strength={strength}.")
    return int(max(steps - steps * strength, 0))


def _table(sigma_of_timestep: Optional[SigmaOfTimestep]) -> SigmaOfTimestep:
    if sigma_of_timestep is not None:
        return sigma_of_timestep
    table = scaled_linear_sigmas()
    return lambda t: table[t.long()]


def _sigmas_at(sigma_of_timestep: SigmaOfTimestep, timesteps: Sequence[int]) -> torch.Tensor:
    return sigma_of_timestep(torch.tensor(list(timesteps), dtype=torch.float32)).to(torch.float32).cpu()


def _vp_schedule(spec, steps, strength, full_timesteps, sampler, sigma_of_timestep, *, prediction="epsilon",
                 initial_noise="unit", eta=0.0, gamma=None) -> FamilySchedule:
    """The common VP build: cut ``full_timesteps`` by strength, look sigmas up in the model's table,
    then add the sampler's landing points / boundary scalings."""
    sigma_fn = _table(sigma_of_timestep)
    start = _vp_strength_start(spec, steps, strength)
    timesteps = list(full_timesteps[start:])
    sigmas = torch.cat([_sigmas_at(sigma_fn, timesteps), torch.zeros(1)])
    landing, boundary = sigmas[1:].clone(), ()
    if sampler == "ddim":
        # DDIMScheduler.step: prev_timestep = t - T // N; below 0 it uses final_alpha_cumprod, alphā_0 with
        # set_alpha_to_one=False (every family config here), so the last step ends at sigma(0), not 0.
        landing = _sigmas_at(sigma_fn, [max(t - NUM_TRAIN_TIMESTEPS // steps, 0) for t in timesteps])
    elif sampler == "tcd":
        # TCDScheduler.step: prev_timestep is the next timestep, or 0 after the last one.
        landing = _sigmas_at(sigma_fn, [tcd_intermediate_timestep(t, gamma) for t in timesteps[1:] + [0]])
    elif sampler == "lcm":
        boundary = tuple(lcm_boundary_scalings(t) for t in timesteps)
    return FamilySchedule(spec.name, steps, float(strength), tuple(timesteps), sigmas, landing, sampler,
                          prediction, initial_noise, eta, gamma, boundary)


def _flow_schedule(spec, steps, strength, shift, spacing) -> FamilySchedule:
    start = _flow_strength_start(spec, steps, strength)
    sigmas = flow_sigmas(steps, shift, spacing)[start:]
    timesteps = tuple(float(t) for t in sigmas[:-1] * NUM_TRAIN_TIMESTEPS)  # float32, as the scheduler's
    return FamilySchedule(spec.name, steps, float(strength), timesteps, sigmas, sigmas[1:].clone(), "euler",
                          "flow", "sigma")


def _check_gamma(spec: FamilySpec, gamma) -> float:
    gamma = spec.gamma if gamma is None else gamma
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise FamilyError(f"{spec.name}: gamma (TCD's stochasticity, diffusers' eta) must be in [0, 1]; got {gamma!r}.")
    return float(gamma)


def _no_gamma(spec: FamilySpec, gamma) -> None:
    if gamma is not None:
        raise FamilyError(f"{spec.name} does not sample with TCD, so it takes no gamma; got gamma={gamma!r}.")


# ---------------------------------------------------------------------------------------------
# The families. Each builder: (spec, steps, strength, gamma, sigma_of_timestep) -> FamilySchedule.
# "Base config" below is the SD1.5 / SDXL-base scheduler config the authors' snippets start from with
# ``X.from_config(pipe.scheduler.config)``: scaled_linear betas 0.00085-0.012 over 1000 steps,
# epsilon, set_alpha_to_one False, clip_sample False, steps_offset 1.
# ---------------------------------------------------------------------------------------------
def _turbo(spec, steps, strength, gamma, sigma_fn):
    # stabilityai/sd-turbo, sdxl-turbo scheduler_config.json: Euler(-ancestral), trailing (schedule.py).
    _no_gamma(spec, gamma)
    ancestral = spec.name == "sdxl-turbo"
    return _vp_schedule(spec, steps, strength, trailing_timesteps(steps), "euler_ancestral" if ancestral else "euler",
                        sigma_fn, initial_noise="sigma", eta=1.0 if ancestral else 0.0)


def _lightning(spec, steps, strength, gamma, sigma_fn):
    # ByteDance/SDXL-Lightning README: EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing");
    # the 1-step UNet adds prediction_type="sample" (x0). 8 steps: 999, 874, ..., 124.
    _no_gamma(spec, gamma)
    return _vp_schedule(spec, steps, strength, trailing_timesteps(steps), "euler", sigma_fn,
                        prediction="sample" if steps == 1 else "epsilon", initial_noise="sigma")


def _dmd2(spec, steps, strength, gamma, sigma_fn):
    # tianweiy/DMD2 model card: LCMScheduler.from_config(base), timesteps=[999, 749, 499, 249] (4-step UNet
    # and LoRA) or [399] (1-step UNet), guidance 0. families.md agrees.
    _no_gamma(spec, gamma)
    return _vp_schedule(spec, steps, strength, [999, 749, 499, 249] if steps == 4 else [399], "lcm", sigma_fn)


def _hyper_nstep(spec, steps, strength, gamma, sigma_fn):
    # ByteDance/Hyper-SD README, 2/4/8-step LoRAs: DDIMScheduler.from_config(base, timestep_spacing="trailing"),
    # eta 0 (the pipeline default). Its last step lands on alphā_0 (sigma 0.029), which is what it decodes.
    _no_gamma(spec, gamma)
    return _vp_schedule(spec, steps, strength, trailing_timesteps(steps), "ddim", sigma_fn)


def _hyper_unet(spec, steps, strength, gamma, sigma_fn):
    # ByteDance/Hyper-SD README, Hyper-SDXL-1step-Unet: LCMScheduler.from_config(base), timesteps=[800].
    _no_gamma(spec, gamma)
    return _vp_schedule(spec, steps, strength, [800], "lcm", sigma_fn)


def _tcd(spec, steps, strength, gamma, sigma_fn):
    # TCDScheduler.from_config(base) with the LCM grid, eta = gamma: h1t/TCD-SDXL-LoRA card (gamma 0.3);
    # Hyper-SD's unified 1-step LoRA (README: eta 1.0, "lower eta for more steps"), 1 to 8 steps.
    gamma = _check_gamma(spec, gamma)
    return _vp_schedule(spec, steps, strength, lcm_timesteps(steps), "tcd", sigma_fn, gamma=gamma)


def _lcm(spec, steps, strength, gamma, sigma_fn):
    # latent-consistency/lcm-lora-sdxl, lcm-sdxl cards: LCMScheduler.from_config(base), original 50 steps,
    # timestep_scaling 10: 4 steps 999, 759, 499, 259.
    _no_gamma(spec, gamma)
    return _vp_schedule(spec, steps, strength, lcm_timesteps(steps), "lcm", sigma_fn)


def _pcm(spec, steps, strength, gamma, sigma_fn):
    # wangfuyun/PCM_Weights card: "Use DDIM or Euler instead of LCM ... When using DDIM, set
    # timestep_spacing="trailing", clip_sample=False and set_alpha_to_one=False"; steps as the LoRA's name
    # says (smallcfg 2/4/8/16, normalcfg 4/8/16). At 16 steps 1000 % 16 != 0, so DDIM lands at t - 62 while
    # the next call is at the next trailing timestep (e.g. 875 vs 874): reproduced, see ddim_step.
    _no_gamma(spec, gamma)
    return _vp_schedule(spec, steps, strength, trailing_timesteps(steps), "ddim", sigma_fn)


def _sd35_turbo(spec, steps, strength, gamma, sigma_fn):
    # stabilityai/stable-diffusion-3.5-large-turbo card: StableDiffusion3Pipeline, 4 steps, guidance 0;
    # FlowMatchEulerDiscreteScheduler shift 3.0 (the SD3 / SD3.5 scheduler config; families.md notes this
    # model's own config was not found, shift 3 is also what Stability's sd3_infer.py uses).
    _no_gamma(spec, gamma)
    return _flow_schedule(spec, steps, strength, 3.0, "sd3")


def _schnell(spec, steps, strength, gamma, sigma_fn):
    # black-forest-labs/FLUX.1-schnell scheduler_config.json: shift 1.0, use_dynamic_shifting false;
    # FluxPipeline's sigmas = linspace(1, 1/N, N): 4 steps 1, .75, .5, .25.
    _no_gamma(spec, gamma)
    return _flow_schedule(spec, steps, strength, 1.0, "flux")


_BUILDERS = {}
FAMILIES: dict[str, FamilySpec] = {}


def _register(builder, name, steps, architectures, reference, gamma=None):
    FAMILIES[name] = FamilySpec(name, tuple(steps), tuple(architectures), reference, gamma)
    _BUILDERS[name] = builder


_register(_turbo, "sd-turbo", range(1, 5), ["sd2"], "trailing Euler, 1 to 4 steps")
_register(_turbo, "sdxl-turbo", range(1, 5), ["sdxl"], "trailing Euler ancestral, 1 to 4 steps")
_register(_lightning, "sdxl-lightning", [1, 2, 4, 8], ["sdxl"], "one checkpoint per step count: 1, 2, 4, 8")
_register(_dmd2, "dmd2", [1, 4], ["sdxl"], "the 1-step UNet at t=399, the 4-step UNet/LoRA at 999/749/499/249")
_register(_hyper_nstep, "hyper-sd", [2, 4, 8], ["sd1", "sdxl"], "the 2-, 4- and 8-step LoRAs, DDIM trailing")
_register(_hyper_unet, "hyper-sd-1step-unet", [1], ["sdxl"], "the 1-step SDXL UNet, LCM at t=800")
_register(_tcd, "hyper-sd-unified", range(1, 9), ["sd1", "sdxl"], "the unified 1-step LoRA through TCD, 1 to 8 steps",
          gamma=1.0)
_register(_lcm, "lcm", range(1, 9), ["sd1", "sdxl"], "LCM / LCM-LoRA, 1 to 8 steps on the 50-step grid")
_register(_tcd, "tcd", range(1, 9), ["sd1", "sdxl"], "TCD LoRA, 1 to 8 steps", gamma=0.3)
_register(_pcm, "pcm", [2, 4, 8, 16], ["sd1", "sdxl"], "one LoRA per step count: 2, 4, 8, 16")
_register(_sd35_turbo, "sd3.5-large-turbo", range(1, 5), ["sd3"], "flow Euler at shift 3, 4 steps on its card")
_register(_schnell, "flux.1-schnell", range(1, 5), ["flux"], "flow Euler at shift 1, 1 to 4 steps")

FAMILY_NAMES = tuple(FAMILIES)


def family_spec(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise FamilyError(f"Unknown family {name!r}: use one of {', '.join(FAMILY_NAMES)}.") from None


def family_schedule(name: str, steps: int, strength: float = 1.0, *, gamma: Optional[float] = None,
                    sigma_of_timestep: Optional[SigmaOfTimestep] = None) -> FamilySchedule:
    """The family's schedule for ``steps`` at ``strength`` (1.0: text-to-image or a full-strength img2img).

    ``gamma``: TCD's stochasticity (families sampling with TCD only; default: the family's).
    ``sigma_of_timestep``: the model's sigma table (ComfyUI's ``model_sampling.sigma``); default
    :func:`samplers.scaled_linear_sigmas`. Flow families compute their sigmas and ignore it.
    Raises :class:`FamilyError` (a ValueError) naming the family's range when out of it.
    """
    spec = family_spec(name)
    _check_steps(spec, steps)
    return _BUILDERS[name](spec, steps, strength, gamma, sigma_of_timestep)


def check_architecture(name: str, architecture: str) -> None:
    """Refuse a family on a model it does not exist for (say flux.1-schnell on an SDXL UNet)."""
    spec = family_spec(name)
    if architecture not in spec.architectures:
        raise FamilyError(f"{name} is a family of {' / '.join(spec.architectures)} models; this model is "
                          f"{architecture}.")


# ---------------------------------------------------------------------------------------------
# Model conventions
# ---------------------------------------------------------------------------------------------
def _bcast(sigma, x: torch.Tensor):
    if isinstance(sigma, torch.Tensor) and sigma.ndim:
        return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return float(sigma)


def model_input(x: torch.Tensor, sigma, prediction: str) -> torch.Tensor:
    """What the network sees: ``x / sqrt(1 + sigma²)`` for VP models (ComfyUI ``EPS.calculate_input``,
    diffusers' Euler ``scale_model_input`` / the DDPM latent of LCM, TCD, DDIM); ``x`` for flow (CONST)."""
    if prediction == "flow":
        return x
    s = _bcast(sigma, x)
    return x / (s ** 2 + 1) ** 0.5


def denoised_from_output(output: torch.Tensor, x: torch.Tensor, sigma, prediction: str) -> torch.Tensor:
    """The x0 estimate from the network's raw output (ComfyUI ``calculate_denoised``): epsilon
    ``x - sigma * eps``; sample (x0) the output itself; flow ``x - sigma * v``."""
    if prediction == "sample":
        return output
    if prediction not in ("epsilon", "flow"):
        raise FamilyError(f"Unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}.")
    return x - output * _bcast(sigma, x)


def start_latent(schedule: FamilySchedule, noise: torch.Tensor, latent: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The latent entering the first step, as the reference pipeline makes it (see the module doc)."""
    sigma = float(schedule.sigmas[0])
    if schedule.is_flow:
        return noise * sigma if latent is None else noise * sigma + latent * (1.0 - sigma)
    if latent is not None:
        return latent + noise * sigma
    return noise * ((1.0 + sigma ** 2) ** 0.5 if schedule.initial_noise == "unit" else sigma)


# ---------------------------------------------------------------------------------------------
# Step functions: (denoised, x, sigma, ..., next, noise) -> x at the next sigma, all in the
# conventions above. sigma arguments are floats (or 0-d tensors).
# ---------------------------------------------------------------------------------------------
def euler_step(denoised: torch.Tensor, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Euler on the probability-flow ODE, ``x + (x - denoised) / sigma * (sigma_next - sigma)``; the
    denoised itself at sigma_next 0. diffusers ``EulerDiscreteScheduler.step`` (s_churn 0), for any
    prediction once ``denoised`` is formed (x0 prediction: the output itself), and
    ``FlowMatchEulerDiscreteScheduler.step``'s ``x + (sigma_next - sigma) * v``, since
    ``v = (x - denoised) / sigma``."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma_next == 0.0:
        return denoised
    return x + (x - denoised) / sigma * (sigma_next - sigma)


flow_euler_step = euler_step


def euler_ancestral_step(denoised: torch.Tensor, x: torch.Tensor, sigma, sigma_next, noise: Optional[torch.Tensor],
                         eta: float = 1.0) -> torch.Tensor:
    """``EulerAncestralDiscreteScheduler.step``: Euler to sigma_down, then ``noise * sigma_up``
    (:func:`samplers.ancestral_step`)."""
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
    x = euler_step(denoised, x, sigma, sigma_down)
    return x + noise * sigma_up if sigma_up > 0.0 else x


def ddim_step(denoised: torch.Tensor, x: torch.Tensor, sigma, sigma_landing, sigma_next) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta 0; diffusers ``DDIMScheduler.step``):
    ``sqrt(alphā') x0 + sqrt(1 - alphā') eps`` at the landing timestep, i.e. ``denoised + sigma_landing * eps``
    here, then re-expressed at ``sigma_next`` so that the next model input is diffusers' latent:
    times ``sqrt((1 + sigma_next²) / (1 + sigma_landing²))``. Where landing and next agree that factor is 1;
    at the end (sigma_next 0, landing sigma(0) from alphā_0) it returns diffusers' final DDPM-space latent
    ``sqrt(alphā_0) x0 + sqrt(1 - alphā_0) eps``, as the reference decodes it."""
    sigma, sigma_landing, sigma_next = float(sigma), float(sigma_landing), float(sigma_next)
    x_land = denoised + (x - denoised) * (sigma_landing / sigma)
    if sigma_landing == sigma_next:
        return x_land
    return x_land * ((1.0 + sigma_next ** 2) / (1.0 + sigma_landing ** 2)) ** 0.5


def lcm_step(denoised: torch.Tensor, x: torch.Tensor, sigma, sigma_next, noise: Optional[torch.Tensor],
             c_skip: float, c_out: float) -> torch.Tensor:
    """Multistep consistency sampling (Luo et al. 2023, LCM, Algorithm 1; diffusers ``LCMScheduler.step``):
    the boundary-conditioned estimate ``c_out * x0 + c_skip * x_ddpm`` (``x_ddpm = x / sqrt(1 + sigma²)``),
    then fresh noise at sigma_next (``sqrt(alphā') x0' + sqrt(1 - alphā') z`` in DDPM space); the estimate
    itself after the last step."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    estimate = denoised * c_out + x * (c_skip / (1.0 + sigma ** 2) ** 0.5)
    if sigma_next == 0.0:
        return estimate
    return estimate + noise * sigma_next


def tcd_step(denoised: torch.Tensor, x: torch.Tensor, sigma, sigma_s, sigma_next, noise: Optional[torch.Tensor]
             ) -> torch.Tensor:
    """Strategic stochastic sampling (Zheng et al. 2024, TCD, Algorithm 4; diffusers ``TCDScheduler.step``):
    DDIM to ``s = floor((1 - gamma) t_next)`` (``denoised + sigma_s * eps``), then forward-noise to
    t_next: ``+ sqrt(sigma_next² - sigma_s²) * noise`` (``sqrt(alphā'/alphā_s) x_s + sqrt(1 - alphā'/alphā_s) z``
    in DDPM space). After the last step (sigma_next 0, s = 0) it returns diffusers' DDPM-space
    ``sqrt(alphā_0) x0 + sqrt(1 - alphā_0) eps``, which is what the reference decodes."""
    sigma, sigma_s, sigma_next = float(sigma), float(sigma_s), float(sigma_next)
    x_s = denoised + (x - denoised) * (sigma_s / sigma)
    if sigma_next == 0.0:
        return x_s / (1.0 + sigma_s ** 2) ** 0.5
    if noise is not None:
        x_s = x_s + noise * math.sqrt(max(sigma_next ** 2 - sigma_s ** 2, 0.0))
    return x_s


def step_needs_noise(schedule: FamilySchedule, i: int) -> bool:
    """Whether step ``i`` draws fresh noise: LCM on every step but the last; TCD likewise when gamma > 0
    (both as diffusers draws); Euler ancestral where sigma_up > 0; Euler and DDIM never."""
    last = i == len(schedule.timesteps) - 1
    if schedule.sampler == "lcm":
        return not last
    if schedule.sampler == "tcd":
        return not last and bool(schedule.gamma)
    if schedule.sampler == "euler_ancestral":
        return ancestral_step(schedule.sigmas[i], schedule.sigmas[i + 1], schedule.eta)[1] > 0.0
    return False


@torch.no_grad()
def sample_family(model, x: torch.Tensor, schedule: FamilySchedule, extra_args: Optional[dict] = None,
                  callback: Optional[Callable[[dict], None]] = None, disable: Optional[bool] = None,
                  noise_sampler: Optional[NoiseSampler] = None) -> torch.Tensor:
    """Run ``schedule`` from ``x`` (see :func:`start_latent`); ``model(x, sigma)`` returns ``denoised``
    and is called exactly once per step. k-diffusion's sampler conventions otherwise, as
    :func:`samplers.sample_turbo_euler` (which runs the Euler samplers here): ``callback`` gets
    (x, i, sigma, sigma_hat, denoised) after each call; ``noise_sampler(sigma, sigma_next)`` is asked only
    on steps that need noise (default: seeded from ``extra_args["seed"] + 1``)."""
    extra_args = {} if extra_args is None else extra_args
    sigmas = schedule.sigmas.to(x.device)
    if schedule.sampler in ("euler", "euler_ancestral"):
        return sample_turbo_euler(model, x, sigmas, extra_args, callback, disable, eta=schedule.eta,
                                  noise_sampler=noise_sampler)
    if schedule.sampler not in SAMPLER_KINDS:
        raise FamilyError(f"Unknown sampler {schedule.sampler!r}: use one of {', '.join(SAMPLER_KINDS)}.")
    if noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        noise = noise_sampler(sigma, sigma_next) if step_needs_noise(schedule, i) else None
        if schedule.sampler == "lcm":
            x = lcm_step(denoised, x, sigma, sigma_next, noise, *schedule.boundary[i])
        elif schedule.sampler == "tcd":
            x = tcd_step(denoised, x, sigma, schedule.landing_sigmas[i], sigma_next, noise)
        else:
            x = ddim_step(denoised, x, sigma, schedule.landing_sigmas[i], sigma_next)
    return x
