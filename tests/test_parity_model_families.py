"""Model-level family parity (issue 20, part 4): each few-step family's final latent through a real
random-weight network, ours inside ComfyUI against diffusers, to 1e-3.

Ours is the pack's node path: ``nodes/families.py`` ``family_outputs(model, family, steps, strength, gamma)``
(Turbo Family Schedule: MODEL, SIGMAS, SAMPLER) run through ComfyUI's own ``comfy.sample.sample_custom``
(what SamplerCustom does) at cfg 1.0, the noise ``comfy.sample.prepare_noise(latent, seed)``. The reference
is the family's diffusers scheduler configured as its authors do (``parity_helpers.family_reference``, the
one tests/test_parity_families.py checks schedule by schedule), with the reference pipeline's timestep
selection (``family_reference_timesteps``) and initial latent: ``noise * init_noise_sigma`` (unit noise for
LCM / TCD / DDIM, ``noise * sigma_max`` for Euler), ``add_noise`` for image-to-image; flow: the noise
itself, ``scale_noise`` for image-to-image. The loop is the pipeline's: ``scale_model_input`` -> network ->
``scheduler.step(..., generator, **step_kwargs)``.

Networks, with the same weights on both sides:

* VP families: the SDXL stand-in ``sdxl-turbo-tiny`` (tests/fixtures/make_models.py), its UNet loaded by
  ComfyUI's ``comfy.sd.load_state_dict_guess_config`` (what Load Turbo Checkpoint calls; the text encoders
  are not needed, and reading them would cost the suite ~20 s), and diffusers' ``UNet2DConditionModel``
  built from ComfyUI's detected config with the weights renamed by ``comfy.utils.unet_to_diffusers``
  (``parity_helpers.diffusers_unet_from_comfy_config``, as tests/test_parity_model.py).
* Flow families: a tiny random-weight SD3 (MMDiT, 1 joint block) and FLUX.1-schnell (1 double + 1 single
  block, no guidance embedding) built in-process from ComfyUI's own model configs, and diffusers'
  ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` of the same shape, the weights renamed by ComfyUI's
  ``comfy.utils.mmdit_to_diffusers`` / ``flux_to_diffusers`` maps (fused qkv split, scale/shift swapped);
  every diffusers parameter must come from the map and every ComfyUI parameter must be used. The Flux
  stand-in has ``mlp_ratio`` 4 (tests/test_families_nodes.py's has 2): diffusers' Flux blocks hard-code 4.

Conditioning is random tensors of the right shapes, given to both sides (SDXL: context, pooled
``text_embeds`` and ``time_ids`` = ComfyUI's width/height/crop/target keys).

Noise: the initial noise is shared by construction; the step noise of LCM and TCD (gamma > 0) is our
sampler's default ``torch.Generator().manual_seed(seed + 1)`` (``samplers/euler.py``
``seeded_noise_sampler``), the generator handed to diffusers' ``scheduler.step`` (tests/test_parity_families.py
``test_default_seeded_noise_equals_diffusers_generator`` shows the draws agree); a guard below shows the step
noise matters at this tolerance.

Compared in the sampler's space: ComfyUI's LATENT through ``process_latent_in`` (VP: times
``scale_factor``; SD3 / Flux: ``(x - shift_factor) * scale_factor``) against diffusers' final latent (for
DDIM and TCD the DDPM-space latent diffusers decodes). The guards: one timestep off in the reference's
schedule, or other step noise, moves the result far beyond the tolerance.
"""
from __future__ import annotations

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
    diffusers_unet_from_comfy_config,
    family_reference,
    family_reference_timesteps,
    fixtures_dir,
    load_repo_module,
    max_abs,
    parity_record,  # noqa: F401  (pytest fixture)
    setup_comfyui,
)

setup_comfyui()

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TOL = 1e-3     # max-abs, fp32, CPU, in the sampler's latent space
LATENT = 8     # 8x8 latents (64x64 images)
SEED = 20240
SD3, FLUX = "sd3", "flux"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as tests/test_fastpath.py: on a shared 2-core machine a UNet call here takes ~0.4 s
    with one and 2-4 s with two. Both sides run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _quiet_diffusers():
    """DMD2's and Hyper-SD's custom timesteps are off the LCM grid: diffusers warns on each set_timesteps."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------
# The SDXL stand-in, both sides
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl():
    """sdxl-turbo-tiny's UNet in ComfyUI and in diffusers, and one set of conditioning tensors."""
    import comfy.model_management
    import comfy.sd
    import safetensors

    out = fixtures_dir()
    subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "fixtures" / "make_models.py"),
                    "--comfyui", str(comfyui_path()), "--out", str(out), "--only", "sdxl-turbo"],
                   check=True, stdout=subprocess.DEVNULL)
    prefix = "model.diffusion_model."
    with safetensors.safe_open(str(out / "checkpoints" / "sdxl-turbo-tiny.safetensors"), "pt") as f:
        unet_sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    ldm = {k[len(prefix):]: v for k, v in unet_sd.items()}  # ComfyUI's loader pops what it loads
    model = comfy.sd.load_state_dict_guess_config(unet_sd, output_vae=False, output_clip=False)[0]
    base = model.model
    assert type(base.model_config).__name__ == "SDXL" and base.get_dtype() == torch.float32
    unet = diffusers_unet_from_comfy_config(base.model_config.unet_config, ldm)
    del unet_sd, ldm
    gc.collect()
    gen = torch.Generator().manual_seed(99)
    context = torch.randn(1, 77, base.model_config.unet_config["context_dim"], generator=gen)
    pooled = torch.randn(1, 1280, generator=gen)
    yield types.SimpleNamespace(model=model, unet=unet, context=context, pooled=pooled,
                                positive=[[context, {"pooled_output": pooled, **SIZE_COND}]],
                                scale_factor=float(base.latent_format.scale_factor))
    del model, unet
    comfy.model_management.unload_all_models()
    comfy.model_management.cleanup_models()
    gc.collect()


def ours(p, family, steps, strength=1.0, gamma=-1.0, latent=None):
    """The node path: Turbo Family Schedule's (MODEL, SIGMAS, SAMPLER) through ComfyUI's sample_custom
    (SamplerCustom, cfg 1). Returns (final latent in the sampler's space, the initial noise, SIGMAS)."""
    import comfy.sample

    fam_nodes = load_repo_module("nodes/families.py")
    model, sigmas, sampler = fam_nodes.family_outputs(p.model, family, steps, strength, gamma)
    channels = p.model.get_model_object("latent_format").latent_channels
    latent = torch.zeros(1, channels, LATENT, LATENT) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, SEED)
    with torch.no_grad():
        out = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, p.positive, p.positive, latent,
                                         seed=SEED, disable_pbar=True)
    return p.model.model.process_latent_in(out), noise, sigmas


def reference(family, steps, strength, noise, network, x0=None, gamma=None, edit_timesteps=None, late_flow=False):
    """The reference pipeline's loop on ``network(x_in, t)``. For the guards: ``edit_timesteps`` replaces the
    VP timesteps the pipeline would run; ``late_flow`` runs a flow schedule one timestep late (every sigma
    but the final 0 lowered by 1/1000, the timesteps with them). Returns (final latent, timesteps run)."""
    ref = family_reference(family, steps, gamma)
    scheduler = ref.scheduler
    if edit_timesteps is not None:
        ref.set_timesteps = {"num_inference_steps": None, "timesteps": edit_timesteps}
    timesteps, _ = family_reference_timesteps(ref, steps, strength, img2img=x0 is not None)
    flow = ref.pipeline != "sdxl"
    if late_flow:
        assert flow and x0 is None
        scheduler.sigmas = torch.cat([scheduler.sigmas[:-1] - 1e-3, scheduler.sigmas[-1:]])
        scheduler.timesteps = timesteps = scheduler.sigmas[:-1] * scheduler.config.num_train_timesteps
    if x0 is None:
        latents = noise if flow else noise * scheduler.init_noise_sigma
    elif flow:
        latents = scheduler.scale_noise(x0, timesteps[:1], noise)
    else:
        latents = scheduler.add_noise(x0, noise, timesteps[:1])
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for t in timesteps:
            x_in = latents if flow else scheduler.scale_model_input(latents, t)
            out = network(x_in, t)
            latents = scheduler.step(out, t, latents, generator=generator, **ref.step_kwargs).prev_sample
    return latents, [float(t) if flow else int(t) for t in timesteps]


def unet_network(p):
    def network(x_in, t):
        cond = {"text_embeds": p.pooled, "time_ids": torch.tensor([TIME_IDS], dtype=torch.float32)}
        return p.unet(x_in, t, encoder_hidden_states=p.context, added_cond_kwargs=cond).sample
    return network


def record(parity_record, case, ours_latent, ref_latent, **details):
    err = max_abs(ours_latent, ref_latent)
    parity_record(case, err, TOL, ref_max=ref_latent.abs().max().item(), **details)
    assert torch.isfinite(ref_latent).all()
    assert err <= TOL, (case, err)
    return err


# ---------------------------------------------------------------------------------------------
# VP families on the SDXL stand-in
# ---------------------------------------------------------------------------------------------
VP_CASES = [  # (family, steps, strength, gamma): every family, the 1-step references, an img2img per sampler kind
    ("sdxl-lightning", 1, 1.0, None),       # prediction_type="sample": ours patches the MODEL to x0
    ("sdxl-lightning", 2, 1.0, None),       # Euler trailing from noise * sigma_max
    ("sdxl-lightning", 4, 1.0, None),
    ("sdxl-lightning", 8, 1.0, None),       # 999, 874, ..., 124
    ("sdxl-lightning", 4, 0.5, None),       # img2img, Euler
    ("dmd2", 4, 1.0, None),                 # LCM at 999/749/499/249, unit noise, step noise
    ("dmd2", 1, 1.0, None),                 # t=399 from unit noise
    ("dmd2", 4, 0.5, None),                 # img2img, LCM
    ("hyper-sd", 4, 1.0, None),             # DDIM trailing
    ("hyper-sd", 8, 1.0, None),
    ("hyper-sd-1step-unet", 1, 1.0, None),  # LCM at t=800
    ("hyper-sd-unified", 1, 1.0, None),     # TCD, eta 1
    ("hyper-sd-unified", 4, 1.0, None),
    ("tcd", 4, 1.0, None),                  # TCD, gamma 0.3, step noise
    ("tcd", 4, 0.5, 0.7),                   # img2img, TCD
    ("lcm", 4, 1.0, None),                  # LCM on the 50-step grid: 999/759/499/259
    ("lcm", 2, 1.0, None),                  # 999/499
    ("pcm", 2, 1.0, None),                  # DDIM trailing
    ("pcm", 16, 1.0, None),                 # DDIM lands at t - 62 where the next call is at t - 63 (1000 % 16 != 0)
    ("pcm", 4, 0.5, None),                  # img2img, DDIM
]


def _vp_id(case):
    family, steps, strength, gamma = case
    return f"{family}-{'txt2img' if strength == 1.0 else 'img2img'}-N{steps}-s{strength}" + (
        "" if gamma is None else f"-g{gamma}")


_RUNS: dict = {}  # case -> our run, shared by the parity tests and the guards (each UNet call costs ~1 s here)


def _vp_run(p, family, steps, strength, gamma):
    key = (family, steps, strength, gamma)
    if key in _RUNS:
        return _RUNS[key]
    x0 = None
    latent = None
    if strength < 1.0:  # an "encoded image", as VAE Encode hands it to the sampler (VAE space)
        x0 = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(11)) * 0.9
        latent = x0 / p.scale_factor
    out, noise, sigmas = ours(p, family, steps, strength, -1.0 if gamma is None else gamma, latent)
    _RUNS[key] = out, noise, sigmas, x0
    return _RUNS[key]


@pytest.mark.parametrize("family,steps,strength,gamma", VP_CASES, ids=[_vp_id(c) for c in VP_CASES])
def test_vp_family_matches_diffusers(sdxl, family, steps, strength, gamma, parity_record):
    """The final latent of Turbo Family Schedule + SamplerCustom equals diffusers' pipeline loop on the
    family's scheduler, through the same SDXL UNet, within 1e-3."""
    out, noise, sigmas, x0 = _vp_run(sdxl, family, steps, strength, gamma)
    ref, timesteps = reference(family, steps, strength, noise, unet_network(sdxl), x0, gamma)
    sampling = sdxl.model.get_model_object("model_sampling")
    assert [int(sampling.timestep(s.reshape(1))) for s in sigmas[:-1]] == timesteps
    mode = "txt2img" if strength == 1.0 else "img2img"
    g = "" if gamma is None else f"-g{gamma}"
    record(parity_record, f"model/{family}/{mode}/N{steps}-s{strength}{g}", out, ref, family=family, steps=steps,
           strength=strength, timesteps=timesteps, path="family_outputs+sample_custom")


def test_vp_guards_one_timestep_off_and_other_noise(sdxl):
    """The comparison above resolves one timestep and the step noise: the reference run one timestep
    late (DMD2 1-step at 400 for 399; DMD2 4-step img2img at 500/250 for 499/249), or TCD with other step
    noise, lands far beyond the tolerance from ours. Reuses the parity runs above where they ran."""
    network = unet_network(sdxl)
    out, noise, _, _ = _vp_run(sdxl, "dmd2", 1, 1.0, None)
    late, _ = reference("dmd2", 1, 1.0, noise, network, edit_timesteps=[400])
    assert max_abs(out, late) > 10 * TOL, max_abs(out, late)

    out, noise, _, x0 = _vp_run(sdxl, "dmd2", 4, 0.5, None)
    late, ts = reference("dmd2", 4, 0.5, noise, network, x0, edit_timesteps=[1000 - 1, 750, 500, 250])
    assert ts == [500, 250]
    assert max_abs(out, late) > 10 * TOL, max_abs(out, late)

    import comfy.sample
    out, noise, _, x0 = _vp_run(sdxl, "tcd", 4, 0.5, 0.7)
    fam_nodes = load_repo_module("nodes/families.py")
    model, sigmas, sampler = fam_nodes.family_outputs(sdxl.model, "tcd", 4, 0.5, 0.7)
    with torch.no_grad():  # the same initial noise, other step noise (from seed + 1)
        moved = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, sdxl.positive, sdxl.positive,
                                           x0 / sdxl.scale_factor, seed=SEED + 7, disable_pbar=True)
    moved = sdxl.model.model.process_latent_in(moved)
    assert max_abs(moved, out) > 10 * TOL, max_abs(moved, out)


# ---------------------------------------------------------------------------------------------
# Flow families: tiny SD3 (MMDiT) and FLUX.1-schnell, both sides
# ---------------------------------------------------------------------------------------------
SD3_UNET_CONFIG = {  # ComfyUI's MMDiT: hidden 64 * depth, heads = depth (head size 64); the last block context_pre_only
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "pos_embed_scaling_factor": None,
    "pos_embed_max_size": 16, "num_patches": 256, "adm_in_channels": 32,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 64}}}
FLUX_UNET_CONFIG = {  # FLUX.1-schnell's layout (no guidance embedding); mlp_ratio 4, which diffusers' Flux blocks fix
    "image_model": "flux", "guidance_embed": False, "in_channels": 16, "out_channels": 16, "patch_size": 2,
    "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True}
FLOW_FAMILIES = {SD3: "sd3.5-large-turbo", FLUX: "flux.1-schnell"}
TEXT_TOKENS = 8


def tiny_comfy_flow_model(kind: str):
    """The tiny model in ComfyUI (``comfy.supported_models.SD3`` / ``FluxSchnell``: its flow model_sampling,
    shift 3 / 1), random weights (buffers too: MMDiT's pos_embed), as tests/test_families_nodes.py builds it."""
    import dataclasses

    import comfy.model_patcher
    import comfy.supported_models

    if kind == SD3:
        config = comfy.supported_models.SD3(dict(SD3_UNET_CONFIG))
    else:
        import comfy.ldm.flux.model

        unet_config = dict(FLUX_UNET_CONFIG)
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
            unet_config["txt_ids_dims"] = []   # as ComfyUI's detection gives FLUX.1 where the field exists
        config = comfy.supported_models.FluxSchnell(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0 if kind == SD3 else 1)
    with torch.no_grad():
        for t in list(model.diffusion_model.parameters()) + list(model.diffusion_model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=generator) * 0.1)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def diffusers_from_key_map(diffusers_model, key_map: dict, comfy_sd: dict):
    """Load ``comfy_sd`` into ``diffusers_model`` through one of ComfyUI's ``*_to_diffusers`` maps (diffusers
    key -> ComfyUI key; ``(key, (dim, start, length))``: a slice of a fused tensor; ``(key, None, fn)``: ``fn``
    applied, here swap_scale_shift, its own inverse). Every diffusers tensor must be mapped, every ComfyUI
    tensor used."""
    new_sd, used = {}, set()
    for name in diffusers_model.state_dict():
        target = key_map.get(name)
        assert target is not None, f"no ComfyUI key for diffusers' {name}"
        if isinstance(target, str):
            new_sd[name], key = comfy_sd[target], target
        elif target[1] is None:
            key = target[0]
            new_sd[name] = target[2](comfy_sd[key])
        else:
            key, (dim, start, length) = target
            new_sd[name] = comfy_sd[key].narrow(dim, start, length)
        used.add(key)
    unused = set(comfy_sd) - used
    assert not unused, sorted(unused)
    diffusers_model.load_state_dict({k: v.clone() for k, v in new_sd.items()}, strict=True)
    return diffusers_model.eval().requires_grad_(False)


def tiny_diffusers_flow_model(kind: str, comfy_model):
    import comfy.utils
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    sd = comfy_model.model.diffusion_model.state_dict()
    if kind == SD3:
        cfg = SD3_UNET_CONFIG
        model = SD3Transformer2DModel(
            sample_size=LATENT, patch_size=cfg["patch_size"], in_channels=cfg["in_channels"], num_layers=cfg["depth"],
            attention_head_dim=64, num_attention_heads=cfg["depth"], joint_attention_dim=32,
            caption_projection_dim=64 * cfg["depth"], pooled_projection_dim=cfg["adm_in_channels"],
            out_channels=cfg["out_channels"], pos_embed_max_size=cfg["pos_embed_max_size"])
        key_map = comfy.utils.mmdit_to_diffusers(cfg)
    else:
        cfg = FLUX_UNET_CONFIG
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=cfg["in_channels"] * 4, num_layers=cfg["depth"],
            num_single_layers=cfg["depth_single_blocks"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
            num_attention_heads=cfg["num_heads"], joint_attention_dim=cfg["context_in_dim"],
            pooled_projection_dim=cfg["vec_in_dim"], guidance_embeds=False, axes_dims_rope=tuple(cfg["axes_dim"]))
        key_map = comfy.utils.flux_to_diffusers(cfg)
    return diffusers_from_key_map(model.float(), key_map, sd)


@pytest.fixture(scope="module", params=[SD3, FLUX])
def flow(request):
    kind = request.param
    model = tiny_comfy_flow_model(kind)
    transformer = tiny_diffusers_flow_model(kind, model)
    gen = torch.Generator().manual_seed(7)
    context, pooled = torch.randn(1, TEXT_TOKENS, 32, generator=gen), torch.randn(1, 32, generator=gen)
    return types.SimpleNamespace(kind=kind, family=FLOW_FAMILIES[kind], model=model, transformer=transformer,
                                 context=context, pooled=pooled, positive=[[context, {"pooled_output": pooled}]])


def flow_network(p):
    """The pipeline's transformer call: SD3 on the latent at timestep t; Flux on the packed latent at t / 1000
    with its image and text position ids (FluxPipeline._pack_latents / _prepare_latent_image_ids)."""
    from diffusers import FluxPipeline

    if p.kind == SD3:
        def network(x, t):
            return p.transformer(hidden_states=x, timestep=t.reshape(1), encoder_hidden_states=p.context,
                                 pooled_projections=p.pooled).sample
        return network

    image_ids = FluxPipeline._prepare_latent_image_ids(1, LATENT // 2, LATENT // 2, "cpu", torch.float32)
    text_ids = torch.zeros(TEXT_TOKENS, 3)

    def network(x, t):
        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        out = p.transformer(hidden_states=packed, timestep=t.reshape(1) / 1000, encoder_hidden_states=p.context,
                            pooled_projections=p.pooled, txt_ids=text_ids, img_ids=image_ids, guidance=None).sample
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
    return network


FLOW_CASES = [(4, 1.0), (2, 1.0), (4, 0.5)]


@pytest.mark.parametrize("steps,strength", FLOW_CASES, ids=[f"N{s}-s{st}" for s, st in FLOW_CASES])
def test_flow_family_matches_diffusers(flow, steps, strength, parity_record):
    """sd3.5-large-turbo (shift 3) on the tiny MMDiT, flux.1-schnell (shift 1) on the tiny Flux: Turbo
    Family Schedule + SamplerCustom against FlowMatchEulerDiscreteScheduler's pipeline loop, within 1e-3."""
    x0, latent = None, None
    if strength < 1.0:
        x0 = torch.randn(1, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(11)) * 0.9
        latent = flow.model.model.process_latent_out(x0)
    out, noise, sigmas = ours(flow, flow.family, steps, strength, -1.0, latent)
    ref, timesteps = reference(flow.family, steps, strength, noise, flow_network(flow), x0)
    assert torch.allclose(sigmas[:-1] * 1000, torch.tensor(timesteps), rtol=0, atol=1e-3)
    mode = "txt2img" if strength == 1.0 else "img2img"
    record(parity_record, f"model/{flow.family}/{mode}/N{steps}-s{strength}", out, ref, family=flow.family,
           steps=steps, strength=strength, timesteps=timesteps, path="family_outputs+sample_custom")


def test_flow_guard_one_timestep_late(flow):
    """The flow comparison resolves one timestep: the reference with every sigma 1/1000 lower (timesteps
    one late) lands beyond the tolerance from ours."""
    out, noise, _ = ours(flow, flow.family, 4)
    late, _ = reference(flow.family, 4, 1.0, noise, flow_network(flow), late_flow=True)
    assert max_abs(out, late) > 10 * TOL, max_abs(out, late)
