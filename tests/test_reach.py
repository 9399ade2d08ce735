"""Reach: the Turbo schedule and sampler under KSampler's names, strength that never does nothing, and the
hires-fix and inpainting workflows.

In-process where latents are compared (ComfyUI's own KSampler against Turbo Sampler, masked sampling), over
HTTP where the names must show in the core nodes' /object_info and a core KSampler prompt must run.
"""
from __future__ import annotations

import copy
import importlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from workflow_utils import SD_TURBO, SDXL_TURBO, TEST_SIZE, load_api_twin, node_of, png_pixels, png_size, shrink

SIZE = 8                 # latent side: 64 px
NAMES = {"scheduler": ["turbo_trailing"], "sampler": ["turbo_euler", "turbo_euler_ancestral"]}


@pytest.fixture(scope="module")
def pack(comfy):
    import comfy_turbo.nodes.ksampler_names as names
    import comfy_turbo.nodes.loader as loader
    import comfy_turbo.nodes.sampler as sampler
    import comfy_turbo.nodes.scheduler as scheduler
    names.register()
    return type("Pack", (), {"names": names, "loader": loader, "sampler": sampler, "scheduler": scheduler})


@pytest.fixture(scope="module")
def loaded(pack, model_files):
    return {name: pack.loader.load_turbo_checkpoint(str(model_files[name])) for name in (SD_TURBO, SDXL_TURBO)}


@pytest.fixture(scope="module")
def conditioning(loaded):
    """A prompt per family; SDXL's carries its size conditioning at the latent's size, as Turbo Sampler fills it
    and core CLIP Text Encode (SDXL) sets it, so that core KSampler and Turbo Sampler see the same conditioning."""
    out = {}
    for name, ckpt in loaded.items():
        cond = ckpt.clip.encode_from_tokens_scheduled(ckpt.clip.tokenize("a photo of a cat"))
        if name == SDXL_TURBO:
            px = SIZE * 8
            cond = [[emb, {**opts, "width": px, "height": px, "crop_w": 0, "crop_h": 0, "target_width": px,
                           "target_height": px}] for emb, opts in cond]
        out[name] = cond
    return out


def core_ksampler(model, positive, latent, seed, steps, sampler_name, scheduler, denoise=1.0):
    """Core KSampler's own code path (nodes.common_ksampler), cfg 1.0, the same prompt as negative."""
    import nodes
    return nodes.common_ksampler(model, seed, steps, 1.0, sampler_name, scheduler, positive, positive,
                                 latent, denoise=denoise)[0]["samples"]


# --- the names --------------------------------------------------------------------------------

def test_registering_twice_adds_each_name_once(pack):
    import comfy.samplers
    for _ in range(2):
        pack.names.register()
        importlib.reload(importlib.import_module("comfy_turbo.nodes.ksampler_names")).register()
    for names in (comfy.samplers.SCHEDULER_NAMES, comfy.samplers.KSampler.SCHEDULERS):
        assert names.count("turbo_trailing") == 1
    for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES, comfy.samplers.KSampler.SAMPLERS):
        assert names.count("turbo_euler") == 1 and names.count("turbo_euler_ancestral") == 1
    assert list(comfy.samplers.SCHEDULER_HANDLERS).count("turbo_trailing") == 1


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_turbo_trailing_is_the_turbo_schedule_from_the_models_own_table(pack, loaded, steps):
    import comfy.samplers
    model = loaded[SD_TURBO].model
    ours = pack.scheduler.turbo_model_sigmas(model, steps) if steps <= 4 else None
    core = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "turbo_trailing", steps)
    if ours is not None:
        assert torch.equal(core, ours)
    timesteps = [round(1000 - i * 1000 / steps) - 1 for i in range(steps)]
    expected = model.get_model_object("model_sampling").sigma(torch.tensor(timesteps, dtype=torch.float32))
    assert torch.allclose(core[:-1], expected) and core[-1] == 0


@pytest.mark.parametrize("sampler_name,eta", [("turbo_euler", 0.0), ("turbo_euler_ancestral", 1.0)])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("ckpt", [SD_TURBO, SDXL_TURBO])
def test_core_ksampler_with_the_names_equals_turbo_sampler(pack, loaded, conditioning, ckpt, steps, sampler_name,
                                                           eta):
    """Same seed, same latent: core KSampler (cfg 1.0, turbo_trailing + turbo_euler*) and Turbo Scheduler +
    Turbo Sampler with ComfyUI's initial noise scale (the KSampler's)."""
    model, positive = loaded[ckpt].model, conditioning[ckpt]
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE)}
    core = core_ksampler(model, positive, latent, 7, steps, sampler_name, "turbo_trailing")
    sigmas = pack.scheduler.turbo_model_sigmas(model, steps)
    ours = pack.sampler.turbo_sample(model, positive, latent, sigmas, 7, eta=eta, noise_scale="comfy")["samples"]
    assert torch.equal(core, ours)


@pytest.mark.parametrize("steps,denoise", [(1, 0.5), (2, 0.5), (2, 0.3), (3, 0.75), (4, 0.6)])
def test_denoise_below_one_follows_comfyuis_own_rule(pack, loaded, conditioning, steps, denoise):
    """KSampler's denoise builds int(steps / denoise) steps of the schedule and runs the last `steps`."""
    import comfy.samplers
    model, positive = loaded[SD_TURBO].model, conditioning[SD_TURBO]
    sampler = comfy.samplers.KSampler(model, steps, "cpu", "turbo_euler", "turbo_trailing", denoise=denoise)
    full = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "turbo_trailing",
                                           int(steps / denoise))
    assert torch.equal(sampler.sigmas.cpu(), full[-(steps + 1):])
    image = {"samples": torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(3))}
    core = core_ksampler(model, positive, image, 11, steps, "turbo_euler", "turbo_trailing", denoise)
    ours = pack.sampler.turbo_sample(model, positive, image, sampler.sigmas.cpu(), 11, eta=0.0,
                                     noise_scale="comfy")["samples"]
    assert torch.equal(core, ours)


def test_the_core_nodes_list_the_names_and_a_core_ksampler_prompt_runs(host):
    info = host.object_info()
    for node, inputs in {"KSampler": ("sampler_name", "scheduler"), "KSamplerAdvanced": ("sampler_name", "scheduler"),
                         "BasicScheduler": ("scheduler",), "KSamplerSelect": ("sampler_name",)}.items():
        required = info[node]["input"]["required"]
        for name in inputs:
            spec = required[name]
            options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
            for ours in NAMES["scheduler" if name == "scheduler" else "sampler"]:
                assert options.count(ours) == 1, (node, name)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD_TURBO}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red bicycle", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], "seed": 5, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "turbo_euler_ancestral",
                                                   "scheduler": "turbo_trailing", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "test/ksampler_names"}},
    }
    result = host.run(prompt)
    assert result.status == "success", result.error
    assert {e["data"]["max"] for e in result.events if e["type"] == "progress"} == {2}
    assert png_size(host.view(result.images()[0])) == (64, 64)


# --- strength ---------------------------------------------------------------------------------

def test_exact_strength_mode_through_the_node(pack, loaded):
    model = loaded[SD_TURBO].model
    sampling = model.get_model_object("model_sampling")
    sigmas = pack.scheduler.turbo_model_sigmas(model, 2, 0.3, "trailing", "exact")
    assert torch.allclose(sigmas[:-1], sampling.sigma(torch.tensor([299.0, 149.0])))
    with pytest.raises(ValueError, match="no step would run"):          # the reference quantizes it away
        pack.scheduler.turbo_model_sigmas(model, 2, 0.3)
    with pytest.raises(ValueError, match="strength_mode 'exact' needs spacing 'trailing'"):
        pack.scheduler.turbo_model_sigmas(model, 2, 0.3, "stability", "exact")


def test_low_exact_strength_changes_the_image_less_than_a_higher_one_and_more_than_nothing(pack, loaded,
                                                                                       conditioning):
    model, positive = loaded[SD_TURBO].model, conditioning[SD_TURBO]
    image = {"samples": torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(5))}

    def change(strength: float) -> float:
        sigmas = pack.scheduler.turbo_model_sigmas(model, 1, strength, "trailing", "exact")
        out = pack.sampler.turbo_sample(model, positive, image, sigmas, 21, eta=0.0)["samples"]
        return float((out - image["samples"]).abs().mean())

    low, high = change(0.3), change(0.6)
    assert 0 < low < high, (low, high)


# --- inpainting -------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2])
def test_masked_sampling_keeps_the_latent_outside_the_mask_and_changes_it_inside(pack, loaded, conditioning, steps):
    """SetLatentNoiseMask's latent through Turbo Sampler: outside the mask the input latent, even at 1 step
    (ComfyUI's masked sampling puts it back after every model call, the last one included; it works on the
    model's scaled latent, so the round trip through SDXL's scale factor leaves float rounding, ~1e-7)."""
    model, positive = loaded[SDXL_TURBO].model, conditioning[SDXL_TURBO]
    samples = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    mask = torch.zeros(1, SIZE * 8, SIZE * 8)
    mask[:, 16:48, 16:48] = 1.0                                  # a square in the middle, in pixels
    sigmas = pack.scheduler.turbo_model_sigmas(model, steps)
    out = pack.sampler.turbo_sample(model, positive, {"samples": samples, "noise_mask": mask}, sigmas, 4)["samples"]
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[2:6, 2:6] = True
    assert torch.allclose(out[..., ~inside], samples[..., ~inside], rtol=1e-6, atol=1e-6)
    assert (out[..., inside] - samples[..., inside]).abs().mean() > 0.1


# --- the two workflows, over HTTP ---------------------------------------------------------------

def test_hires_fix_workflow_makes_the_image_twice_as_large_in_two_passes(host, user_models):
    prompt = shrink(load_api_twin("turbo_hires_fix"), 64)
    node_of(prompt, "SaveImage")["inputs"]["filename_prefix"] = "test/hires_fix"
    second = [n for n in prompt.values() if n["class_type"] == "TurboScheduler" and n["inputs"]["strength"] < 1]
    assert [n["inputs"]["strength_mode"] for n in second] == ["exact"]
    result = host.run(prompt)
    assert result.status == "success", result.error
    (image,) = result.images()
    assert png_size(host.view(image)) == (128, 128)
    assert [e["data"]["max"] for e in result.events if e["type"] == "progress" and e["data"]["value"] == 1] == [1, 2]


def test_inpaint_workflow_runs_with_a_painted_mask_and_the_mask_matters(host, user_models):
    """The input's alpha is the mask (transparent = redraw), as ComfyUI's Mask Editor saves it. (The pixels are
    not compared region by region: the stand-in VAE has random weights, and its decoder's attention lets every
    latent reach every pixel. test_masked_sampling_... checks the latent.)"""
    def run(alpha_hole: bool) -> bytes:
        rgba = np.zeros((TEST_SIZE, TEST_SIZE, 4), np.uint8)
        rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 40, 120, 200, 255
        if alpha_hole:
            rgba[32:96, 32:96, 3] = 0
        buffer = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
        name = f"inpaint-test-{int(alpha_hole)}.png"
        (host.base_dir / "input" / name).write_bytes(buffer.getvalue())
        prompt = copy.deepcopy(load_api_twin("turbo_inpaint"))
        node_of(prompt, "LoadImage")["inputs"]["image"] = name
        node_of(prompt, "SaveImage")["inputs"]["filename_prefix"] = "test/inpaint"
        result = host.run(prompt)
        assert result.status == "success", result.error
        data = host.view(result.images()[0])
        assert png_size(data) == (TEST_SIZE, TEST_SIZE)
        return png_pixels(data)

    assert run(alpha_hole=True) != run(alpha_hole=False)
