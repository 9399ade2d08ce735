"""The CFG-free Turbo sampler, as a SAMPLER for SamplerCustom(Advanced) and as a one-node sampler.

Both run ``samplers.sample_turbo_euler`` inside ComfyUI's own sampling machinery (CFGGuider ->
KSAMPLER), so model management, LoRA patches, ControlNet, previews and Cancel behave as in core.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..samplers import NOISE_SCALES, sample_turbo_euler
from .errors import TurboError

SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


class TurboKSAMPLER(comfy.samplers.KSAMPLER):
    """KSAMPLER running the Turbo Euler loop, with the choice of initial noise scale.

    ComfyUI scales the first noise by sqrt(1 + sigma²) when a schedule starts at sigma_max
    ("comfy"); diffusers scales it by sigma ("diffusers", the default).
    """

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, noise_scale: str = "diffusers"):
        if noise_scale not in NOISE_SCALES:
            raise TurboError(f"Unknown noise_scale {noise_scale!r}: use one of {', '.join(NOISE_SCALES)}.")
        super().__init__(sample_turbo_euler, extra_options={"eta": float(eta), "s_noise": float(s_noise)})
        self.noise_scale = noise_scale

    def max_denoise(self, model_wrap, sigmas):
        return self.noise_scale == "comfy" and super().max_denoise(model_wrap, sigmas)


def check_sigmas(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise TurboError(f"SIGMAS holds no step (shape {tuple(sigmas.shape)}); connect a Turbo Scheduler "
                         "with steps * strength >= 1.")
    if not torch.isfinite(sigmas).all():
        raise TurboError("SIGMAS contains NaN or inf; connect a Turbo Scheduler.")


def check_latent(model, samples: torch.Tensor) -> None:
    """Refuse latents this model cannot denoise, before any work is done."""
    channels = model.get_model_object("latent_format").latent_channels
    if samples.ndim != 4:
        raise TurboError(
            f"The latent has shape {tuple(samples.shape)}, but an image latent is [batch, {channels}, height/8, "
            "width/8] (video and audio latents do not fit). Make it with Empty Latent Image or VAE Encode.")
    if samples.shape[1] != channels:
        raise TurboError(
            f"The latent has {samples.shape[1]} channels (shape {tuple(samples.shape)}), but this model needs "
            f"{channels}. It comes from another model family (16 channels: SD3/Flux); make it with Empty Latent "
            "Image, or VAE Encode with this checkpoint's VAE.")
    if min(samples.shape[-2:]) < 1:
        raise TurboError(f"The latent is empty (shape {tuple(samples.shape)}); give it a width and height.")
    if not torch.isfinite(samples).all():
        raise TurboError("The input latent contains NaN or inf values. Re-encode the image with VAE Encode, "
                         "or fix the node that produced the latent.")


def check_conditioning(model, positive) -> None:
    """Refuse prompts encoded for another family: their width would fail deep inside the UNet."""
    if not positive:
        raise TurboError("The positive conditioning is empty; connect a CLIP Text Encode node.")
    context_dim = model.model.model_config.unet_config.get("context_dim")
    for emb, _ in positive:
        if context_dim is not None and emb.shape[-1] != context_dim:
            raise TurboError(
                f"The prompt was encoded {emb.shape[-1]} wide, but this model's UNet needs {context_dim}: it came "
                "from another model's text encoder. Encode it with the CLIP output of this checkpoint.")


def with_size_conditioning(conditioning: list, width: int, height: int) -> list:
    """Fill SDXL's size/crop conditioning where it is unset, as diffusers does at the image size.

    ComfyUI otherwise assumes 768x768; entries that already carry sizes (CLIPTextEncodeSDXL) are kept.
    SD 2.x ignores these keys.
    """
    defaults = dict(zip(SIZE_KEYS, (width, height, 0, 0, width, height)))
    return [[emb, {**defaults, **opts}] for emb, opts in conditioning]


def turbo_sample(model, positive, latent: dict, sigmas: torch.Tensor, seed: int, eta: float = 1.0,
                 s_noise: float = 1.0, noise_scale: str = "diffusers", sampler=None) -> dict:
    """Sample a LATENT with positive conditioning only: one model call per step, no CFG.

    ``sampler``: a KSAMPLER to run instead of Turbo Euler (Turbo Family Schedule's SAMPLER, whose family
    sets its own eta and initial noise); ``eta``, ``s_noise`` and ``noise_scale`` then do not apply."""
    check_sigmas(sigmas)
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    check_latent(model, samples)
    check_conditioning(model, positive)
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    height, width = samples.shape[-2] * 8, samples.shape[-1] * 8

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": with_size_conditioning(positive, width, height)})
    guider.set_cfg(1.0)
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1, {})
    sampler = TurboKSAMPLER(eta, s_noise, noise_scale) if sampler is None else sampler
    result = guider.sample(noise, samples, sampler, sigmas,
                           denoise_mask=latent.get("noise_mask"), callback=callback,
                           disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = result.to(comfy.model_management.intermediate_device())
    return out


def _eta_input():
    return io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01,
                          tooltip="Fresh noise per step. 1.0: Euler ancestral (sdxl-turbo's scheduler). "
                                  "0.0: deterministic Euler (sd-turbo's). No effect at 1 step.")


def _s_noise_input():
    return io.Float.Input("s_noise", default=1.0, min=0.0, max=2.0, step=0.01,
                          tooltip="Multiplier on the ancestral noise; 1.0 is the reference.")


def _noise_scale_input():
    return io.Combo.Input("noise_scale", options=list(NOISE_SCALES), default="diffusers",
                          tooltip="Initial noise: 'diffusers' multiplies it by sigma_max (the reference); "
                                  "'comfy' by sqrt(1 + sigma_max²), ComfyUI's default, about 0.2% more.")


class TurboEulerSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TurboEulerSampler",
            display_name="Turbo Euler Sampler (CFG-free)",
            category="sampling/turbo",
            description=("A SAMPLER for SamplerCustom / SamplerCustomAdvanced: Euler ancestral (eta=1) or Euler "
                         "(eta=0) with one model call per step. Use cfg 1.0 in SamplerCustom, or BasicGuider."),
            inputs=[_eta_input(), _s_noise_input(), _noise_scale_input()],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustom or SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, eta=1.0, s_noise=1.0, noise_scale="diffusers") -> io.NodeOutput:
        return io.NodeOutput(TurboKSAMPLER(eta, s_noise, noise_scale))


class TurboSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TurboSampler",
            display_name="Turbo Sampler",
            category="sampling/turbo",
            description=("Samples SD-Turbo / SDXL-Turbo without classifier-free guidance: one model call per "
                         "step, positive prompt only. Connect sigmas from Turbo Scheduler."),
            inputs=[
                io.Model.Input("model", tooltip="The Turbo model (LoRA-patched models work)."),
                io.Conditioning.Input("positive", tooltip="The prompt (ControlNet-applied conditioning works). "
                                                          "There is no negative: guidance is off."),
                io.Latent.Input("latent_image", tooltip="Empty Latent Image for text-to-image, VAE Encode for "
                                                        "image-to-image (with strength < 1 on the scheduler)."),
                io.Sigmas.Input("sigmas", tooltip="From Turbo Scheduler, or Turbo Family Schedule's SIGMAS."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the initial and ancestral noise."),
                _eta_input(), _s_noise_input(), _noise_scale_input(),
                io.Sampler.Input("sampler", optional=True,
                                 tooltip="Optional: Turbo Family Schedule's SAMPLER (with its MODEL and SIGMAS), to "
                                         "sample any SD / SDXL few-step family here (the flow families run in "
                                         "SamplerCustomAdvanced). eta, s_noise and noise_scale are then "
                                         "the family's and the three widgets do not apply."),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent, for VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, sigmas, seed, eta=1.0, s_noise=1.0,
                noise_scale="diffusers", sampler=None) -> io.NodeOutput:
        return io.NodeOutput(turbo_sample(model, positive, latent_image, sigmas, seed, eta, s_noise, noise_scale,
                                          sampler))
