"""Our nodes called inside ComfyUI's own machinery (imported in this process, CPU).

These tests look where HTTP cannot: how often the UNet runs, what prediction type the loaded
model has, and that progress, previews and Cancel reach ComfyUI's hooks.
"""
from __future__ import annotations

import logging

import pytest
import torch

from workflow_utils import SD_TURBO, SDXL_TURBO

MAX_SEED = 0xffffffffffffffff     # the seed inputs' maximum, the largest seed a torch generator takes


@pytest.fixture(scope="module")
def pack(comfy):
    import comfy_turbo.nodes.loader as loader
    import comfy_turbo.nodes.sampler as sampler
    import comfy_turbo.nodes.scheduler as scheduler
    return type("Pack", (), {"loader": loader, "sampler": sampler, "scheduler": scheduler})


@pytest.fixture(scope="module")
def loaded(pack, model_files):
    return {name: pack.loader.load_turbo_checkpoint(str(model_files[name])) for name in (SD_TURBO, SDXL_TURBO)}


_encoded = {}


def encode(ckpt, text="a photo of a cat"):
    """CLIPTextEncode's work, cached: the full-size text encoders dominate CPU time."""
    key = (id(ckpt.clip), text)
    if key not in _encoded:
        _encoded[key] = ckpt.clip.encode_from_tokens_scheduled(ckpt.clip.tokenize(text))
    return _encoded[key]


def empty_latent(size=16, batch=1):
    return {"samples": torch.zeros(batch, 4, size, size)}


def counting(model):
    """A clone of ``model`` whose UNet calls are recorded (sigma and batch size per call)."""
    calls = []
    clone = model.clone()

    def wrapper(apply_model, args):
        calls.append((float(args["timestep"][0]), args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone, calls


def test_variants_and_native_resolution(loaded):
    assert (loaded[SD_TURBO].variant, loaded[SD_TURBO].family) == ("sd-turbo", "SD20")
    assert (loaded[SDXL_TURBO].variant, loaded[SDXL_TURBO].family) == ("sdxl-turbo", "SDXL")
    for ckpt in loaded.values():
        assert (ckpt.width, ckpt.height) == (512, 512)
        assert ckpt.clip is not None and ckpt.vae is not None


def test_loader_forces_epsilon_where_comfyui_guesses_v_prediction(comfy, loaded, model_files):
    import comfy.model_base
    import comfy.model_sampling
    stock, *_ = comfy.sd.load_checkpoint_guess_config(str(model_files[SD_TURBO]), output_vae=False, output_clip=False)
    assert stock.model.model_type == comfy.model_base.ModelType.V_PREDICTION     # ComfyUI's SD2 heuristic
    ours = loaded[SD_TURBO].model
    assert ours.model.model_type == comfy.model_base.ModelType.EPS
    sampling = ours.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.EPS)
    assert not isinstance(sampling, comfy.model_sampling.V_PREDICTION)
    assert float(sampling.sigma_max) == pytest.approx(14.6146, rel=1e-4)


def test_sd_turbo_saved_by_core_nodes_with_their_v_pred_key_still_loads_as_epsilon(comfy, pack, model_files,
                                                                                    tmp_path, caplog):
    """Core Load Checkpoint guesses v-prediction for SD-Turbo, and saving that model writes a ``v_pred`` key.
    ComfyUI's SD20 ignores the key (its heuristic decides), so the loader keeps such a file epsilon, and says so."""
    import comfy.model_base
    import safetensors
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(model_files[SD_TURBO]))
    assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION     # ComfyUI's SD2 heuristic
    path = tmp_path / "sd-turbo-resaved.safetensors"
    comfy.sd.save_checkpoint(str(path), model, clip, vae)                        # as core CheckpointSave does
    del model, clip, vae
    with safetensors.safe_open(str(path), "pt") as saved:
        assert "v_pred" in saved.keys()
    with caplog.at_level(logging.INFO, logger="comfy_turbo"):
        ours = pack.loader.load_turbo_checkpoint(str(path))
    assert (ours.variant, ours.model.model.model_type) == ("sd-turbo", comfy.model_base.ModelType.EPS)
    assert "SD2 heuristic guesses v-prediction for 'sd-turbo-resaved.safetensors'" in caplog.text
    assert "core 'Load Checkpoint'" in caplog.text


@pytest.fixture(scope="module")
def sdxl_unet_and_vae(model_files):
    """The SDXL-Turbo stand-in's weights without its text encoders (1.6 GB that no refusal below reads)."""
    import safetensors
    with safetensors.safe_open(str(model_files[SDXL_TURBO]), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("conditioner.")}


# extra keys -> ComfyUI's model type for them, and the start of our refusal
DECLARED_PREDICTIONS = {
    "v_pred": ({"v_pred": torch.tensor([])}, "V_PREDICTION", r"declares v-prediction \(key v_pred\)"),
    "edm_vpred": ({"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)},
                  "V_PREDICTION_EDM", r"declares v-prediction EDM \(key edm_vpred.sigma_max\)"),
    "edm": ({"edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)},
            "EDM", r"declares EDM prediction \(keys edm_mean, edm_std"),
}


@pytest.mark.parametrize("case", list(DECLARED_PREDICTIONS))
def test_loader_refuses_an_sdxl_checkpoint_declaring_another_prediction(comfy, pack, sdxl_unet_and_vae, tmp_path,
                                                                        case):
    import comfy.utils
    extra, comfy_type, refusal = DECLARED_PREDICTIONS[case]
    sd = {**sdxl_unet_and_vae, **extra}
    stock, *_ = comfy.sd.load_state_dict_guess_config(dict(sd), output_vae=False, output_clip=False)
    assert stock.model.model_type.name == comfy_type                 # what core Load Checkpoint makes of it
    del stock
    path = tmp_path / f"sdxl-{case}.safetensors"
    comfy.utils.save_torch_file(sd, str(path))                        # ComfyUI's own writer
    with pytest.raises(pack.loader.TurboError, match=refusal + r".*, but sdxl-turbo models predict epsilon .*so it is "
                                                               r"not a sdxl-turbo checkpoint. Load it with the core "
                                                               r"'Load Checkpoint'"):
        pack.loader.load_turbo_checkpoint(str(path))


@pytest.mark.parametrize("dtype,expected", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_weight_dtype_option(pack, model_files, dtype, expected):
    ckpt = pack.loader.load_turbo_checkpoint(str(model_files[SD_TURBO]), dtype)
    assert ckpt.model.model.get_dtype() == expected


def test_wrong_family_names_the_family(pack, model_files):
    with pytest.raises(pack.loader.TurboError, match=r"is a SD15 checkpoint, not SD-Turbo"):
        pack.loader.load_turbo_checkpoint(str(model_files["sd15-tiny.safetensors"]))


def test_scheduler_reads_the_models_sigma_table(pack, loaded):
    model = loaded[SDXL_TURBO].model
    sigmas = pack.scheduler.TurboScheduler.execute(model, 4, 1.0, "trailing").result[0]
    table = model.get_model_object("model_sampling")
    expected = table.sigma(torch.tensor([999.0, 749.0, 499.0, 249.0])).tolist() + [0.0]
    assert sigmas.tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(pack.loader.TurboError, match="no step would run"):
        pack.scheduler.TurboScheduler.execute(model, 2, 0.25, "trailing")


@pytest.mark.parametrize("ckpt_name", [SD_TURBO, SDXL_TURBO])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_turbo_sampler_calls_the_unet_once_per_step(pack, loaded, ckpt_name, steps):
    ckpt = loaded[ckpt_name]
    model, calls = counting(ckpt.model)
    sigmas = pack.scheduler.turbo_model_sigmas(model, steps)
    out = pack.sampler.TurboSampler.execute(model, encode(ckpt), empty_latent(), sigmas, 3).result[0]
    assert len(calls) == steps
    assert [c[0] for c in calls] == pytest.approx(sigmas[:-1].tolist(), rel=1e-5)
    assert all(batch == 1 for _, batch in calls)          # no uncond half: guidance is off
    assert out["samples"].shape == (1, 4, 16, 16) and torch.isfinite(out["samples"]).all()


def test_sampler_custom_at_cfg_one_calls_the_unet_once_per_step(comfy, pack, loaded):
    import comfy.sample
    ckpt = loaded[SDXL_TURBO]
    model, calls = counting(ckpt.model)
    cond = encode(ckpt)
    sigmas = pack.scheduler.turbo_model_sigmas(model, 3)
    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    sampler = pack.sampler.TurboEulerSampler.execute(1.0, 1.0, "diffusers").result[0]
    comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent, seed=0)
    assert len(calls) == 3 and all(batch == 1 for _, batch in calls)


def test_sdxl_size_conditioning_defaults_to_the_image_size(comfy, pack, loaded):
    """Without explicit sizes ComfyUI conditions SDXL on 768x768; we pass the real size, as diffusers does."""
    ckpt = loaded[SDXL_TURBO]
    seen = []
    model = ckpt.model.clone()

    def wrapper(apply_model, args):
        seen.append(args["c"]["y"].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    cond = encode(ckpt)
    sigmas = pack.scheduler.turbo_model_sigmas(model, 1)
    pack.sampler.turbo_sample(model, cond, empty_latent(16), sigmas, 0)
    explicit = [[c[0], {**c[1], "width": 128, "height": 128, "target_width": 128, "target_height": 128}] for c in cond]
    pack.sampler.turbo_sample(model, explicit, empty_latent(16), sigmas, 0)
    at_768 = [[c[0], {**c[1], "width": 768, "height": 768, "target_width": 768, "target_height": 768}] for c in cond]
    pack.sampler.turbo_sample(model, at_768, empty_latent(16), sigmas, 0)
    torch.testing.assert_close(seen[0], seen[1])           # defaults = latent size * 8
    assert not torch.allclose(seen[0], seen[2])


def test_noise_scale_modes_differ_by_comfy_sqrt_term(pack, loaded):
    """Denoising a zero-UNet model exposes the initial latent: sigma_max vs sqrt(1 + sigma_max²)."""
    ckpt = loaded[SD_TURBO]
    seen = {}
    for mode in ("diffusers", "comfy"):
        model = ckpt.model.clone()

        def wrapper(apply_model, args, mode=mode):
            seen[mode] = args["input"].clone()
            return apply_model(args["input"], args["timestep"], **args["c"])

        model.set_model_unet_function_wrapper(wrapper)
        sigmas = pack.scheduler.turbo_model_sigmas(model, 1)
        pack.sampler.turbo_sample(model, encode(ckpt), empty_latent(), sigmas, 11, noise_scale=mode)
    sigma_max = 14.614642
    ratio = (seen["comfy"].std() / seen["diffusers"].std()).item()
    assert ratio == pytest.approx((1 + sigma_max ** 2) ** 0.5 / sigma_max, rel=1e-4)


def test_progress_previews_and_cancel_reach_comfyui(comfy, pack, loaded):
    import comfy.model_management as mm
    import comfy.utils
    ckpt = loaded[SD_TURBO]
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: (
        mm.throw_exception_if_processing_interrupted(), updates.append((value, total))))
    try:
        model = ckpt.model
        sigmas = pack.scheduler.turbo_model_sigmas(model, 4)
        pack.sampler.turbo_sample(model, encode(ckpt), empty_latent(), sigmas, 0)
        assert updates == [(1, 4), (2, 4), (3, 4), (4, 4)]

        interrupting, calls = counting(model)
        inner = interrupting.model_options["model_function_wrapper"]

        def cancel_after_first(apply_model, args):
            out = inner(apply_model, args)
            mm.interrupt_current_processing(True)
            return out

        interrupting.set_model_unet_function_wrapper(cancel_after_first)
        with pytest.raises(mm.InterruptProcessingException):
            pack.sampler.turbo_sample(interrupting, encode(ckpt), empty_latent(), sigmas, 0)
        assert len(calls) == 1                            # stopped at the first progress update
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)


def test_bad_latents_are_refused(pack, loaded):
    ckpt = loaded[SD_TURBO]
    sigmas = pack.scheduler.turbo_model_sigmas(ckpt.model, 1)
    with pytest.raises(pack.loader.TurboError, match="16 channels"):
        pack.sampler.turbo_sample(ckpt.model, encode(ckpt), {"samples": torch.ones(1, 16, 8, 8)}, sigmas, 0)
    bad = torch.zeros(1, 4, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(pack.loader.TurboError, match="NaN"):
        pack.sampler.turbo_sample(ckpt.model, encode(ckpt), {"samples": bad}, sigmas, 0)


def test_the_largest_seed_samples_through_the_node_and_sampler_custom(comfy, pack, loaded):
    """2**64 - 1 is the seed input's maximum; the ancestral noise's seed + 1 wraps to 0 instead of overflowing."""
    import comfy.sample
    seed_input = next(i for i in pack.sampler.TurboSampler.define_schema().inputs if i.id == "seed")
    assert seed_input.max == MAX_SEED
    ckpt = loaded[SD_TURBO]
    cond = encode(ckpt)
    sigmas = pack.scheduler.turbo_model_sigmas(ckpt.model, 2)         # two steps: ancestral noise is drawn
    run = lambda seed: pack.sampler.TurboSampler.execute(ckpt.model, cond, empty_latent(8), sigmas, seed,
                                                         1.0).result[0]["samples"]
    largest = run(MAX_SEED)
    assert torch.isfinite(largest).all()
    assert torch.equal(run(MAX_SEED), largest)                         # reproducible
    assert not torch.allclose(run(MAX_SEED - 1), largest)              # and still a seed of its own
    latent = torch.zeros(1, 4, 8, 8)
    sampler = pack.sampler.TurboEulerSampler.execute(1.0, 1.0, "diffusers").result[0]
    custom = comfy.sample.sample_custom(ckpt.model, comfy.sample.prepare_noise(latent, MAX_SEED), 1.0, sampler,
                                        sigmas, cond, cond, latent, seed=MAX_SEED)
    assert torch.isfinite(custom).all()
