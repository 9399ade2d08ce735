"""Model-level parity: the same checkpoint, sampled by our nodes inside ComfyUI and by diffusers.

One generated random-weight checkpoint (``tests/fixtures/make_models.py``) is loaded twice:

* through our loader (``nodes/loader.py`` ``load_turbo_checkpoint``, i.e. ComfyUI's
  ``comfy.sd.load_state_dict_guess_config`` plus forced epsilon prediction) and sampled with our
  scheduler (``turbo_model_sigmas``) and sampler (``turbo_sample``, or ComfyUI's ``CFGGuider`` with our
  ``TurboKSAMPLER``) through ComfyUI's own sampling machinery;
* into diffusers' ``UNet2DConditionModel``, built from the UNet config ComfyUI detected, with the
  weights renamed from the LDM layout by ComfyUI's ``comfy.utils.unet_to_diffusers`` map, and sampled
  with diffusers' scheduler loop (``scale_model_input`` -> UNet -> ``scheduler.step``), as in
  ``StableDiffusionPipeline.__call__`` / ``StableDiffusionXLPipeline.__call__`` and their img2img
  variants (``get_timesteps`` + ``scheduler.add_noise``).

Both get identical conditioning tensors (random cross-attention context; for SDXL also the pooled
``text_embeds`` and ``time_ids`` (512, 512, 0, 0, 512, 512), given to ComfyUI as the conditioning keys
width/height/crop_w/crop_h/target_width/target_height) and identical noise. ComfyUI's LATENT is the
VAE-space latent (``process_latent_out`` divides by the latent format's ``scale_factor``), diffusers'
loop runs on ``latent * scaling_factor``; we compare in the sampler's space (ComfyUI output times
``scale_factor``), and also record the error in VAE-input space.
"""
from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import types

import pytest
import torch

from parity_helpers import (
    REPO_ROOT,
    SIZE_COND,
    TIME_IDS,
    comfyui_path,
    diffusers_img2img_timesteps,
    diffusers_scheduler,
    diffusers_unet_from_comfy_config,
    fixtures_dir,
    inject_ancestral_noise,
    load_repo_module,
    max_abs,
    parity_record,  # noqa: F401  (pytest fixture)
    setup_comfyui,
)

setup_comfyui()

import samplers  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TOL = 1e-3  # max-abs, fp32, CPU, in the sampler's latent space
LATENT = 16  # 16x16 latents (128x128 images)
SEED = 20240
CHECKPOINTS = {"sd-turbo": "sd-turbo-tiny", "sdxl-turbo": "sdxl-turbo-tiny"}


# ---------------------------------------------------------------------------------------------
# Fixtures: checkpoints, both loads
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_paths():
    """The two tiny Turbo checkpoints, generated once (cached) by tests/fixtures/make_models.py."""
    out = fixtures_dir()
    subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "fixtures" / "make_models.py"),
                    "--comfyui", str(comfyui_path()), "--out", str(out), "--only", "sd-turbo", "sdxl-turbo"],
                   check=True, stdout=subprocess.DEVNULL)
    return {variant: out / "checkpoints" / f"{name}.safetensors" for variant, name in CHECKPOINTS.items()}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def pair(request, checkpoint_paths):
    """(our ComfyUI-side checkpoint, diffusers UNet) for one variant; freed after its tests."""
    import comfy.model_management
    import comfy.model_sampling
    import comfy.utils

    variant = request.param
    loader = load_repo_module("nodes/loader.py")
    ckpt = loader.load_turbo_checkpoint(str(checkpoint_paths[variant]), "fp32")
    assert ckpt.variant == variant
    base = ckpt.model.model
    assert isinstance(base.model_sampling, comfy.model_sampling.EPS)
    assert not isinstance(base.model_sampling, comfy.model_sampling.V_PREDICTION)
    assert base.get_dtype() == torch.float32
    ckpt.clip = ckpt.vae = None  # not needed here; frees the text encoders
    sd = comfy.utils.load_torch_file(str(checkpoint_paths[variant]), safe_load=True)
    prefix = "model.diffusion_model."
    ldm = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    del sd
    unet = diffusers_unet_from_comfy_config(base.model_config.unet_config, ldm)
    del ldm
    gc.collect()
    context_dim = base.model_config.unet_config["context_dim"]
    gen = torch.Generator().manual_seed(99)
    cond = {
        "context": torch.randn(1, 77, context_dim, generator=gen),
        "pooled": torch.randn(1, 1280, generator=gen) if variant == "sdxl-turbo" else None,
    }
    yield types.SimpleNamespace(variant=variant, ckpt=ckpt, unet=unet, cond=cond,
                                scale_factor=float(base.latent_format.scale_factor))
    del ckpt, unet
    comfy.model_management.unload_all_models()
    comfy.model_management.cleanup_models()
    gc.collect()


# ---------------------------------------------------------------------------------------------
# The two samplers
# ---------------------------------------------------------------------------------------------
def comfy_positive(p):
    """ComfyUI CONDITIONING carrying exactly the tensors diffusers gets."""
    opts = {}
    if p.cond["pooled"] is not None:
        opts = {"pooled_output": p.cond["pooled"], **SIZE_COND}
    return [[p.cond["context"], opts]]


def diffusers_eps(p, x_in, t):
    kwargs = {}
    if p.cond["pooled"] is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": p.cond["pooled"],
                                       "time_ids": torch.tensor([TIME_IDS], dtype=torch.float32)}
    return p.unet(x_in, t, encoder_hidden_states=p.cond["context"], **kwargs).sample


@torch.no_grad()
def diffusers_sample(p, steps, strength, noise, x0=None, generator=None, step_noises=None, comfy_start=False):
    """diffusers' pipeline loop; returns the final latent (scaled space) and the timesteps run.

    ``comfy_start``: start txt2img from ComfyUI's default ``noise * sqrt(1 + init_noise_sigma^2)``
    instead of the pipeline's ``noise * init_noise_sigma``."""
    scheduler = diffusers_scheduler(p.variant)
    scheduler.set_timesteps(steps, device="cpu")
    if x0 is None:
        timesteps = scheduler.timesteps
        scale = scheduler.init_noise_sigma
        latents = noise * ((scale ** 2 + 1) ** 0.5 if comfy_start else scale)
    else:
        timesteps, _, _ = diffusers_img2img_timesteps(scheduler, p.variant, steps, strength)
        latents = scheduler.add_noise(x0, noise, timesteps[:1])
    ctx = inject_ancestral_noise(step_noises) if step_noises is not None else contextlib.nullcontext()
    with ctx:
        for t in timesteps:
            x_in = scheduler.scale_model_input(latents, t)
            eps = diffusers_eps(p, x_in, t)
            latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
    return latents, [int(t) for t in timesteps]


def eta_of(variant):
    return 1.0 if variant == "sdxl-turbo" else 0.0  # sdxl-turbo: Euler ancestral; sd-turbo: Euler


def _record(parity_record, p, case, ours_vae_space, ref_scaled, **details):
    ours_scaled = ours_vae_space * p.scale_factor
    err = max_abs(ours_scaled, ref_scaled)
    err_vae = max_abs(ours_vae_space, ref_scaled / p.scale_factor)
    parity_record(case, err, TOL, max_abs_vae_space=err_vae, scale_factor=p.scale_factor,
                  ref_max=ref_scaled.abs().max().item(), **details)
    assert torch.isfinite(ref_scaled).all()
    assert err <= TOL, (case, err)
    return err


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_single_denoiser_call_matches(pair, parity_record):
    """One UNet evaluation through ComfyUI (``BaseModel.apply_model``: ``calculate_input`` ->
    diffusion_model(timestep) -> ``calculate_denoised``) equals diffusers' ``scale_model_input`` ->
    UNet -> ``x - sigma * eps``, at the first and last sdxl-turbo 4-step timesteps."""
    p = pair
    base = p.ckpt.model.model
    ms = base.model_sampling
    gen = torch.Generator().manual_seed(5)
    extra = {}
    if p.cond["pooled"] is not None:
        extra["y"] = base.encode_adm(pooled_output=p.cond["pooled"], **SIZE_COND)
    worst = 0.0
    for t in (999, 249):
        sigma = ms.sigma(torch.tensor([float(t)]))
        x = torch.randn(1, 4, LATENT, LATENT, generator=gen) * float(sigma)
        ours = base.apply_model(x, sigma, c_crossattn=p.cond["context"], **extra)
        eps = diffusers_eps(p, x / (sigma ** 2 + 1) ** 0.5, torch.tensor(float(t)))
        ref = x - sigma.reshape(1, 1, 1, 1) * eps
        worst = max(worst, max_abs(ours, ref))
    parity_record(f"model/{p.variant}/single-call", worst, TOL)
    assert worst <= TOL


@pytest.mark.parametrize("steps", [1, 2])
def test_turbo_sample_txt2img_matches_diffusers(pair, steps, parity_record):
    """txt2img through our nodes' plain functions (``turbo_model_sigmas`` + ``turbo_sample``, which runs
    ComfyUI's CFGGuider -> our TurboKSAMPLER) equals diffusers' loop on the hub scheduler.

    Noise is shared by construction: the initial noise is ComfyUI's ``comfy.sample.prepare_noise(latent,
    seed)`` (fed to diffusers as its ``randn`` latents), and the ancestral noise of our default
    ``seeded_noise_sampler`` is ``torch.Generator().manual_seed(seed + 1)``, the generator handed to
    diffusers' ``scheduler.step``.
    """
    import comfy.sample

    p = pair
    scheduler_mod = load_repo_module("nodes/scheduler.py")
    sampler_mod = load_repo_module("nodes/sampler.py")
    sigmas = scheduler_mod.turbo_model_sigmas(p.ckpt.model, steps, 1.0, "trailing")
    latent = {"samples": torch.zeros(1, 4, LATENT, LATENT)}
    out = sampler_mod.turbo_sample(p.ckpt.model, comfy_positive(p), latent, sigmas, SEED,
                                   eta=eta_of(p.variant), s_noise=1.0, noise_scale="diffusers")["samples"]
    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    ref, ts = diffusers_sample(p, steps, 1.0, noise, generator=torch.Generator().manual_seed(SEED + 1))
    assert ts == samplers.turbo_timesteps(steps)
    _record(parity_record, p, f"model/{p.variant}/{'euler_a' if eta_of(p.variant) else 'euler'}/txt2img/N{steps}",
            out, ref, steps=steps, path="turbo_sample(seed)")


def test_turbo_sample_comfy_noise_scale(pair, parity_record):
    """``noise_scale="comfy"`` starts from ComfyUI's ``sqrt(1 + sigma_max^2)`` noise: equal to diffusers'
    loop started from that latent, and measurably different from the reference start."""
    import comfy.sample

    p = pair
    scheduler_mod = load_repo_module("nodes/scheduler.py")
    sampler_mod = load_repo_module("nodes/sampler.py")
    sigmas = scheduler_mod.turbo_model_sigmas(p.ckpt.model, 1)
    latent = {"samples": torch.zeros(1, 4, LATENT, LATENT)}
    out = sampler_mod.turbo_sample(p.ckpt.model, comfy_positive(p), latent, sigmas, SEED,
                                   eta=eta_of(p.variant), noise_scale="comfy")["samples"]
    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    ref, _ = diffusers_sample(p, 1, 1.0, noise, comfy_start=True)
    reference_start, _ = diffusers_sample(p, 1, 1.0, noise)
    assert max_abs(out * p.scale_factor, reference_start) > 10 * TOL
    _record(parity_record, p, f"model/{p.variant}/noise_scale=comfy/txt2img/N1", out, ref,
            path="turbo_sample(noise_scale='comfy')")


@pytest.mark.parametrize("steps,strength", [(2, 0.5), (4, 0.5)])
def test_turbo_sample_img2img_matches_diffusers(pair, steps, strength, parity_record):
    """img2img: ComfyUI LATENT ``x0 / scale_factor`` (what VAE Encode gives) with strength on our
    scheduler equals diffusers' ``get_timesteps`` + ``add_noise(x0, noise, timesteps[:1])`` loop."""
    import comfy.sample

    p = pair
    scheduler_mod = load_repo_module("nodes/scheduler.py")
    sampler_mod = load_repo_module("nodes/sampler.py")
    x0_scaled = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(11)) * 0.9
    latent = {"samples": x0_scaled / p.scale_factor}
    sigmas = scheduler_mod.turbo_model_sigmas(p.ckpt.model, steps, strength, "trailing")
    out = sampler_mod.turbo_sample(p.ckpt.model, comfy_positive(p), latent, sigmas, SEED,
                                   eta=eta_of(p.variant))["samples"]
    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    ref, ts = diffusers_sample(p, steps, strength, noise, x0=x0_scaled,
                               generator=torch.Generator().manual_seed(SEED + 1))
    assert ts == samplers.turbo_timesteps(steps, strength)
    _record(parity_record, p,
            f"model/{p.variant}/{'euler_a' if eta_of(p.variant) else 'euler'}/img2img/N{steps}-s{strength}",
            out, ref, steps=steps, strength=strength, path="turbo_sample(seed)")


@pytest.mark.parametrize("steps", [2, 3])
def test_guider_with_injected_noise_matches_diffusers(pair, steps, parity_record):
    """Euler ancestral with explicitly injected noise tensors, through ComfyUI's ``CFGGuider`` (cfg 1,
    positive only) and our ``TurboKSAMPLER`` (its ``extra_options`` carry the ``noise_sampler``, which
    KSAMPLER.sample passes on to ``sample_turbo_euler``); diffusers gets the same tensors through
    :func:`parity_helpers.inject_ancestral_noise`. Run on both models with eta=1 and the sdxl-turbo
    scheduler (EulerAncestralDiscreteScheduler)."""
    import comfy.samplers

    p = pair
    scheduler_mod = load_repo_module("nodes/scheduler.py")
    sampler_mod = load_repo_module("nodes/sampler.py")
    gen = torch.Generator().manual_seed(123 + steps)
    noise = torch.randn(1, 4, LATENT, LATENT, generator=gen)
    step_noises = [torch.randn(1, 4, LATENT, LATENT, generator=gen) for _ in range(steps)]
    drawn = []

    def noise_sampler(sigma, sigma_next):
        drawn.append(float(sigma_next))
        return step_noises[len(drawn) - 1]

    sampler = sampler_mod.TurboKSAMPLER(eta=1.0, s_noise=1.0, noise_scale="diffusers")
    sampler.extra_options = {**sampler.extra_options, "noise_sampler": noise_sampler}
    sigmas = scheduler_mod.turbo_model_sigmas(p.ckpt.model, steps)
    guider = comfy.samplers.CFGGuider(p.ckpt.model)
    guider.inner_set_conds({"positive": comfy_positive(p)})
    guider.set_cfg(1.0)
    out = guider.sample(noise, torch.zeros_like(noise), sampler, sigmas, disable_pbar=True, seed=SEED)
    assert len(drawn) == steps - 1

    with_euler_a = types.SimpleNamespace(**{**vars(p), "variant": "sdxl-turbo"})
    ref, _ = diffusers_sample(with_euler_a, steps, 1.0, noise, step_noises=step_noises)
    _record(parity_record, p, f"model/{p.variant}/euler_a-injected/txt2img/N{steps}", out, ref,
            steps=steps, path="CFGGuider+TurboKSAMPLER(noise_sampler)")
