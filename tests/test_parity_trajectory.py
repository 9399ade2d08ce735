"""Trajectory parity: ``samplers.sample_turbo_euler`` walks diffusers' scheduler loop step for step.

Both loops drive the SAME deterministic stand-in denoiser with the SAME noise tensors, and every
intermediate latent (and every predicted x0) is compared.

References
----------
* diffusers 0.35 ``EulerAncestralDiscreteScheduler.step`` (sdxl-turbo) and
  ``EulerDiscreteScheduler.step`` with ``s_churn=0`` (sd-turbo), with ``scale_model_input``
  (``sample / sqrt(sigma^2 + 1)``) before the model call, as in the loops of
  ``StableDiffusionXLPipeline.__call__`` / ``StableDiffusionPipeline.__call__``
  (diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py,
  diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py).
* txt2img start: ``prepare_latents``: ``latents = noise * scheduler.init_noise_sigma``.
  img2img start: ``StableDiffusion(XL)Img2ImgPipeline.prepare_latents``:
  ``scheduler.add_noise(image_latents, noise, timesteps[:1])`` after ``get_timesteps``.
* Our side converts exactly as ComfyUI's ``BaseModel._apply_model`` (comfy/model_base.py) does:
  ``xc = model_sampling.calculate_input(sigma, x)``, ``t = model_sampling.timestep(sigma)``,
  ``denoised = model_sampling.calculate_denoised(sigma, eps, x)`` (comfy/model_sampling.py ``EPS``).
* Initial noise: ComfyUI ``KSAMPLER.sample`` (comfy/samplers.py) scales the unit noise with
  ``model_sampling.noise_scaling(sigmas[0], noise, latent, self.max_denoise(model_wrap, sigmas))``.

How the noise is injected
-------------------------
Ours: ``sample_turbo_euler(..., noise_sampler=...)`` is handed a sampler that returns the prepared
tensors in order. diffusers: ``EulerAncestralDiscreteScheduler.step`` draws with the module-level name
``randn_tensor``; :func:`parity_helpers.inject_ancestral_noise` rebinds that name for the loop to
return the same tensors in order (nothing else of the scheduler is touched). diffusers draws on every
step, also on the last where ``sigma_up = 0``; ours draws only when ``sigma_up > 0``, so the i-th
draw is the same tensor on both sides. A second test uses no injection at all and shows the default
seeded noise (``extra_args={"seed": s}``) equals diffusers' ``step(..., generator=Generator().manual_seed(s + 1))``.
"""
from __future__ import annotations

import contextlib
import math
import types

import pytest
import torch

from parity_helpers import (
    comfy_model_sampling,
    diffusers_img2img_timesteps,
    diffusers_scheduler,
    inject_ancestral_noise,
    max_abs,
    load_repo_module,
    max_rel,
    parity_record,  # noqa: F401  (pytest fixture)
    setup_comfyui,
)

setup_comfyui()

import samplers  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOL = 1e-5  # max-abs on fp32 latents
SHAPE = (2, 4, 8, 8)
# (variant, eta): sdxl-turbo is Euler-ancestral, sd-turbo plain Euler
SAMPLERS = [("sdxl-turbo", 1.0), ("sd-turbo", 0.0)]
CASES = [(n, 1.0) for n in (1, 2, 3, 4)] + [(2, 0.5), (3, 0.5), (4, 0.5), (4, 0.75), (4, 0.25), (3, 0.75)]


# ---------------------------------------------------------------------------------------------
# The stand-in denoiser: eps = f(scaled input, timestep), identical in both conventions
# ---------------------------------------------------------------------------------------------
_MIX = torch.tensor([[0.9, -0.3, 0.2, 0.1],
                     [0.2, 0.8, -0.25, 0.05],
                     [-0.1, 0.3, 0.7, 0.2],
                     [0.15, -0.2, 0.1, 0.95]])


def standin_eps(x_in: torch.Tensor, t) -> torch.Tensor:
    """A fixed nonlinear "UNet": mixes channels and space, depends on the timestep ``t``."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000.0
    mixed = torch.einsum("oc,bchw->bohw", _MIX, x_in)
    spatial = 0.25 * (x_in.roll(1, dims=-1) + x_in.roll(-1, dims=-2))
    return torch.tanh(mixed * (0.6 + 0.5 * t)) + 0.3 * torch.sin(2.0 * x_in + 3.0 * t) + 0.2 * spatial * t


def diffusers_run(variant, steps, strength, noise, x0=None, step_noises=None, generator=None):
    """diffusers' pipeline loop on the hub scheduler. Returns the latent entering each step, each
    ``pred_original_sample``, the timesteps the denoiser saw, the final latent and, when noise is
    injected, how many times ``step`` drew noise."""
    scheduler = diffusers_scheduler(variant)
    scheduler.set_timesteps(steps, device="cpu")
    if x0 is None:  # txt2img: StableDiffusion(XL)Pipeline.prepare_latents
        assert strength == 1.0
        timesteps = scheduler.timesteps
        latents = noise * scheduler.init_noise_sigma
    else:  # img2img: get_timesteps + prepare_latents -> add_noise at timesteps[:1]
        timesteps, _, _ = diffusers_img2img_timesteps(scheduler, variant, steps, strength)
        latents = scheduler.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    xs, x0s, seen = [], [], []
    ctx = inject_ancestral_noise(step_noises) if step_noises is not None else contextlib.nullcontext()
    with ctx as draws_log:
        for t in timesteps:
            xs.append(latents)
            x_in = scheduler.scale_model_input(latents, t)
            seen.append(int(t))
            eps = standin_eps(x_in, t)
            out = scheduler.step(eps, t, latents, generator=generator)
            latents = out.prev_sample
            x0s.append(out.pred_original_sample)
        draws = list(draws_log or [])
    return {"xs": xs, "x0s": x0s, "seen": seen, "final": latents, "draws": len(draws)}


def make_sigma_source(source):
    """(sigma-of-timestep fn, sigma_max, model(x, sigma) wrapper, list of timesteps seen) for our side.

    "comfy": ComfyUI's SDXL ``model_sampling`` does the conversions, as in ``BaseModel._apply_model``.
    "scaled_linear": ``samplers.scaled_linear_sigmas()`` and the same formulas written out.
    """
    seen = []
    if source == "comfy":
        ms = comfy_model_sampling("sdxl")

        def model(x, sigma, **_):
            xc = ms.calculate_input(sigma, x)
            t = ms.timestep(sigma).float()
            seen.append(int(t[0]))
            return ms.calculate_denoised(sigma, standin_eps(xc, t), x)

        return ms.sigma, float(ms.sigma_max), model, seen

    if source == "diffusers-table":  # the scheduler's own fp32 table: isolates the step arithmetic
        scheduler = diffusers_scheduler("sdxl-turbo")
        table = (((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5).float()
    else:
        table = samplers.scaled_linear_sigmas()
    log_table = table.log().float()

    def model(x, sigma, **_):
        s = sigma.reshape(-1, 1, 1, 1)
        xc = x / (s ** 2 + 1) ** 0.5
        t = (sigma.log().float()[None, :] - log_table[:, None]).abs().argmin(0)  # nearest table entry
        seen.append(int(t[0]))
        return x - standin_eps(xc, t) * s

    return (lambda t: table[t.long()]), float(table[-1]), model, seen


def ours_run(variant_eta, steps, strength, noise, source, x0=None, step_noises=None, seed=None):
    _, eta = variant_eta
    sigma_fn, sigma_max, model, seen = make_sigma_source(source)
    sigmas = samplers.turbo_sigmas(sigma_fn, steps, strength, "trailing")
    # The pack's default noise_scale "diffusers": unit noise times sigmas[0] (tests below prove it).
    scale = float(sigmas[0])
    x = noise * scale if x0 is None else x0 + noise * scale
    xs, x0s = [], []

    def callback(d):
        xs.append(d["x"])
        x0s.append(d["denoised"])

    calls = []
    noise_sampler = None
    if step_noises is not None:
        def noise_sampler(sigma, sigma_next):
            calls.append((float(sigma), float(sigma_next)))
            return step_noises[len(calls) - 1]

    extra_args = {} if seed is None else {"seed": seed}
    final = samplers.sample_turbo_euler(model, x, sigmas, extra_args=extra_args, callback=callback,
                                        disable=True, eta=eta, s_noise=1.0, noise_sampler=noise_sampler)
    return {"xs": xs, "x0s": x0s, "seen": seen, "final": final, "draws": len(calls), "sigmas": sigmas}


def _scaled(a, b):
    """max|a - b| / max(1, max|b|): absolute error on O(1) tensors, relative to the latent's scale on
    the txt2img start latents (|x| up to ~60 at sigma_max 14.6, where one fp32 ulp is ~4e-6)."""
    return max_abs(a, b) / max(1.0, b.abs().max().item())


def _compare(ours, ref):
    """Errors over every latent entering a step, every predicted x0 and the final latent."""
    assert ours["seen"] == ref["seen"], "the denoiser saw different timesteps"
    assert len(ours["xs"]) == len(ref["xs"]) == len(ref["seen"])
    pairs = list(zip(ours["xs"], ref["xs"])) + list(zip(ours["x0s"], ref["x0s"])) + [(ours["final"], ref["final"])]
    parts = {
        "max_abs_latents": max(max_abs(a, b) for a, b in zip(ours["xs"], ref["xs"])),
        "max_abs_denoised": max(max_abs(a, b) for a, b in zip(ours["x0s"], ref["x0s"])),
        "max_abs_final": max_abs(ours["final"], ref["final"]),
        "max_abs": max(max_abs(a, b) for a, b in pairs),
    }
    return max(_scaled(a, b) for a, b in pairs), parts


SOURCES = ["diffusers-table", "comfy", "scaled_linear"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("variant_eta", SAMPLERS, ids=["euler_a-vs-sdxl-turbo", "euler-vs-sd-turbo"])
@pytest.mark.parametrize("steps,strength", CASES, ids=[f"N{n}-s{s}" for n, s in CASES])
def test_trajectory_matches_diffusers(variant_eta, steps, strength, source, parity_record):
    """Every latent entering a step, every predicted x0 and the final latent agree within 1e-5.

    ``source`` is where our sigmas come from: ``"comfy"`` (ComfyUI's SDXL ``model_sampling``, what the
    nodes use), ``"scaled_linear"`` (``samplers.scaled_linear_sigmas``), or ``"diffusers-table"``
    (the scheduler's own fp32 sigma table, which isolates the step arithmetic: there the plain max-abs
    error must be within 1e-5 too). The three tables differ by < 1e-6 relative (test_parity_schedule),
    which at |x| ~ 60 is ~2e-5 absolute, hence the scale-relative measure for the other two.
    """
    variant, eta = variant_eta
    gen = torch.Generator().manual_seed(1000 * steps + int(100 * strength) + int(eta))
    noise = torch.randn(SHAPE, generator=gen)
    x0 = None if strength == 1.0 else torch.randn(SHAPE, generator=gen) * 0.8  # an "encoded image"
    n_eff = samplers.effective_steps(steps, strength)
    step_noises = [torch.randn(SHAPE, generator=gen) for _ in range(n_eff)]

    ref = diffusers_run(variant, steps, strength, noise, x0, step_noises if eta else None)
    ours = ours_run(variant_eta, steps, strength, noise, source, x0, step_noises)
    err, parts = _compare(ours, ref)
    assert ours["seen"] == samplers.turbo_timesteps(steps, strength)
    if eta:
        assert ref["draws"] == n_eff  # diffusers draws every step ...
        assert ours["draws"] == n_eff - 1  # ... we skip the last one, where sigma_up == 0
    else:
        assert ours["draws"] == 0
    mode = "txt2img" if x0 is None else "img2img"
    parity_record(f"trajectory/{'euler_a' if eta else 'euler'}-vs-{variant}/{mode}/N{steps}-s{strength}/{source}",
                  err, TOL, metric="max_abs/max(1,ref_max)", **parts)
    assert err <= TOL, parts
    if source == "diffusers-table":
        assert parts["max_abs"] <= TOL, parts


def test_trajectory_noise_actually_matters():
    """Guard for the test above: with other ancestral noise the sdxl-turbo trajectory moves by far more
    than the tolerance, so injected noise is really being compared."""
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(SHAPE, generator=gen)
    a = [torch.randn(SHAPE, generator=gen) for _ in range(3)]
    b = [torch.randn(SHAPE, generator=gen) for _ in range(3)]
    ref = diffusers_run("sdxl-turbo", 3, 1.0, noise, None, a)
    ours = ours_run(SAMPLERS[0], 3, 1.0, noise, "comfy", None, b)
    assert max_abs(ours["final"], ref["final"]) > 1e-2


@pytest.mark.parametrize("steps", [2, 4])
def test_default_seeded_noise_equals_diffusers_generator(steps, parity_record):
    """No injection: ``extra_args={"seed": s}`` (``samplers.seeded_noise_sampler``) draws the same
    ancestral noise as diffusers' ``step(..., generator=torch.Generator().manual_seed(s + 1))``."""
    seed = 1234
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    ref = diffusers_run("sdxl-turbo", steps, 1.0, noise, generator=torch.Generator().manual_seed(seed + 1))
    ours = ours_run(SAMPLERS[0], steps, 1.0, noise, "comfy", seed=seed)
    err, parts = _compare(ours, ref)
    parity_record(f"trajectory/euler_a-vs-sdxl-turbo/seeded-generator/N{steps}", err, TOL,
                  metric="max_abs/max(1,ref_max)", **parts)
    assert err <= TOL, parts


# ---------------------------------------------------------------------------------------------
# Initial noise scale
# ---------------------------------------------------------------------------------------------
def pack_initial_latent(noise_scale: str, ms, sigmas, noise, latent):
    """The first latent of the pack's sampler: ComfyUI's ``KSAMPLER.sample`` calls
    ``model_sampling.noise_scaling(sigmas[0], noise, latent, self.max_denoise(model_wrap, sigmas))``,
    and Turbo Sampler's ``TurboKSAMPLER`` decides ``max_denoise`` from its ``noise_scale`` input."""
    ksampler = load_repo_module("nodes/sampler.py").TurboKSAMPLER(noise_scale=noise_scale)
    model_wrap = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms))
    return ms.noise_scaling(sigmas[0], noise.clone(), latent.clone(), ksampler.max_denoise(model_wrap, sigmas))


@pytest.mark.parametrize("variant", ["sdxl-turbo", "sd-turbo"])
def test_initial_noise_scale_diffusers_mode(variant, parity_record):
    """``noise_scale="diffusers"`` (the default) starts from ``scheduler.init_noise_sigma`` times the noise
    for txt2img, and from the sigma ``scheduler.add_noise`` applies at ``timesteps[:1]`` for img2img."""
    ms = comfy_model_sampling("sdxl" if variant == "sdxl-turbo" else "sd20")
    worst = 0.0
    for steps, strength in CASES:
        scheduler = diffusers_scheduler(variant)
        scheduler.set_timesteps(steps)
        sigmas = samplers.turbo_sigmas(ms.sigma, steps, strength)
        ours = float(pack_initial_latent("diffusers", ms, sigmas, torch.ones(1), torch.zeros(1)))
        if strength == 1.0:
            ref = float(scheduler.init_noise_sigma)
        else:
            timesteps, _, _ = diffusers_img2img_timesteps(scheduler, variant, steps, strength)
            ref = float(scheduler.add_noise(torch.zeros(1), torch.ones(1), timesteps[:1]))
        err = abs(ours - ref) / ref
        assert err <= 1e-5, (steps, strength, ours, ref)
        worst = max(worst, err)
    parity_record(f"initial_noise_scale/diffusers/{variant}", worst, 1e-5, metric="max_rel")


@pytest.mark.parametrize("family", ["sd20", "sdxl"])
def test_initial_noise_scale_comfy_mode_is_comfy_noise_scaling(family, parity_record):
    """``noise_scale="comfy"`` is core KSampler's start exactly, with ``max_denoise`` as
    ``KSAMPLER.sample`` computes it (``Sampler.max_denoise``): ``sqrt(1 + sigma^2)`` times the noise when
    the schedule starts at sigma_max (txt2img), else ``sigma``; and it differs from "diffusers" only there."""
    import comfy.samplers

    ms = comfy_model_sampling(family)
    model_wrap = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms))
    gen = torch.Generator().manual_seed(3)
    worst = 0.0
    for steps, strength in CASES:
        sigmas = samplers.turbo_sigmas(ms.sigma, steps, strength)
        noise = torch.randn(SHAPE, generator=gen)
        latent = torch.randn(SHAPE, generator=gen) if strength < 1 else torch.zeros(SHAPE)
        max_denoise = comfy.samplers.Sampler().max_denoise(model_wrap, sigmas)
        assert max_denoise == (strength == 1.0)
        ref = ms.noise_scaling(sigmas[0], noise.clone(), latent.clone(), max_denoise)
        comfy_start = pack_initial_latent("comfy", ms, sigmas, noise, latent)
        diffusers_start = pack_initial_latent("diffusers", ms, sigmas, noise, latent)
        err = max_abs(comfy_start, ref)
        assert err <= TOL, (steps, strength, err)
        worst = max(worst, err)
        if max_denoise:  # txt2img: ComfyUI adds ~0.23% more noise than diffusers at sigma_max 14.6
            ratio = float((comfy_start / diffusers_start).mean())
            assert math.isclose(ratio, math.sqrt(1 + float(sigmas[0]) ** -2), rel_tol=1e-5)
            assert 1.002 < ratio < 1.003
        else:
            assert torch.equal(comfy_start, diffusers_start)
    parity_record(f"initial_noise_scale/comfy/{family}", worst, TOL)


def test_comfy_noise_scale_changes_the_result():
    """The two initial-noise conventions give visibly different txt2img results (so the option
    matters): starting from ``sqrt(1+sigma^2)`` noise instead of ``sigma`` noise."""
    ms = comfy_model_sampling("sdxl")
    sigmas = samplers.turbo_sigmas(ms.sigma, 1, 1.0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    start_a = pack_initial_latent("comfy", ms, sigmas, noise, torch.zeros(SHAPE))
    start_b = pack_initial_latent("diffusers", ms, sigmas, noise, torch.zeros(SHAPE))
    _, _, model, _ = make_sigma_source("comfy")
    out_a = samplers.sample_turbo_euler(model, start_a, sigmas, disable=True, eta=1.0)
    out_b = samplers.sample_turbo_euler(model, start_b, sigmas, disable=True, eta=1.0)
    assert max_rel(start_a, start_b) > 2e-3
    assert max_abs(out_a, out_b) > 1e-3
