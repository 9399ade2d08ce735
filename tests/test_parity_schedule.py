"""Schedule parity: our timesteps and sigmas are diffusers' (and, for "stability", ComfyUI's).

References
----------
* diffusers 0.35 ``EulerDiscreteScheduler.set_timesteps`` / ``EulerAncestralDiscreteScheduler.set_timesteps``
  (diffusers/schedulers/scheduling_euler_discrete.py, scheduling_euler_ancestral_discrete.py),
  ``timestep_spacing="trailing"``: ``timesteps = round(arange(1000, 0, -1000/N)) - 1`` and
  ``sigmas = interp(timesteps, arange(1000), sqrt((1 - alphas_cumprod) / alphas_cumprod)) + [0]``.
* diffusers ``StableDiffusionImg2ImgPipeline.get_timesteps`` and
  ``StableDiffusionXLImg2ImgPipeline.get_timesteps`` (diffusers/pipelines/stable_diffusion/
  pipeline_stable_diffusion_img2img.py, stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py):
  the img2img strength rule, called here for real on a stub holding the scheduler.
* ComfyUI ``comfy.model_sampling.ModelSamplingDiscrete.sigma`` (the model's own sigma table, built by
  ``comfy.model_base.model_sampling`` for the ``comfy.supported_models.SD20`` / ``SDXL`` configs).
* ComfyUI ``comfy_extras/nodes_custom_sampler.py`` ``SDTurboScheduler``: timesteps
  ``flip(arange(1, 11) * 100 - 1)[10 - int(10 * denoise):][:steps]``.
"""
from __future__ import annotations

import pytest
import torch

from parity_helpers import (
    ModelSamplingStub,
    SCHEDULER_CONFIGS,
    comfy_model_sampling,
    diffusers_img2img_timesteps,
    diffusers_scheduler,
    max_rel,
    parity_record,  # noqa: F401  (pytest fixture)
    setup_comfyui,
)

setup_comfyui()

import samplers  # noqa: E402
from samplers import TurboScheduleError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

STEPS = (1, 2, 3, 4)
STRENGTHS = (1.0, 0.75, 0.5, 0.25)
VALID = [(n, s) for n in STEPS for s in STRENGTHS if n * s >= 1]
INVALID = [(n, s) for n in STEPS for s in STRENGTHS if n * s < 1]
VARIANTS = ("sdxl-turbo", "sd-turbo")
SIGMA_TOL = 1e-5  # relative


def _diffusers_schedule(variant, steps, strength):
    """(timesteps, sigmas) diffusers' img2img/txt2img pipeline would run, sigmas incl. the final 0."""
    scheduler = diffusers_scheduler(variant)
    scheduler.set_timesteps(steps, device="cpu")
    timesteps, n, t_start = diffusers_img2img_timesteps(scheduler, variant, steps, strength)
    assert scheduler.begin_index == t_start
    return [int(t) for t in timesteps.tolist()], scheduler.sigmas[t_start:], timesteps


def _sigma_source(name):
    if name == "scaled_linear":
        table = samplers.scaled_linear_sigmas()
        return lambda t: table[t.long()]
    ms = comfy_model_sampling(name.split("-", 1)[1])
    return ms.sigma


def test_scheduler_configs_are_the_hub_configs():
    """The literal hub configs build the expected diffusers classes with the Turbo settings intact."""
    import diffusers

    for variant, cls in (("sdxl-turbo", diffusers.EulerAncestralDiscreteScheduler),
                         ("sd-turbo", diffusers.EulerDiscreteScheduler)):
        scheduler = diffusers_scheduler(variant)
        assert type(scheduler) is cls
        for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type",
                    "timestep_spacing", "steps_offset"):
            assert scheduler.config[key] == SCHEDULER_CONFIGS[variant][key], key
        assert scheduler.config.timestep_spacing == "trailing"
        assert scheduler.order == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_trailing_timesteps_equal_diffusers(variant, parity_record):
    """``turbo_timesteps(N, strength)`` is exactly what diffusers' img2img pipeline steps through.

    strength=1.0 is text-to-image (``get_timesteps`` returns every timestep then).
    """
    compared = []
    for steps, strength in VALID:
        ours = samplers.turbo_timesteps(steps, strength, "trailing")
        ref, _, _ = _diffusers_schedule(variant, steps, strength)
        assert ours == ref, (steps, strength, ours, ref)
        assert samplers.effective_steps(steps, strength) == len(ref)
        if strength == 1.0:
            assert samplers.trailing_timesteps(steps) == ref
        compared.append([steps, strength, ref])
    # spot values, so that a change in diffusers itself is noticed too
    assert samplers.turbo_timesteps(4) == [999, 749, 499, 249]
    assert samplers.turbo_timesteps(3) == [999, 666, 332]
    assert samplers.turbo_timesteps(4, 0.5) == [499, 249]
    parity_record(f"timesteps/{variant}", 0.0, 0.0, metric="exact", pairs=compared)


@pytest.mark.parametrize("source", ["comfy-sd20", "comfy-sdxl", "scaled_linear"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_sigmas_match_diffusers(variant, source, parity_record):
    """Our sigmas, from ComfyUI's SD2/SDXL ``model_sampling.sigma`` or from ``scaled_linear_sigmas``,
    equal diffusers' ``scheduler.sigmas[t_start:]`` within 1e-5 relative, ending in an exact 0."""
    sigma_fn = _sigma_source(source)
    worst, worst_pair = 0.0, None
    for steps, strength in VALID:
        ours = samplers.turbo_sigmas(sigma_fn, steps, strength, "trailing")
        _, ref, _ = _diffusers_schedule(variant, steps, strength)
        assert ours.dtype == torch.float32
        assert ours.shape == ref.shape, (steps, strength, ours, ref)
        assert ours[-1].item() == 0.0 and ref[-1].item() == 0.0
        err = max_rel(ours[:-1], ref[:-1])
        assert err <= SIGMA_TOL, (steps, strength, ours, ref, err)
        if err >= worst:
            worst, worst_pair = err, [steps, strength]
    parity_record(f"sigmas/{source}/{variant}", worst, SIGMA_TOL, metric="max_rel",
                  worst_pair=worst_pair, pairs=len(VALID))


def test_comfy_sigma_max_is_diffusers_init_noise_sigma(parity_record):
    """ComfyUI's ``model_sampling.sigma_max`` (SD2 and SDXL) is diffusers' trailing ``init_noise_sigma``."""
    worst = 0.0
    for variant in VARIANTS:
        scheduler = diffusers_scheduler(variant)
        scheduler.set_timesteps(1)
        ref = torch.as_tensor(scheduler.init_noise_sigma)
        for family in ("sd20", "sdxl"):
            err = max_rel(comfy_model_sampling(family).sigma_max, ref)
            assert err <= SIGMA_TOL
            worst = max(worst, err)
        worst = max(worst, max_rel(samplers.scaled_linear_sigmas()[-1], ref))
    parity_record("sigma_max", worst, SIGMA_TOL, metric="max_rel", value=float(ref))


@pytest.mark.parametrize("steps,strength", INVALID)
def test_empty_schedule_raises(steps, strength):
    """Where ``N * strength < 1`` diffusers' ``get_timesteps`` silently yields no step; we raise."""
    for variant in VARIANTS:
        ref, _, _ = _diffusers_schedule(variant, steps, strength)
        assert ref == []
    with pytest.raises(TurboScheduleError):
        samplers.effective_steps(steps, strength)
    with pytest.raises(TurboScheduleError):
        samplers.turbo_timesteps(steps, strength, "trailing")
    with pytest.raises(TurboScheduleError):
        samplers.turbo_sigmas(samplers.scaled_linear_sigmas().__getitem__, steps, strength, "trailing")


# ---------------------------------------------------------------------------------------------
# "stability" spacing == ComfyUI's built-in SDTurboScheduler
# ---------------------------------------------------------------------------------------------
STABILITY_DENOISE = (1.0, 0.99, 0.95, 0.9, 0.75, 0.7, 0.6, 0.55, 0.5, 0.31, 0.25, 0.1)


def _builtin_sdturbo_sigmas(model_sampling, steps, denoise):
    """Run ComfyUI's own ``SDTurboScheduler`` node (comfy_extras/nodes_custom_sampler.py)."""
    import comfy_extras.nodes_custom_sampler as ncs

    out = ncs.SDTurboScheduler.execute(ModelSamplingStub(model_sampling), steps, denoise)
    result = out.result if hasattr(out, "result") else out  # V3 NodeOutput (or a plain tuple)
    (sigmas,) = result
    return sigmas


@pytest.mark.parametrize("family", ["sd20", "sdxl"])
def test_stability_spacing_equals_comfy_sdturbo_scheduler(family, parity_record):
    """``turbo_sigmas(..., spacing="stability")`` is ComfyUI's SDTurboScheduler, value for value."""
    ms = comfy_model_sampling(family)
    cases = []
    for steps in STEPS:
        for denoise in STABILITY_DENOISE:
            builtin = _builtin_sdturbo_sigmas(ms, steps, denoise)
            ours = samplers.turbo_sigmas(ms.sigma, steps, denoise, "stability")
            assert torch.equal(ours, builtin.to(ours.dtype)), (steps, denoise, ours, builtin)
            builtin_t = ms.timestep(builtin[:-1]).tolist()
            assert samplers.stability_timesteps(steps, denoise) == builtin_t
            assert samplers.turbo_timesteps(steps, denoise, "stability") == builtin_t
            cases.append([steps, denoise, builtin_t])
    # the grid itself
    assert _timesteps_of(ms, _builtin_sdturbo_sigmas(ms, 4, 1.0)) == [999, 899, 799, 699]
    assert samplers.stability_timesteps(4) == [999, 899, 799, 699]
    parity_record(f"stability/comfy-SDTurboScheduler/{family}", 0.0, 0.0, metric="exact", cases=len(cases))


def _timesteps_of(ms, sigmas):
    return ms.timestep(sigmas[:-1]).tolist()


def test_comfy_sdturbo_scheduler_truncates_denoise_to_tenths():
    """The built-in enters the grid at ``10 - int(10 * denoise)``: denoise is floored to tenths,
    so 0.55 and 0.59 run what 0.5 runs and 0.99 what 0.9 runs; ours follows it exactly."""
    ms = comfy_model_sampling("sd20")
    for steps in STEPS:
        for denoise, floor in ((0.55, 0.5), (0.59, 0.5), (0.99, 0.9), (0.31, 0.3), (0.19, 0.1)):
            a = _builtin_sdturbo_sigmas(ms, steps, denoise)
            b = _builtin_sdturbo_sigmas(ms, steps, floor)
            assert torch.equal(a, b), (steps, denoise)
            assert samplers.stability_timesteps(steps, denoise) == samplers.stability_timesteps(steps, floor)
    assert _timesteps_of(ms, _builtin_sdturbo_sigmas(ms, 1, 0.99)) == [899]
    assert _timesteps_of(ms, _builtin_sdturbo_sigmas(ms, 1, 1.0)) == [999]
    assert _timesteps_of(ms, _builtin_sdturbo_sigmas(ms, 2, 0.55)) == [499, 399]
    # denoise < 0.1: the built-in silently returns a schedule with no step; ours raises
    assert _builtin_sdturbo_sigmas(ms, 2, 0.05).tolist() == [0.0]
    with pytest.raises(TurboScheduleError):
        samplers.stability_timesteps(2, 0.05)


def test_comfy_sdturbo_scheduler_is_not_diffusers_for_multistep(parity_record):
    """ComfyUI's built-in SDTurboScheduler is diffusers' schedule only at N=1; for N>1 it walks
    999, 899, ... instead of diffusers' trailing 999, 499 / 999, 666, 332 / 999, 749, 499, 249."""
    ms = comfy_model_sampling("sdxl")
    differences = {}
    for steps in STEPS:
        builtin = _builtin_sdturbo_sigmas(ms, steps, 1.0)
        builtin_t = _timesteps_of(ms, builtin)
        ref_t, ref_sigmas, _ = _diffusers_schedule("sdxl-turbo", steps, 1.0)
        if steps == 1:
            assert builtin_t == ref_t == [999]
            assert max_rel(builtin[:-1], ref_sigmas[:-1]) <= SIGMA_TOL
        else:
            assert builtin_t != ref_t
            assert builtin_t[0] == ref_t[0] == 999
            assert builtin_t[-1] == 999 - 100 * (steps - 1) > ref_t[-1]
            differences[steps] = {"comfy_builtin": builtin_t, "diffusers": ref_t,
                                  "max_rel_sigma_diff": max_rel(builtin[:-1], ref_sigmas[:-1])}
    parity_record("stability-vs-diffusers/differs-for-N>1", 0.0, 0.0, metric="documented-difference",
                  differences=differences)
