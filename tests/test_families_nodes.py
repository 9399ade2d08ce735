"""Few-step families in ComfyUI (issue 20, node layer): Turbo Family Schedule and the KSampler names.

In-process against the real ComfyUI (CPU), on the suite's random-weight stand-ins, UNets only (no text
encoder: conditioning is made in-process at the model's context width), and for the flow families tiny
random-weight SD3 (MMDiT) and FLUX.1-schnell models built from ComfyUI's own model configs. Checked per
family:

* the node's SIGMAS are ``samplers/families.py``'s from the model's own table, and their timesteps are
  diffusers' (the family's scheduler configured as its authors do, ``parity_helpers.family_reference``);
* a SamplerCustom run with the node's SAMPLER calls the model exactly once per step, at those sigmas,
  with no uncond half (counted at ComfyUI's model wrapper, and at the real networks' forward for four
  families);
* the first network input has the family's scaling: unit noise for DMD2 1-step (ComfyUI's own noise x
  sigma is 24 % smaller there; checked on the real UNet too) and Hyper-SD's 1-step UNet (1.9 %),
  noise x sigma / sqrt(1 + sigma²) for the Euler families, the noise itself for the flow families;
* with a stand-in network (a fixed function of the model input and timestep, no UNet), the latent of
  SamplerCustom + the node's SAMPLER is ``samplers/families.py``'s loop (``sample_family``) to 1e-5, and
  core KSampler with the family's names gives the same latent;
* refusals: another architecture (flux.1-schnell on SDXL, dmd2 on SD3), flow sampling under a VP family
  and the reverse, v-prediction, steps, strength and gamma outside the family's range, each a TurboError
  naming the family and its range;
* the KSampler names are registered once; the node's schema loads and its ID is no built-in's.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from comfy_turbo.samplers import families as F
from workflow_utils import SD15, SD_TURBO, SDXL_TURBO

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # diffusers' numpy 2 warnings

LATENT = 8            # latent side: 64 px
SEED = 5

SD3, FLUX = "sd3-tiny (in-process)", "flux-schnell-tiny (in-process)"
# families -> the stand-in each runs on
ON = {"sd-turbo": SD_TURBO, "sdxl-turbo": SDXL_TURBO, "sdxl-lightning": SDXL_TURBO, "dmd2": SDXL_TURBO,
      "hyper-sd": SDXL_TURBO, "hyper-sd-1step-unet": SDXL_TURBO, "hyper-sd-unified": SDXL_TURBO,
      "lcm": SDXL_TURBO, "tcd": SDXL_TURBO, "pcm": SDXL_TURBO, "sd3.5-large-turbo": SD3, "flux.1-schnell": FLUX}
FLOW = {SD3, FLUX}


@pytest.fixture(scope="module")
def pack(comfy):
    import comfy_turbo.nodes.families as families
    import comfy_turbo.nodes.ksampler_names as names
    import comfy_turbo.nodes.loader as loader
    import comfy_turbo.nodes.sampler as sampler
    from comfy_turbo.samplers import families as F
    names.register()
    return type("Pack", (), {"families": families, "names": names, "loader": loader, "sampler": sampler, "F": F})


def tiny_flow_model(kind: str):
    """A tiny random-weight SD3 (MMDiT) or FLUX.1-schnell (Flux, no guidance embedding) diffusion model built
    with ComfyUI's own model configs (``comfy.supported_models.SD3`` / ``FluxSchnell``), so ComfyUI's flow
    ``model_sampling`` (ModelSamplingDiscreteFlow, CONST; shift 3 and schnell's shift 1, multiplier 1) and
    its conditioning path apply. No weights are published this small, and no text encoder is needed here."""
    import comfy.model_patcher
    import comfy.supported_models
    if kind == SD3:
        config = comfy.supported_models.SD3({
            "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "pos_embed_scaling_factor": None,
            "pos_embed_max_size": 16, "num_patches": 256, "adm_in_channels": 32,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 32, "out_features": 64}}})
    else:
        import dataclasses

        import comfy.ldm.flux.model
        unet_config = {
            "image_model": "flux", "guidance_embed": False, "in_channels": 16, "out_channels": 16, "patch_size": 2,
            "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True}
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
            unet_config["txt_ids_dims"] = []       # ComfyUI 0.33's detection gives FLUX.1 this; 0.3.75 has no such field
        config = comfy.supported_models.FluxSchnell(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tensors = list(model.diffusion_model.parameters()) + list(model.diffusion_model.buffers())
        for p in tensors:              # buffers too: MMDiT's pos_embed is an uninitialised buffer
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def models(pack, model_files):
    """The stand-ins' UNets through ComfyUI's own loader (no CLIP, no VAE); SD-Turbo made epsilon as Load
    Turbo Checkpoint does (ComfyUI guesses v-prediction for it); the tiny flow models built in-process."""
    import comfy.sd
    import safetensors
    out = {kind: tiny_flow_model(kind) for kind in (SD3, FLUX)}
    for name in (SD_TURBO, SDXL_TURBO, SD15):
        with safetensors.safe_open(str(model_files[name]), "pt") as f:     # the UNet alone: skip the text encoders
            unet = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}
        model = comfy.sd.load_state_dict_guess_config(unet, output_vae=False, output_clip=False)[0]
        if name == SD_TURBO:
            pack.loader.force_epsilon(model)
        out[name] = model
    return out


def conditioning(model):
    """An empty prompt at the model's context width (SDXL: with its pooled vector and the latent's size)."""
    config = model.model.model_config.unet_config
    if config.get("image_model") == "flux" or "context_embedder_config" in config:
        return [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32)}]]
    emb = torch.zeros(1, 77, config["context_dim"])
    opts = {}
    if config.get("adm_in_channels"):
        px = LATENT * 8
        opts = {"pooled_output": torch.zeros(1, config["adm_in_channels"] - 6 * 256), "width": px, "height": px,
                "crop_w": 0, "crop_h": 0, "target_width": px, "target_height": px}
    return [[emb, opts]]


def node(pack, model, family, steps, strength=1.0, gamma=-1.0):
    return pack.families.TurboFamilySchedule.execute(model, family, steps, strength, gamma).result


def channels(model):
    return model.get_model_object("latent_format").latent_channels


def sample_custom(model, sampler, sigmas, latent=None, seed=SEED):
    """Core SamplerCustom's work (comfy.sample.sample_custom), cfg 1.0, its noise from the seed."""
    import comfy.sample
    latent = torch.zeros(1, channels(model), LATENT, LATENT) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = conditioning(model)
    return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent, seed=seed), noise


def network_inputs(model):
    """Record what the UNet itself is called with (ComfyUI's calculate_input already applied)."""
    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen, handle


def net(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The stand-in network: a fixed nonlinear function of its input and timestep."""
    t = t.reshape(-1, *([1] * (x_in.ndim - 1))).to(x_in)
    return 0.6 * x_in + 0.3 * torch.sin(3 * x_in + t / 250.0) + 0.05


def stand_in(model, calls=None):
    """A clone whose UNet is :func:`net`, through ComfyUI's own model_sampling (input scaling, timestep,
    denoised), so only the network differs from a real run. ``calls`` gets (sigma, batch, network input)
    per model call."""
    clone = model.clone()

    def wrapper(apply_model, args):
        sampling = apply_model.__self__.model_sampling     # the BaseModel's, object patches applied
        x, sigma = args["input"], args["timestep"]
        x_in = sampling.calculate_input(sigma, x)
        if calls is not None:
            calls.append((float(sigma[0]), x.shape[0], x_in.clone()))
        out = net(x_in, sampling.timestep(sigma).float())
        return sampling.calculate_denoised(sigma, out, x)

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


def reference(pack, model, schedule, noise, latent=None):
    """``samplers/families.py``'s loop on :func:`net`, from the reference's starting latent; ComfyUI's
    latent space out (process_latent_out), as SamplerCustom returns it."""
    ts = {round(float(s), 6): t for s, t in zip(schedule.sigmas[:-1].tolist(), schedule.timesteps)}

    per_1000 = 1000.0 / float(model.get_model_object("model_sampling").multiplier) if schedule.is_flow else 1.0

    def model_fn(x, sigma, **kwargs):      # the stand-in sees ComfyUI's timestep: Flux's is sigma, not sigma * 1000
        t = torch.tensor([float(ts[round(float(sigma[0]), 6)]) / per_1000] * x.shape[0])
        out = net(F.model_input(x, sigma, schedule.prediction), t)
        return F.denoised_from_output(out, x, sigma, schedule.prediction)

    processed = None if latent is None else model.model.process_latent_in(latent)
    x = F.start_latent(schedule, noise, processed)
    out = F.sample_family(model_fn, x, schedule, {"seed": SEED})
    return model.model.process_latent_out(out)


# --- SIGMAS ---------------------------------------------------------------------------------------

CASES = [(f, s) for f in ON for s in (1, 2, 3, 4, 8, 16) if s in F.FAMILIES[f].steps]
FLOW_SIGMAS = {("flux.1-schnell", 4): [1.0, 0.75, 0.5, 0.25, 0.0],
               ("sd3.5-large-turbo", 4): [1.0, 0.858, 0.602, 0.0089, 0.0]}
KNOWN = {("dmd2", 4): [999, 749, 499, 249], ("dmd2", 1): [399], ("hyper-sd-1step-unet", 1): [800],
         ("lcm", 4): [999, 759, 499, 259], ("sdxl-lightning", 8): [999, 874, 749, 624, 499, 374, 249, 124],
         ("pcm", 16): [999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187, 124, 61]}


def test_every_family_of_the_node_is_tested(comfy):
    import comfy_turbo.nodes.families as families
    assert set(families.NODE_FAMILIES) == set(ON) == set(F.FAMILY_NAMES)


@pytest.mark.parametrize("family,steps", CASES)
def test_node_sigmas_are_the_familys_from_the_models_table_at_diffusers_timesteps(pack, models, family, steps):
    from parity_helpers import family_reference, family_reference_timesteps
    model = models[ON[family]]
    sampling = model.get_model_object("model_sampling")
    _, sigmas, _ = node(pack, model, family, steps)
    schedule = pack.F.family_schedule(family, steps, sigma_of_timestep=sampling.sigma)
    assert torch.equal(sigmas, schedule.sigmas) and sigmas.dtype == torch.float32 and sigmas[-1] == 0
    diffusers_timesteps, _ = family_reference_timesteps(family_reference(family, steps), steps, 1.0, False)
    if ON[family] in FLOW:
        # the model's timestep for each sigma is the one diffusers' pipeline gives the transformer
        per_1000 = 1000.0 / float(sampling.multiplier)
        assert (sampling.timestep(sigmas[:-1]) * per_1000).tolist() == pytest.approx(list(schedule.timesteps), rel=1e-6)
        assert diffusers_timesteps.tolist() == pytest.approx(list(schedule.timesteps), rel=1e-6)
        if (family, steps) in FLOW_SIGMAS:
            assert sigmas.tolist() == pytest.approx(FLOW_SIGMAS[family, steps], abs=5e-4)
        return
    assert sampling.timestep(sigmas[:-1]).tolist() == list(schedule.timesteps)
    assert [int(t) for t in diffusers_timesteps] == list(schedule.timesteps)
    if (family, steps) in KNOWN:
        assert list(schedule.timesteps) == KNOWN[family, steps]


def test_strength_cuts_the_schedule_as_diffusers_img2img(pack, models):
    from parity_helpers import family_reference, family_reference_timesteps
    model = models[SDXL_TURBO]
    _, sigmas, _ = node(pack, model, "dmd2", 4, 0.5)
    timesteps, _ = family_reference_timesteps(family_reference("dmd2", 4), 4, 0.5, True)
    assert model.get_model_object("model_sampling").timestep(sigmas[:-1]).tolist() == [int(t) for t in timesteps]
    assert [int(t) for t in timesteps] == [499, 249]


# --- one call per step, the first input's scaling ---------------------------------------------------

RUNS = [("sd-turbo", 2), ("sdxl-turbo", 2), ("sdxl-lightning", 1), ("sdxl-lightning", 2), ("dmd2", 1), ("dmd2", 4),
        ("hyper-sd", 2), ("hyper-sd-1step-unet", 1), ("hyper-sd-unified", 2), ("lcm", 4), ("tcd", 2), ("pcm", 2),
        ("sd3.5-large-turbo", 4), ("flux.1-schnell", 4)]


@pytest.mark.parametrize("family,steps", RUNS)
def test_sampler_custom_with_the_nodes_sampler_calls_the_model_once_per_step(pack, models, family, steps):
    calls = []
    model = stand_in(models[ON[family]], calls)
    out_model, sigmas, sampler = node(pack, model, family, steps)
    out, _ = sample_custom(out_model, sampler, sigmas)
    assert len(calls) == steps
    assert [c[0] for c in calls] == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)
    assert all(batch == 1 for _, batch, _ in calls)          # no uncond half at cfg 1.0
    assert out.shape == (1, channels(model), LATENT, LATENT) and torch.isfinite(out).all()


@pytest.mark.parametrize("family,steps", [("dmd2", 1), ("sd-turbo", 2), ("sd3.5-large-turbo", 4),
                                          ("flux.1-schnell", 4)])
def test_the_real_network_runs_once_per_step(pack, models, family, steps):
    """The same with the stand-ins' real random-weight networks, counted where ComfyUI calls them; DMD2's
    1-step UNet sees the unit noise itself."""
    model = models[ON[family]]
    out_model, sigmas, sampler = node(pack, model, family, steps)
    seen, handle = network_inputs(out_model)
    try:
        out, noise = sample_custom(out_model, sampler, sigmas)
    finally:
        handle.remove()
    assert len(seen) == steps and all(x.shape[0] == 1 for x in seen)
    assert torch.isfinite(out).all()
    if family == "dmd2":
        torch.testing.assert_close(seen[0], noise, rtol=1e-5, atol=1e-5)


def _first_input(model, sampler, sigmas):
    """The network input of the first call (ComfyUI's calculate_input of the latent), and the noise."""
    calls = []
    _, noise = sample_custom(stand_in(model, calls), sampler, sigmas)
    return calls[0][2], noise


@pytest.mark.parametrize("family,timestep,shortfall,within", [("dmd2", 399, 0.24, 0.005),
                                                             ("hyper-sd-1step-unet", 800, 0.019, 0.001)])
def test_unit_noise_families_feed_the_model_unit_noise_where_comfyui_scales_by_sigma(pack, models, family, timestep,
                                                                                     shortfall, within):
    import comfy.samplers
    model = models[SDXL_TURBO]
    out_model, sigmas, sampler = node(pack, model, family, 1)
    first, noise = _first_input(out_model, sampler, sigmas)
    torch.testing.assert_close(first, noise, rtol=1e-5, atol=1e-5)      # diffusers' init_noise_sigma 1
    # ComfyUI's own route at the same sigmas (core LCM sampler): noise x sigma, then / sqrt(1 + sigma²)
    core, _ = _first_input(model, comfy.samplers.sampler_object("lcm"), sigmas)
    sigma = float(sigmas[0])
    assert model.get_model_object("model_sampling").timestep(sigmas[:1]).item() == timestep
    ratio = (core.std() / first.std()).item()
    assert ratio == pytest.approx(sigma / math.sqrt(1 + sigma ** 2), rel=1e-4)
    assert 1 - ratio == pytest.approx(shortfall, abs=within)   # the 24 % and 1.9 %


@pytest.mark.parametrize("family", ["sdxl-turbo", "sdxl-lightning", "sd3.5-large-turbo", "flux.1-schnell"])
def test_euler_and_flow_families_start_at_noise_times_sigma(pack, models, family):
    calls = []
    model = stand_in(models[ON[family]], calls)
    out_model, sigmas, sampler = node(pack, model, family, 2)
    _, noise = sample_custom(out_model, sampler, sigmas)
    sigma, first = float(sigmas[0]), calls[0][2]
    if ON[family] in FLOW:          # the flow latent at sigma 1 is the noise; the network sees it as is
        assert sigma == 1.0
        torch.testing.assert_close(first, noise, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(first, noise * sigma / math.sqrt(1 + sigma ** 2), rtol=1e-5, atol=1e-5)


# --- the trajectory: the node's SAMPLER is families.py's loop ----------------------------------------

TRAJECTORIES = [("sd-turbo", 4, 1.0), ("sdxl-turbo", 4, 1.0), ("sdxl-lightning", 1, 1.0), ("sdxl-lightning", 4, 1.0),
                ("dmd2", 1, 1.0), ("dmd2", 4, 1.0), ("dmd2", 4, 0.5), ("hyper-sd", 8, 1.0), ("hyper-sd", 4, 0.5),
                ("hyper-sd-1step-unet", 1, 1.0), ("hyper-sd-unified", 3, 1.0), ("lcm", 6, 1.0), ("tcd", 4, 1.0),
                ("tcd", 4, 0.75), ("pcm", 16, 1.0), ("pcm", 8, 1.0), ("sd3.5-large-turbo", 4, 1.0),
                ("sd3.5-large-turbo", 4, 0.5), ("flux.1-schnell", 4, 1.0), ("flux.1-schnell", 2, 0.6)]


@pytest.mark.parametrize("family,steps,strength", TRAJECTORIES)
def test_sampler_custom_with_the_nodes_outputs_is_the_familys_loop(pack, models, family, steps, strength):
    base = models[ON[family]]
    out_model, sigmas, sampler = node(pack, stand_in(base), family, steps, strength)
    latent = None if strength == 1.0 else torch.randn(1, channels(base), LATENT, LATENT,
                                                      generator=torch.Generator().manual_seed(2))
    ours, noise = sample_custom(out_model, sampler, sigmas, latent)
    schedule = pack.F.family_schedule(family, steps, strength,
                                      sigma_of_timestep=base.get_model_object("model_sampling").sigma)
    expected = reference(pack, base, schedule, noise, latent)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,steps,strength", [("dmd2", 4, 1.0), ("dmd2", 1, 1.0), ("sdxl-lightning", 1, 1.0),
                                                    ("lcm", 4, 1.0), ("tcd", 4, 0.75), ("hyper-sd", 4, 0.5),
                                                    ("sd-turbo", 2, 1.0)])
def test_turbo_sampler_with_the_nodes_sampler_equals_sampler_custom(pack, models, family, steps, strength):
    """Turbo Sampler fed Turbo Family Schedule's MODEL, SIGMAS and SAMPLER samples what SamplerCustom does
    with them (same seed, cfg 1): the family's sampler, initial noise and model patch all reach it."""
    base = models[ON[family]]
    out_model, sigmas, sampler = node(pack, stand_in(base), family, steps, strength)
    latent = torch.zeros(1, channels(base), LATENT, LATENT) if strength == 1.0 else \
        torch.randn(1, channels(base), LATENT, LATENT, generator=torch.Generator().manual_seed(2))
    custom, _ = sample_custom(out_model, sampler, sigmas, latent)
    (turbo,) = pack.sampler.TurboSampler.execute(out_model, conditioning(base), {"samples": latent}, sigmas, SEED,
                                                 sampler=sampler).result
    torch.testing.assert_close(turbo["samples"], custom, rtol=1e-5, atol=1e-5)


def test_tcd_gamma_reaches_the_sampler(pack, models):
    model = stand_in(models[SDXL_TURBO])

    def run(gamma):
        _, sigmas, sampler = node(pack, model, "tcd", 4, 1.0, gamma)
        return sample_custom(model, sampler, sigmas)[0]

    runs = {g: run(g) for g in (-1.0, 0.0, 0.3, 1.0)}
    assert torch.equal(runs[-1.0], runs[0.3])                 # -1: the family's default, TCD's 0.3
    assert not torch.allclose(runs[0.0], runs[0.3]) and not torch.allclose(runs[1.0], runs[0.3])


def test_sdxl_lightning_one_step_model_predicts_x0_and_the_input_model_is_left_alone(pack, models):
    import comfy.model_sampling
    model = models[SDXL_TURBO]
    one, _, _ = node(pack, model, "sdxl-lightning", 1)
    four, _, _ = node(pack, model, "sdxl-lightning", 4)
    assert isinstance(one.get_model_object("model_sampling"), comfy.model_sampling.X0)
    assert four is model and not isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.X0)
    assert torch.equal(one.get_model_object("model_sampling").sigmas, model.get_model_object("model_sampling").sigmas)


# --- core KSampler with the names -----------------------------------------------------------------

NAMED = [("sdxl-lightning", 4), ("dmd2", 4), ("dmd2", 1), ("hyper-sd", 4), ("hyper-sd-1step-unet", 1), ("lcm", 4),
         ("tcd", 4), ("pcm", 16), ("sd3.5-large-turbo", 4), ("flux.1-schnell", 4)]


@pytest.mark.parametrize("family,steps", NAMED)
def test_core_ksampler_with_the_family_names_equals_the_node(pack, models, family, steps):
    import nodes
    model = stand_in(models[ON[family]])
    scheduler, sampler_name = pack.names.family_recipes()[family]
    latent = {"samples": torch.zeros(1, channels(model), LATENT, LATENT)}
    cond = conditioning(model)
    core = nodes.common_ksampler(model, SEED, steps, 1.0, sampler_name, scheduler, cond, cond, latent)[0]["samples"]
    out_model, sigmas, sampler = node(pack, model, family, steps)
    ours, _ = sample_custom(out_model, sampler, sigmas)
    if family == "sdxl-lightning":
        # KSampler at sigma_max: ComfyUI's sqrt(1 + sigma²) initial noise (0.2 % more); Euler is linear in it here
        torch.testing.assert_close(core, ours, rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(core, ours, rtol=1e-6, atol=1e-6)


def test_recipes_name_a_registered_scheduler_and_sampler(pack):
    import comfy.samplers
    recipes = pack.names.family_recipes()
    assert recipes["dmd2"] == ("turbo_dmd2", "turbo_lcm") and recipes["tcd"] == ("turbo_tcd", "turbo_tcd")
    assert recipes["hyper-sd"] == ("turbo_hyper_sd", "turbo_ddim") and recipes["pcm"] == ("turbo_pcm", "turbo_ddim")
    assert recipes["sdxl-lightning"] == ("turbo_sdxl_lightning", "turbo_euler")
    assert recipes["sd3.5-large-turbo"] == ("turbo_sd3_5_large_turbo", "turbo_euler")
    assert recipes["flux.1-schnell"] == ("turbo_flux_1_schnell", "turbo_euler")
    for scheduler, sampler in recipes.values():
        assert scheduler in comfy.samplers.KSampler.SCHEDULERS and sampler in comfy.samplers.KSampler.SAMPLERS


def test_registering_twice_adds_each_name_once(pack):
    import comfy.samplers
    for _ in range(2):
        pack.names.register()
        importlib.reload(importlib.import_module("comfy_turbo.nodes.ksampler_names")).register()
    schedulers = [s for s, _ in pack.names.family_recipes().values()]
    assert len(schedulers) == len(set(schedulers)) == len(ON) - 2
    for names in (comfy.samplers.SCHEDULER_NAMES, comfy.samplers.KSampler.SCHEDULERS,
                  list(comfy.samplers.SCHEDULER_HANDLERS)):
        assert all(names.count(s) == 1 for s in schedulers + ["turbo_trailing"])
    for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES, comfy.samplers.KSampler.SAMPLERS):
        assert all(names.count(s) == 1 for s in ("turbo_lcm", "turbo_tcd", "turbo_ddim", "turbo_euler"))


# --- refusals -------------------------------------------------------------------------------------

def test_a_family_on_another_architecture_names_both(pack, models):
    TurboError = pack.families.TurboError
    with pytest.raises(TurboError, match=r"dmd2 is a family of SDXL models, but this MODEL is SD 2\.x \(ComfyUI's "
                                         r"SD20\).*families for SD 2\.x: sd-turbo"):
        node(pack, models[SD_TURBO], "dmd2", 4)
    with pytest.raises(TurboError, match=r"sd-turbo is a family of SD 2\.x models, but this MODEL is SDXL"):
        node(pack, models[SDXL_TURBO], "sd-turbo", 1)
    with pytest.raises(TurboError, match=r"flux\.1-schnell is a family of Flux models, but this MODEL is SDXL "
                                         r"\(ComfyUI's SDXL\)"):
        node(pack, models[SDXL_TURBO], "flux.1-schnell", 4)
    with pytest.raises(TurboError, match=r"dmd2 is a family of SDXL models, but this MODEL is SD3"):
        node(pack, models[SD3], "dmd2", 4)
    with pytest.raises(TurboError, match=r"sd3\.5-large-turbo is a family of SD3 models, but this MODEL is Flux "
                                         r"\(ComfyUI's FluxSchnell\)"):
        node(pack, models[FLUX], "sd3.5-large-turbo", 4)
    # the SD 1.x families run on SD 1.5
    _, sigmas, sampler = node(pack, models[SD15], "lcm", 2)
    assert len(sigmas) == 3


def test_a_vp_family_on_flow_sampling_or_v_prediction_is_refused(pack, models):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    flow = ModelSamplingSD3().patch(models[SDXL_TURBO], 3.0)[0]
    with pytest.raises(pack.families.TurboError, match=r"dmd2 samples SDXL on its discrete \(epsilon\) schedule, but "
                                                       r"this MODEL's model_sampling is flow"):
        node(pack, flow, "dmd2", 4)
    import comfy.samplers
    with pytest.raises(pack.families.TurboError, match="turbo_dmd2"):
        comfy.samplers.calculate_sigmas(flow.get_model_object("model_sampling"), "turbo_dmd2", 4)
    with pytest.raises(pack.families.TurboError, match=r"turbo_flux_1_schnell \(flux\.1-schnell\) samples on flow"):
        comfy.samplers.calculate_sigmas(models[SDXL_TURBO].get_model_object("model_sampling"),
                                        "turbo_flux_1_schnell", 4)
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    v_prediction = ModelSamplingDiscrete().patch(models[SD_TURBO], "v_prediction", False)[0]  # core's SD2 guess
    with pytest.raises(pack.families.TurboError, match=r"sd-turbo models predict epsilon, but this MODEL is "
                                                       r"v-prediction.*Load Turbo Checkpoint"):
        node(pack, v_prediction, "sd-turbo", 1)


@pytest.mark.parametrize("family,steps,strength,gamma,message", [
    ("dmd2", 2, 1.0, -1.0, r"dmd2 supports steps 1 or 4 \(.*\); got steps=2"),
    ("sdxl-lightning", 3, 1.0, -1.0, r"sdxl-lightning supports steps 1, 2, 4 or 8"),
    ("lcm", 9, 1.0, -1.0, r"lcm supports steps 1 to 8"),
    ("pcm", 4, 0.2, -1.0, r"pcm at 4 steps takes strength from 0\.25 to 1"),
    ("dmd2", 1, 0.5, -1.0, r"dmd2 at 1 step takes strength 1 only"),
    ("dmd2", 4, 1.0, 0.3, r"dmd2 does not sample with TCD, so it takes no gamma"),
])
def test_out_of_range_inputs_are_node_errors_naming_the_range(pack, models, family, steps, strength, gamma, message):
    with pytest.raises(pack.families.TurboError, match=r"^comfy-turbo: " + message):
        node(pack, models[SDXL_TURBO], family, steps, strength, gamma)


def test_core_ksampler_out_of_range_steps_names_the_family_and_the_fix(pack, models):
    import nodes
    model = stand_in(models[SDXL_TURBO])
    cond = conditioning(model)
    with pytest.raises(pack.families.TurboError, match=r"dmd2 supports steps 1 or 4.*KSampler scheduler turbo_dmd2"):
        nodes.common_ksampler(model, 0, 20, 1.0, "turbo_lcm", "turbo_dmd2", cond, cond,
                              {"samples": torch.zeros(1, 4, LATENT, LATENT)})


# --- the node itself ------------------------------------------------------------------------------

def test_the_node_schema_is_valid_and_its_id_is_no_built_in(pack, comfy):
    from conftest import comfyui_path
    cls = pack.families.TurboFamilySchedule
    inputs = cls.INPUT_TYPES()
    assert list(inputs["required"]) == ["model", "family", "steps", "strength"]
    assert list(inputs["optional"]) == ["gamma"]           # optional: a workflow without it keeps working
    assert cls.GET_SCHEMA().node_id == "TurboFamilySchedule"
    root = comfyui_path()
    sources = [root / "nodes.py", *(root / "comfy_extras").glob("*.py"), *(root / "comfy_api_nodes").rglob("*.py")]
    assert not [p for p in sources if "TurboFamilySchedule" in p.read_text(errors="ignore")]
    from comfy_turbo.nodes import NODE_LIST
    assert "TurboFamilySchedule" in [c.define_schema().node_id for c in NODE_LIST]


# --- Load Turbo Checkpoint's family input (part 3) --------------------------------------------------

@pytest.mark.parametrize("ckpt,family,variant,side", [
    (SDXL_TURBO, "turbo", "sdxl-turbo", 512),
    (SD_TURBO, "turbo", "sd-turbo", 512),
    (SDXL_TURBO, "sdxl-lightning", "sdxl-lightning", 1024),
    (SDXL_TURBO, "dmd2", "dmd2", 1024),
    (SDXL_TURBO, "hyper-sd-1step-unet", "hyper-sd-1step-unet", 1024),
    (SD15, "lcm", "lcm", 512),
    (SD15, "hyper-sd-unified", "hyper-sd-unified", 512),
])
def test_the_loader_takes_a_distillation_merge_as_the_family_chosen(pack, model_files, ckpt, family, variant, side):
    loaded = pack.loader.load_turbo_checkpoint(str(model_files[ckpt]), "default", family)
    assert (loaded.variant, loaded.width, loaded.height) == (variant, side, side)
    assert loaded.model.get_attachment(pack.loader.FAMILY_ATTACHMENT) == variant
    assert loaded.model.clone().get_attachment(pack.loader.FAMILY_ATTACHMENT) == variant   # clones keep it
    # epsilon, with the discrete table Turbo Family Schedule reads, whatever ComfyUI guessed
    import comfy.model_base
    assert loaded.model.model.model_type == comfy.model_base.ModelType.EPS
    _, sigmas, _ = node(pack, loaded.model, variant, F.FAMILIES[variant].steps[-1] if variant != "lcm" else 4)
    assert float(sigmas[-1]) == 0.0 and len(sigmas) > 1
    # ComfyUI 0.33's reload factory (non-dynamic / per-GPU copies) keeps the family too
    factory, args = loaded.model.cached_patcher_init
    assert factory(*args).get_attachment(pack.loader.FAMILY_ATTACHMENT) == variant
    # ... called as 0.33's clone(disable_dynamic=True) calls it
    assert factory(*args, disable_dynamic=True).get_attachment(pack.loader.FAMILY_ATTACHMENT) == variant


@pytest.mark.parametrize("ckpt,family,message", [
    (SDXL_TURBO, "sd-turbo", r"is a SDXL checkpoint \(ComfyUI's SDXL\), but sd-turbo models are SD 2\.x\. "
                             r"Pick the family .*families for SDXL: sdxl-turbo, sdxl-lightning, dmd2"),
    (SD_TURBO, "dmd2", r"is a SD 2\.x checkpoint \(ComfyUI's SD20\), but dmd2 models are SDXL.*families for "
                       r"SD 2\.x: sd-turbo"),
    (SD15, "dmd2", r"is a SD 1\.x checkpoint .*families for SD 1\.x: hyper-sd, hyper-sd-unified, lcm, tcd, pcm"),
    (SD15, "turbo", r"is a SD15 checkpoint, not SD-Turbo .* If it is a hyper-sd, hyper-sd-unified, lcm, tcd, pcm "
                    r"model, set family to that"),
    (SDXL_TURBO, "flux.1-schnell", r"flux\.1-schnell is a flow model: load it with ComfyUI's own loaders .*"
                                   r"Load Diffusion Model .*Turbo Family Schedule.*: turbo, sd-turbo"),
    (SDXL_TURBO, "sd3.5-large-turbo", r"sd3\.5-large-turbo is a flow model: .*Load Checkpoint for SD3\.5"),
    (SDXL_TURBO, "no-such", r"Unknown family 'no-such': use one of turbo, sd-turbo"),
])
def test_the_loader_refuses_a_family_the_file_cannot_be(pack, model_files, ckpt, family, message):
    with pytest.raises(pack.loader.TurboError, match=message):
        pack.loader.load_turbo_checkpoint(str(model_files[ckpt]), "default", family)


def test_sampling_a_model_as_another_family_than_it_was_loaded_as_is_logged(pack, model_files, caplog):
    loaded = pack.loader.load_turbo_checkpoint(str(model_files[SDXL_TURBO]), "default", "dmd2")
    with caplog.at_level("WARNING", logger="comfy_turbo"):
        node(pack, loaded.model, "dmd2", 4)
    assert not [r for r in caplog.records if "recipe" in r.getMessage()]
    with caplog.at_level("WARNING", logger="comfy_turbo"):
        node(pack, loaded.model, "lcm", 4)
    assert [r for r in caplog.records if "loaded as dmd2 with the lcm recipe" in r.getMessage()]


def test_the_loader_family_input_is_optional_so_older_workflows_load(pack):
    inputs = pack.loader.TurboCheckpointLoader.INPUT_TYPES()
    assert list(inputs["required"]) == ["ckpt_name", "weight_dtype"]
    assert list(inputs["optional"]) == ["family"]
    assert inputs["optional"]["family"][1]["default"] == "turbo"
    kind, options = inputs["optional"]["family"]
    assert (options.get("options") if kind == "COMBO" else kind) == list(pack.loader.LOADER_FAMILIES)


# --- 'from loader': the schedule follows Load Turbo Checkpoint's family ----------------------------

def _same_recipe(a, b):
    """Two (MODEL, SIGMAS, SAMPLER) results give the same sampling: sigmas, sampler function and options."""
    assert torch.equal(a[1], b[1])
    assert (a[2].sampler_function, a[2].extra_options) == (b[2].sampler_function, b[2].extra_options)


@pytest.mark.parametrize("ckpt,loader_family,family,steps", [
    (SD_TURBO, "turbo", "sd-turbo", 1),
    (SDXL_TURBO, "turbo", "sdxl-turbo", 4),
    (SDXL_TURBO, "dmd2", "dmd2", 4),
    (SDXL_TURBO, "sdxl-lightning", "sdxl-lightning", 1),
    (SD15, "lcm", "lcm", 4),
])
def test_from_loader_samples_the_family_the_checkpoint_was_loaded_as(pack, model_files, ckpt, loader_family,
                                                                      family, steps, caplog):
    loaded = pack.loader.load_turbo_checkpoint(str(model_files[ckpt]), "default", loader_family)
    with caplog.at_level("WARNING", logger="comfy_turbo"):
        ours = node(pack, loaded.model.clone(), pack.families.FROM_LOADER, steps)
    _same_recipe(ours, node(pack, loaded.model, family, steps))
    assert not [r for r in caplog.records if "recipe" in r.getMessage()]
    if family == "sdxl-lightning":             # the x0 patch comes along with the recipe
        import comfy.model_sampling
        assert isinstance(ours[0].get_model_object("model_sampling"), comfy.model_sampling.X0)


def test_from_loader_on_another_loaders_model_takes_the_only_family_or_asks(pack, models):
    _same_recipe(node(pack, models[SD_TURBO], pack.families.FROM_LOADER, 2), node(pack, models[SD_TURBO], "sd-turbo", 2))
    _same_recipe(node(pack, models[FLUX], pack.families.FROM_LOADER, 4), node(pack, models[FLUX], "flux.1-schnell", 4))
    with pytest.raises(pack.loader.TurboError, match=r"family 'from loader' needs a MODEL from Load Turbo Checkpoint.*"
                                                     r"this SDXL MODEL .* came from another loader, and \d+ families "
                                                     r"fit it \(sdxl-turbo, sdxl-lightning, dmd2.*Pick its family here"):
        node(pack, models[SDXL_TURBO], pack.families.FROM_LOADER, 4)


def test_from_loader_is_the_schedules_default_and_first_choice(pack):
    kind, options = pack.families.TurboFamilySchedule.INPUT_TYPES()["required"]["family"]
    choices = options.get("options") if kind == "COMBO" else kind
    assert choices[0] == options["default"] == pack.families.FROM_LOADER
    assert choices[1:] == list(pack.families.NODE_FAMILIES)
