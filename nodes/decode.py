"""Turbo VAE Decode: VAE Decode with a TAESD option, a precision choice and a guarantee of finite pixels.

* ``decoder``: the checkpoint's VAE, or Ollin Boer Bohan's tiny TAESD / TAESDXL decoder
  (github.com/madebyollin/taesd, ~1/20 of the VAE's work), loaded from ``models/vae_approx`` with
  core ``VAELoader``'s own loader, once per process.
* ``precision``: run the decoder in fp16 / bf16 / fp32 instead of the dtype ComfyUI picked. The VAE
  is copied once per (VAE, dtype) with ``comfy.sd.VAE(sd=vae.get_sd(), dtype=...)``; the original is
  left alone.
* SDXL's original VAE overflows fp16 (activations above 65504 become inf, then NaN: black images;
  the reason madebyollin/sdxl-vae-fp16-fix exists). Whatever the precision, a decode that returns a
  non-finite pixel is redone in fp32. Each decode decides for itself, so an image never depends on
  what the worker decoded before. Only a latent that is itself broken still fails, with an error
  instead of a black image.
* ``compile``: ``torch.compile`` of the decoder copy (fixed shapes, SDPA attention), as the fast path does
  for the UNet.
"""
from __future__ import annotations

import logging
import os
import weakref

import torch

import comfy.ldm.modules.diffusionmodules.model as vae_model
import comfy.sd
import folder_paths
import nodes
from comfy_api.latest import io

from .errors import TurboError
from .fastpath import inductor_options

DECODERS = ("vae", "taesd", "taesdxl")
PRECISIONS = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_taesd: dict[tuple, object] = {}
# Per VAE object, dying with it: its dtype / compiled copies, and whether its overflow was reported.
_derived: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
log = logging.getLogger("comfy_turbo")


def load_taesd(name: str):
    """TAESD / TAESDXL as a ComfyUI VAE, read by core VAELoader from models/vae_approx (cached)."""
    files = folder_paths.get_filename_list("vae_approx")
    missing = [part for part in ("encoder", "decoder") if not any(f.startswith(f"{name}_{part}.") for f in files)]
    if missing:
        raise TurboError(
            f"decoder '{name}' needs {name}_encoder and {name}_decoder (.safetensors or .pth) in models/vae_approx; "
            f"{' and '.join(name + '_' + m for m in missing)} is missing. Download them from "
            "github.com/madebyollin/taesd, or set decoder to 'vae'.")
    path = folder_paths.get_full_path("vae_approx", next(f for f in files if f.startswith(f"{name}_decoder.")))
    key = (name, path, os.path.getmtime(path))
    if key not in _taesd:
        _taesd.clear()  # at most one generation of files
        _taesd[key] = nodes.VAELoader().load_vae(name)[0]
    return _taesd[key]


def derived_vae(base, dtype: torch.dtype, compile: bool = False):
    """A private copy of ``base`` in ``dtype`` (optionally with a compiled decoder), made once."""
    variants = _derived.setdefault(base, {})
    key = (dtype, compile)
    if key not in variants:
        vae = comfy.sd.VAE(sd=base.get_sd(), dtype=dtype)
        if compile:
            model = vae.first_stage_model
            # On the CPU ComfyUI's VAE attention slices by free memory, a value torch.compile would
            # guard on and recompile for; our private copy uses SDPA, as ComfyUI does on GPUs.
            for module in model.modules():
                if isinstance(module, vae_model.AttnBlock):
                    module.optimized_attention = vae_model.pytorch_attention
            model.decode = torch.compile(model.decode, backend="inductor", dynamic=False,
                                         options=inductor_options("default", vae.device))
        variants[key] = vae
    return variants[key]


def _runner(base, dtype: torch.dtype, compile: bool):
    """``base`` itself where it already is what was asked for, else its private copy."""
    return base if dtype == base.vae_dtype and not compile else derived_vae(base, dtype, compile)


def _finite(images: torch.Tensor) -> bool:
    return bool(torch.isfinite(images).all())


def decode(vae, latent: dict, decoder: str = "vae", precision: str = "auto", compile: bool = False) -> torch.Tensor:
    """Decode ``latent["samples"]`` to an IMAGE ([B, H, W, C] in 0..1, all finite), as core VAEDecode does."""
    if decoder not in DECODERS:
        raise TurboError(f"Unknown decoder {decoder!r}: use one of {', '.join(DECODERS)}.")
    if precision not in PRECISIONS:
        raise TurboError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    base = vae if decoder == "vae" else load_taesd(decoder)
    if base is None or getattr(base, "first_stage_model", None) is None:
        raise TurboError("The VAE input is empty: the checkpoint has no VAE. Connect a 'Load VAE' node.")
    samples = latent["samples"]
    dtype = PRECISIONS[precision] or base.vae_dtype
    images = _runner(base, dtype, compile).decode(samples)
    if not _finite(images) and dtype != torch.float32:
        # Redo this decode only: a sticky "use fp32" flag would make the same job decode differently
        # depending on what this VAE decoded earlier. Only the warning is remembered, once per VAE.
        warned = _derived.setdefault(base, {})
        if not warned.get(("overflow warned", dtype)):
            warned[("overflow warned", dtype)] = True
            log.warning("comfy-turbo: the %s decoder produced NaN/inf pixels in %s (fp16 overflow); each such "
                        "decode is redone in fp32. Set precision to fp32 (or bf16) to skip the wasted pass.",
                        decoder, str(dtype).replace("torch.", ""))
        images = _runner(base, torch.float32, compile).decode(samples)
    if not _finite(images):
        raise TurboError("The decoded image contains NaN or inf even in fp32: the latent is broken (did the UNet "
                         "overflow in fp16? try weight_dtype bf16 or fp32 on the loader).")
    if images.ndim == 5:  # video VAEs return [B, T, H, W, C]; as core VAEDecode, combine batches
        images = images.reshape(-1, *images.shape[-3:])
    return images


class TurboVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TurboVAEDecode",
            display_name="Turbo VAE Decode",
            category="sampling/turbo",
            description=(
                "Decodes a latent like VAE Decode, with the tiny TAESD / TAESDXL decoder as a fast option, a "
                "precision choice, and no black or NaN images: a decode that overflows fp16 is redone in fp32."),
            inputs=[
                io.Latent.Input("samples", tooltip="The latent from Turbo Sampler."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE (used when decoder is 'vae').",),
                io.Combo.Input("decoder", options=list(DECODERS), default="vae",
                               tooltip="'vae': the full VAE, best quality. 'taesd' (SD-Turbo) / 'taesdxl' "
                                       "(SDXL-Turbo): the tiny TAESD decoders from models/vae_approx, much faster, "
                                       "slightly softer."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="'auto': the dtype ComfyUI chose for this VAE. fp16 / bf16 are faster on "
                                       "GPUs; an fp16 overflow is detected and redone in fp32."),
                io.Boolean.Input("compile", default=False,
                                 tooltip="torch.compile the decoder (per image size and batch; the first decode "
                                         "compiles for a while). Needs a C++ compiler on the CPU, Triton on the GPU."),
            ],
            outputs=[io.Image.Output(tooltip="The decoded image.")],
        )

    @classmethod
    def execute(cls, samples, vae, decoder="vae", precision="auto", compile=False) -> io.NodeOutput:
        return io.NodeOutput(decode(vae, samples, decoder, precision, compile))
