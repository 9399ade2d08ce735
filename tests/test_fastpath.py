"""The fast path nodes inside ComfyUI's own machinery (imported in this process, CPU).

Turbo Text Encode (prompt memo), Turbo VAE Decode (TAESD, precision, fp16 overflow) and Turbo
Fast Path (SDPA, channels_last, torch.compile with inductor) are checked against the plain path on
the same random-weight checkpoints, with LoRA and ControlNet applied. Sampling runs under
``torch.inference_mode`` as in ComfyUI's executor. No timings are asserted: speed lives in bench/.
"""
from __future__ import annotations

import logging

import pytest
import torch

from workflow_utils import SD_TURBO, SDXL_TURBO

LATENT = 8          # 64x64 images: enough for every UNet level, quick to compile


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny models gain little from two, and lose a lot when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pack(comfy):
    import comfy_turbo.nodes as nodes_pkg
    import comfy_turbo.nodes.decode as decode
    import comfy_turbo.nodes.fastpath as fastpath
    import comfy_turbo.nodes.loader as loader
    import comfy_turbo.nodes.prompt_cache as prompt_cache
    import comfy_turbo.nodes.sampler as sampler
    import comfy_turbo.nodes.scheduler as scheduler
    return type("Pack", (), dict(nodes=nodes_pkg, decode=decode, fastpath=fastpath, loader=loader,
                                 prompt_cache=prompt_cache, sampler=sampler, scheduler=scheduler))


@pytest.fixture(scope="module")
def loaded(pack, model_files):
    import folder_paths
    folder_paths.add_model_folder_path("vae_approx", str(model_files["taesd_decoder.safetensors"].parent),
                                       is_default=True)
    return {name: pack.loader.load_turbo_checkpoint(str(model_files[name])) for name in (SD_TURBO, SDXL_TURBO)}


@pytest.fixture(scope="module")
def conds(pack, loaded):
    return {name: pack.prompt_cache.encode(ckpt.clip, "a photo of a cat") for name, ckpt in loaded.items()}


def lora_for(model_files, name, model, clip, strength_model=1.0, strength_clip=0.0):
    """(model, clip) with the tiny LoRA of checkpoint ``name``, as core LoraLoader does."""
    import comfy.sd
    import comfy.utils
    lora = comfy.utils.load_torch_file(str(model_files[name.replace(".safetensors", "-lora.safetensors")]))
    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


def with_control(model_files, name, cond, strength=1.0):
    import comfy.controlnet
    cnet = comfy.controlnet.load_controlnet(str(model_files[name.replace(".safetensors", "-controlnet.safetensors")]))
    hint = torch.rand(1, 3, LATENT * 8, LATENT * 8, generator=torch.Generator().manual_seed(5))
    control = cnet.copy().set_cond_hint(hint, strength, (0.0, 1.0))
    return [[emb, {**opts, "control": control, "control_apply_to_uncond": False}] for emb, opts in cond]


def sample(pack, model, cond, steps=1, seed=7, batch=1):
    with torch.inference_mode():
        sigmas = pack.scheduler.turbo_model_sigmas(model, steps)
        latent = {"samples": torch.zeros(batch, 4, LATENT, LATENT)}
        return pack.sampler.turbo_sample(model, cond, latent, sigmas, seed)["samples"]


def rel_change(a, b):
    return ((a - b).abs().mean() / b.abs().mean()).item()


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-3)


# -- registration ------------------------------------------------------------------------------

@pytest.mark.parametrize("node_id", ["TurboTextEncode", "TurboFastPath", "TurboVAEDecode"])
def test_new_nodes_are_registered_and_documented(pack, node_id):
    (cls,) = [c for c in pack.nodes.NODE_LIST if c.define_schema().node_id == node_id]
    schema = cls.define_schema()
    assert schema.category == "sampling/turbo" and schema.display_name and len(schema.description) > 40
    for inp in schema.inputs:
        assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"


# -- Turbo Text Encode -------------------------------------------------------------------------

class _CountingEncoder:
    """Counts text-encoder passes (CLIP.encode_from_tokens calls cond_stage_model.encode_token_weights)."""

    def __init__(self, clip):
        self.model, self.calls = clip.cond_stage_model, []
        inner = self.model.encode_token_weights
        self.model.encode_token_weights = lambda *a, **k: (self.calls.append(1), inner(*a, **k))[1]

    def remove(self):
        del self.model.encode_token_weights


def test_text_encode_equals_core_and_memoises_toggled_prompts(comfy, pack, loaded):
    import nodes
    clip = loaded[SD_TURBO].clip
    pack.prompt_cache.clear()
    handle = _CountingEncoder(clip)
    calls = handle.calls
    try:
        first = pack.prompt_cache.encode(clip, "a red fox")
        assert len(calls) == 1
        (core,) = nodes.CLIPTextEncode().encode(clip, "a red fox")
        assert torch.equal(first[0][0], core[0][0])
        assert torch.equal(first[0][1]["pooled_output"], core[0][1]["pooled_output"])
        calls.clear()
        pack.prompt_cache.encode(clip, "a blue bird")                 # miss
        again = pack.prompt_cache.encode(clip, "a red fox")            # A/B toggle: hit
        assert len(calls) == 1
        assert torch.equal(again[0][0], first[0][0])
        again[0][1]["width"] = 1                                        # callers' edits stay theirs
        assert "width" not in pack.prompt_cache.encode(clip, "a red fox")[0][1]
    finally:
        handle.remove()
    assert pack.prompt_cache.stats["hits"] == 2 and pack.prompt_cache.stats["misses"] == 2


def test_text_encode_memo_follows_lora_and_clip_skip(pack, loaded, model_files):
    ckpt = loaded[SD_TURBO]
    pack.prompt_cache.clear()
    base = pack.prompt_cache.encode(ckpt.clip, "a house")
    same = pack.prompt_cache.encode(ckpt.clip.clone(), "a house")       # a clone with the same patches
    assert pack.prompt_cache.stats == {"hits": 1, "misses": 1, "uncacheable": 0}
    assert torch.equal(same[0][0], base[0][0])
    _, lora_clip = lora_for(model_files, SD_TURBO, ckpt.model, ckpt.clip, 0.0, 1.0)
    with_lora = pack.prompt_cache.encode(lora_clip, "a house")
    _, lora_half = lora_for(model_files, SD_TURBO, ckpt.model, ckpt.clip, 0.0, 0.5)
    with_half = pack.prompt_cache.encode(lora_half, "a house")
    skipped = ckpt.clip.clone()
    skipped.clip_layer(-3)
    with_skip = pack.prompt_cache.encode(skipped, "a house")
    assert pack.prompt_cache.stats["misses"] == 4
    for what, other in (("lora", with_lora), ("lora 0.5", with_half), ("clip skip", with_skip)):
        assert rel_change(other[0][0], base[0][0]) > 1e-3, what
    assert rel_change(with_lora[0][0], with_half[0][0]) > 1e-4


def test_text_encode_memo_keys_plain_object_patches_and_skips_others(pack, loaded):
    """ComfyUI 0.33 sets a ``manual_cast_dtype`` object patch on every CLIP: such plain values are part of
    the key, so the memo still works there (the toggle test above hits on 0.33 too); an object patch that
    replaces code makes the CLIP uncacheable."""
    key = pack.prompt_cache.cache_key
    clip = loaded[SD_TURBO].clip
    cast = clip.clone()
    cast.patcher.add_object_patch("manual_cast_dtype", torch.float32)
    assert key(cast, "a boat") is not None and key(cast.clone(), "a boat") == key(cast, "a boat")
    other = clip.clone()
    other.patcher.add_object_patch("manual_cast_dtype", torch.bfloat16)
    assert key(other, "a boat") != key(cast, "a boat")
    replaced = clip.clone()
    replaced.patcher.add_object_patch("encode_token_weights", lambda *a, **k: None)
    assert key(replaced, "a boat") is None


# -- Turbo VAE Decode --------------------------------------------------------------------------

def test_decode_defaults_equal_core_vae_decode_and_taesd(comfy, pack, loaded):
    import nodes
    vae = loaded[SD_TURBO].vae
    latent = {"samples": torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1))}
    with torch.inference_mode():
        ours = pack.decode.decode(vae, latent)
        (core,) = nodes.VAEDecode().decode(vae, latent)
        assert torch.equal(ours, core) and ours.shape == (2, LATENT * 8, LATENT * 8, 3)
        taesd = pack.decode.decode(vae, latent, decoder="taesd")
        (core_taesd,) = nodes.VAEDecode().decode(nodes.VAELoader().load_vae("taesd")[0], latent)
        assert torch.equal(taesd, core_taesd)
        assert rel_change(taesd, ours) > 0.01                           # really another decoder
        small = {"samples": latent["samples"][:1, :, :4, :4]}          # bf16 convolutions are slow on most CPUs
        bf16 = pack.decode.decode(vae, small, precision="bf16")
        fp32 = pack.decode.decode(vae, small, precision="fp32")
        assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max() < 0.1


def overflowing_vae(vae):
    """A VAE whose decoder activations exceed fp16's 65504 (as SDXL's do) but are fine in fp32.

    Only for ordinary latents: one scaled down by 1000 still fits fp16."""
    import comfy.sd
    sd = {k: v.clone().float() for k, v in vae.get_sd().items()}
    sd["decoder.conv_in.weight"] *= 1e5
    return comfy.sd.VAE(sd=sd, dtype=torch.float32)


def test_fp16_overflow_is_redone_in_fp32_never_a_nan_image(comfy, pack, loaded, caplog):
    import comfy.sd
    base = overflowing_vae(loaded[SDXL_TURBO].vae)
    # 16x16 pixels: fp16 convolutions are slow on the CPU
    latent = {"samples": torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2))}
    with torch.inference_mode():
        raw_fp16 = comfy.sd.VAE(sd=base.get_sd(), dtype=torch.float16).decode(latent["samples"])
        assert not torch.isfinite(raw_fp16).all()                      # the failure we guard against
        reference = base.decode(latent["samples"])
        assert torch.isfinite(reference).all()
        with caplog.at_level(logging.WARNING):
            first = pack.decode.decode(base, latent, precision="fp16")
            second = pack.decode.decode(base, latent, precision="fp16")
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert sum("fp16 overflow" in r.getMessage() for r in caplog.records) == 1   # said once per VAE


def test_an_overflow_redoes_only_that_decode_so_each_vae_decodes_the_same_every_time(comfy, pack, loaded, caplog):
    """No decode depends on an earlier one: after a VAE overflowed, a latent that fits fp16 still decodes in fp16,
    with that VAE and with a second VAE object of the same weights."""
    first, second = overflowing_vae(loaded[SDXL_TURBO].vae), overflowing_vae(loaded[SDXL_TURBO].vae)
    overflowing = {"samples": torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2))}
    fitting = {"samples": overflowing["samples"] * 1e-3}
    with torch.inference_mode():
        fp16 = pack.decode.decode(first, fitting, precision="fp16")
        assert not torch.equal(fp16, pack.decode.decode(first, fitting, precision="fp32"))   # fp16 really ran
        with caplog.at_level(logging.WARNING, logger="comfy_turbo"):
            redone = pack.decode.decode(first, overflowing, precision="fp16")
        assert "fp16 overflow" in caplog.text and torch.equal(redone, first.decode(overflowing["samples"]))
        assert torch.equal(pack.decode.decode(first, fitting, precision="fp16"), fp16)      # still fp16 after it
        assert torch.equal(pack.decode.decode(second, fitting, precision="fp16"), fp16)     # the other VAE too
        assert torch.equal(pack.decode.decode(first, overflowing, precision="fp16"), redone)


def test_decode_refuses_a_broken_latent_and_a_missing_taesd(pack, loaded):
    bad = torch.zeros(1, 4, 2, 2)
    bad[0, 0, 0, 0] = float("nan")
    with torch.inference_mode(), pytest.raises(pack.loader.TurboError, match="NaN or inf even in fp32"):
        pack.decode.decode(loaded[SD_TURBO].vae, {"samples": bad}, precision="fp16")
    with pytest.raises(pack.loader.TurboError, match="taesd3_decoder is missing"):
        pack.decode.load_taesd("taesd3")


# -- Turbo Fast Path ---------------------------------------------------------------------------

def _is_channels_last(model):
    weights = [p for p in model.model.diffusion_model.parameters() if p.dim() == 4]
    return weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


@pytest.mark.parametrize("name", [SD_TURBO, SDXL_TURBO])
def test_fast_path_matches_plain_path_with_lora_and_controlnet(pack, loaded, conds, model_files, name):
    ckpt, cond = loaded[name], conds[name]
    fast = pack.fastpath.apply_fast_path(ckpt.model, attention="sdpa", channels_last=True)
    plain = sample(pack, ckpt.model, cond, steps=2)
    ours = sample(pack, fast, cond, steps=2)
    close(ours, plain)
    assert _is_channels_last(fast)
    assert "optimized_attention_override" not in ckpt.model.model_options.get("transformer_options", {})

    lora_model, _ = lora_for(model_files, name, ckpt.model, ckpt.clip)
    fast_lora = pack.fastpath.apply_fast_path(lora_model)
    plain_lora = sample(pack, lora_model, cond, steps=2)
    close(sample(pack, fast_lora, cond, steps=2), plain_lora)
    assert rel_change(plain_lora, plain) > 0.05

    controlled = with_control(model_files, name, cond)
    plain_control = sample(pack, ckpt.model, controlled, steps=2)
    close(sample(pack, fast, controlled, steps=2), plain_control)
    assert rel_change(plain_control, plain) > 0.05


def test_pinned_sdpa_backends_agree(pack, loaded, conds):
    ckpt, cond = loaded[SD_TURBO], conds[SD_TURBO]
    plain = sample(pack, ckpt.model, cond)
    for backend in ("flash", "math", "efficient"):                   # 'efficient' cannot run on CPU: math
        close(sample(pack, pack.fastpath.apply_fast_path(ckpt.model, sdpa_backend=backend), cond), plain)


def test_fast_path_in_core_sampler_custom(comfy, pack, loaded, conds):
    import comfy.sample
    ckpt, cond = loaded[SDXL_TURBO], conds[SDXL_TURBO]
    fast = pack.fastpath.apply_fast_path(ckpt.model)
    sigmas = pack.scheduler.turbo_model_sigmas(ckpt.model, 1)
    sampler = pack.sampler.TurboEulerSampler.execute(1.0, 1.0, "diffusers").result[0]
    latent = torch.zeros(1, 4, LATENT, LATENT)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        outs = [comfy.sample.sample_custom(m, noise, 1.0, sampler, sigmas, cond, cond, latent, seed=0)
                for m in (ckpt.model, fast)]
    close(outs[1], outs[0])


def test_compiled_fast_path_follows_lora_and_controlnet(pack, conds, model_files):
    """torch.compile (inductor, CPU): same latents as eager; LoRA and ControlNet changes still apply.

    The checkpoint is loaded under inference_mode, as ComfyUI's executor loads it (its weights are
    then inference tensors, which channels_last conversion and the compiled graph must respect).
    """
    from torch._dynamo.utils import counters
    with torch.inference_mode():
        ckpt = pack.loader.load_turbo_checkpoint(str(model_files[SD_TURBO]))
    cond = conds[SD_TURBO]
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = pack.fastpath.apply_fast_path(ckpt.model, compile="inductor")
    plain = sample(pack, ckpt.model, cond)
    close(sample(pack, compiled, cond), plain)
    assert counters["stats"]["unique_graphs"] > graphs_before        # inductor really compiled the UNet
    state = pack.fastpath.fast_path_state(compiled)
    unet = ckpt.model.model.diffusion_model
    assert state.compiled_unet(unet, "default") is state.compiled_unet(unet, "default")   # one compile per UNet

    graphs_compiled = counters["stats"]["unique_graphs"]
    results = {}
    for strength in (1.0, 0.5):                                        # LoRA patched after the fast path
        lora_model, _ = lora_for(model_files, SD_TURBO, compiled, ckpt.clip, strength)
        plain_lora, _ = lora_for(model_files, SD_TURBO, ckpt.model, ckpt.clip, strength)
        results[strength] = sample(pack, lora_model, cond)
        close(results[strength], sample(pack, plain_lora, cond))
    assert rel_change(results[1.0], plain) > 0.05 and rel_change(results[1.0], results[0.5]) > 0.02
    close(sample(pack, compiled, cond), plain)                         # LoRA unpatched again
    assert counters["stats"]["unique_graphs"] == graphs_compiled        # LoRA weights are graph inputs

    controlled = with_control(model_files, SD_TURBO, cond)
    plain_control = sample(pack, ckpt.model, controlled)
    close(sample(pack, compiled, controlled), plain_control)
    assert rel_change(plain_control, plain) > 0.05
    weaker = with_control(model_files, SD_TURBO, cond, strength=0.3)
    close(sample(pack, compiled, weaker), sample(pack, ckpt.model, weaker))


def test_fast_path_refuses_unknown_options(pack, loaded):
    with pytest.raises(pack.loader.TurboError, match="Unknown compile 'reduce-overhead'"):
        pack.fastpath.apply_fast_path(loaded[SD_TURBO].model, compile="reduce-overhead")


def test_another_nodes_attention_override_is_never_overwritten(pack, loaded, conds, caplog):
    """SageAttention and the like set transformer_options['optimized_attention_override'] too."""
    ckpt = loaded[SD_TURBO]
    calls = []

    def sage_like(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)

    other = ckpt.model.clone()
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = sage_like
    told = []
    kept_by_sdpa = pack.fastpath.apply_fast_path(other, attention="sdpa", notify=told.append)
    assert len(told) == 1 and "Another node already replaced this model's attention" in told[0] \
        and "keeps it and does not use SDPA" in told[0] and "Set attention to 'comfy'" in told[0]
    assert kept_by_sdpa.model_options["transformer_options"]["optimized_attention_override"] is sage_like
    with caplog.at_level(logging.INFO, logger="comfy_turbo"):
        kept = pack.fastpath.apply_fast_path(other, attention="comfy")
    assert "keeps another node's attention override" in caplog.text
    assert kept.model_options["transformer_options"]["optimized_attention_override"] is sage_like
    close(sample(pack, kept, conds[SD_TURBO]), sample(pack, other, conds[SD_TURBO]))
    assert calls, "the other node's attention did not run"
    # An earlier fast path's SDPA is not "another node": attention='comfy' after it means ComfyUI's attention.
    sdpa = pack.fastpath.apply_fast_path(ckpt.model, attention="sdpa")
    again = pack.fastpath.apply_fast_path(sdpa, attention="comfy")
    assert "optimized_attention_override" not in again.model_options["transformer_options"]
    assert pack.fastpath.apply_fast_path(sdpa, attention="sdpa").model_options["transformer_options"][
        "optimized_attention_override"] is pack.fastpath.sdpa_attention


def test_compile_settings_name_what_torch_compile_really_runs_with(pack):
    """Results files record these (bench/run.py's compile_settings): the mode's inductor options, as changed."""
    import json
    cpu = pack.fastpath.compile_settings("default", "cpu")
    assert cpu["backend"] == "inductor" and cpu["dynamic"] is False and cpu["options"]["layout_optimization"] is False
    assert "layout_optimization" not in pack.fastpath.compile_settings("default", "cuda")["options"]
    assert json.loads(json.dumps(pack.fastpath.compile_settings("max-autotune-no-cudagraphs", "cuda")))["mode"] \
        == "max-autotune-no-cudagraphs"
