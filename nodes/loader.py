"""Turbo checkpoint loader: ComfyUI's own single-file loading, restricted to the Turbo families."""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass

import torch

import comfy.model_base
import comfy.model_detection
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from .errors import TurboError

# ComfyUI's detected model class -> the Turbo variant it can hold. SDXL's distilled cousins
# (SSD-1B, Vega, KOALA) share SDXL's conditioning and epsilon schedule.
TURBO_VARIANTS = {
    "SD20": "sd-turbo",
    "SDXL": "sdxl-turbo",
    "SSD1B": "sdxl-turbo",
    "Segmind_Vega": "sdxl-turbo",
    "KOALA_700M": "sdxl-turbo",
    "KOALA_1B": "sdxl-turbo",
}
NATIVE_RESOLUTION = 512  # both SD-Turbo and SDXL-Turbo were distilled at 512x512
_HAS_DYNAMIC_VRAM = "disable_dynamic" in inspect.signature(comfy.sd.load_state_dict_guess_config).parameters
WEIGHT_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The keys by which an SDXL-family checkpoint declares another prediction type, in the order
# ComfyUI's SDXL.model_type reads them (0.3.75 and 0.33 alike); no Turbo model carries one.
DECLARED_PREDICTIONS = (
    (("edm_mean", "edm_std"), "EDM prediction (keys edm_mean, edm_std: Playground v2.5 style)"),
    (("edm_vpred.sigma_max",), "v-prediction EDM (key edm_vpred.sigma_max)"),
    (("v_pred",), "v-prediction (key v_pred)"),
)

log = logging.getLogger("comfy_turbo")


@dataclass
class TurboCheckpoint:
    model: object
    clip: object
    vae: object
    variant: str
    family: str
    width: int = NATIVE_RESOLUTION
    height: int = NATIVE_RESOLUTION


def _detect(state_dict: dict, metadata: dict | None = None):
    """(UNet key prefix, ComfyUI's model config or None) for a checkpoint's state dict."""
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state_dict)
    return prefix, comfy.model_detection.model_config_from_unet(state_dict, prefix, metadata=metadata)


def detect_family(state_dict: dict, metadata: dict | None = None) -> str:
    """ComfyUI's name for the model family of a checkpoint's UNet, e.g. 'SD20', 'SDXL', 'SD15', 'Flux'."""
    _, config = _detect(state_dict, metadata)
    return type(config).__name__ if config is not None else "unrecognised"


def check_prediction(name: str, state_dict: dict, prefix: str, config) -> None:
    """Refuse a checkpoint that ComfyUI loads as non-epsilon, except where that is SD2's guess.

    SDXL-family files are v-prediction or EDM only by declaring it with a key, so forcing epsilon on
    them would give noise. SD20's guess is a weight statistic (std of output_blocks.11.1's norm1.bias
    > 0.09) that real SD-Turbo trips; it ignores ``v_pred`` keys, which ComfyUI writes when it saves a
    model it guessed so (an SD-Turbo merge saved with core nodes). That one is overridden, with a note in the log.
    """
    detected = config.model_type(state_dict, prefix)       # what ComfyUI's own loader makes of it
    if detected == comfy.model_base.ModelType.EPS:
        return
    if type(config).__name__ == "SD20":
        log.info(      # the expected case (real SD-Turbo trips it): a note, not a warning
            "comfy-turbo: ComfyUI's SD2 heuristic guesses v-prediction for '%s', as it does for real SD-Turbo; "
            "loading it as epsilon, as SD-Turbo is. If this is an SD 2.x 768-v model rather than SD-Turbo, use "
            "the core 'Load Checkpoint' node.", name)
        return
    problem = next((f"declares {what}" for keys, what in DECLARED_PREDICTIONS if all(k in state_dict for k in keys)),
                   f"is detected by ComfyUI as {detected.name}")
    raise TurboError(
        f"'{name}' {problem}, but SD-Turbo and SDXL-Turbo are epsilon-prediction models, so it is not a Turbo "
        "checkpoint. Load it with the core 'Load Checkpoint' node, or pick an SD-Turbo / SDXL-Turbo file.")


def force_epsilon(model_patcher) -> None:
    """Make a freshly loaded model epsilon-prediction with discrete (scaled-linear) sampling.

    ``check_prediction`` has refused files that declare another type; what remains to override is
    ComfyUI's SD2 v-prediction guess, which real SD-Turbo trips.
    """
    base = model_patcher.model
    if base.model_type != comfy.model_base.ModelType.EPS:
        base.model_type = comfy.model_base.ModelType.EPS
        base.model_sampling = comfy.model_base.model_sampling(base.model_config, comfy.model_base.ModelType.EPS)


def unreadable_file_message(name: str, path: str, error: Exception) -> str:
    """Say why a checkpoint file could not be read, and what to do about it."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    if size == 0:
        return f"'{name}' is empty (0 bytes): the download or copy failed. Download the file again."
    if type(error).__name__ == "SafetensorError" or path.lower().endswith((".safetensors", ".sft")):
        return (f"'{name}' is not a complete safetensors file ({error}; {size:,} bytes on disk): it is truncated "
                "or corrupt. Download it again and check its size against the model page.")
    if "weights_only" in str(error) or "Weights only load failed" in str(error):
        return (f"'{name}' is a pickle checkpoint holding Python objects besides tensors. comfy-turbo loads "
                ".ckpt/.pt files only with torch.load(weights_only=True), so none of its code ran. Use the "
                ".safetensors release of the model instead.")
    return f"'{name}' could not be read ({type(error).__name__}: {error}). Download the file again."


def load_turbo_checkpoint(ckpt_path: str, weight_dtype: str = "default") -> TurboCheckpoint:
    name = os.path.basename(ckpt_path)
    if weight_dtype not in WEIGHT_DTYPES:
        raise TurboError(f"Unknown weight_dtype {weight_dtype!r}: use one of {', '.join(WEIGHT_DTYPES)}.")
    try:
        # safe_load: pickles go through torch.load(weights_only=True) and never execute code.
        sd, metadata = comfy.utils.load_torch_file(ckpt_path, safe_load=True, return_metadata=True)
    except Exception as e:
        raise TurboError(unreadable_file_message(name, ckpt_path, e)) from e
    prefix, config = _detect(sd, metadata)
    family = type(config).__name__ if config is not None else "unrecognised"
    if family == "unrecognised":
        raise TurboError(
            f"'{name}' holds no diffusion model that ComfyUI recognises, so it is not an SD-Turbo or SDXL-Turbo "
            "checkpoint (LoRA, VAE, ControlNet and text-encoder files belong in their own loaders). "
            "Pick an SD-Turbo / SDXL-Turbo checkpoint.")
    variant = TURBO_VARIANTS.get(family)
    if variant is None:
        raise TurboError(
            f"'{name}' is a {family} checkpoint, not SD-Turbo (SD 2.1 family) or SDXL-Turbo (SDXL family). "
            "Load it with the core 'Load Checkpoint' node, or pick an SD-Turbo / SDXL-Turbo file.")
    check_prediction(name, sd, prefix, config)
    model, clip, vae = _load_parts(sd, metadata, weight_dtype, output_clip=True, output_vae=True)
    if clip is None:
        raise TurboError(
            f"'{name}' has no text encoder weights. Use a full SD-Turbo / SDXL-Turbo checkpoint, or load this "
            "UNet with the core 'Load Diffusion Model' node and the text encoder with 'Load CLIP'.")
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise TurboError(
            f"'{name}' has no VAE weights. Use a full SD-Turbo / SDXL-Turbo checkpoint, or add a core "
            "'Load VAE' node (e.g. sdxl_vae.safetensors, or taesd/taesdxl) and decode with it.")
    force_epsilon(model)
    _register_reload(ckpt_path, weight_dtype, model, clip, vae)
    return TurboCheckpoint(model=model, clip=clip, vae=vae, variant=variant, family=family)


def _load_parts(sd: dict, metadata, weight_dtype: str, output_clip: bool, output_vae: bool,
                output_model: bool = True, disable_dynamic: bool = False):
    """(model, clip, vae) from ComfyUI's own single-file loader."""
    model_options = {}
    if WEIGHT_DTYPES[weight_dtype] is not None:
        model_options["dtype"] = WEIGHT_DTYPES[weight_dtype]
    # ComfyUI 0.33 loads into dynamic-VRAM patchers unless told not to; 0.3.75 has no such argument
    # (and no dynamic patchers).
    extra = {"disable_dynamic": True} if disable_dynamic and _HAS_DYNAMIC_VRAM else {}
    model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
        sd, output_vae=output_vae, output_clip=output_clip, output_model=output_model,
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        model_options=model_options, metadata=metadata, **extra)
    return model, clip, vae


def reload_turbo_part(ckpt_path: str, weight_dtype: str, part: str, disable_dynamic: bool = False):
    """A fresh patcher for one part ("model", "clip" or "vae") of a Turbo checkpoint.

    This is the ``cached_patcher_init`` factory of everything ``load_turbo_checkpoint`` returns, as core
    ``load_checkpoint_guess_config`` registers its own: ComfyUI 0.33 calls it to make a non-dynamic
    copy (``clone(disable_dynamic=True)``, which Turbo Fast Path and core TorchCompileModel use) and
    per-GPU copies. ComfyUI 0.3.75 never calls it.
    """
    sd, metadata = comfy.utils.load_torch_file(ckpt_path, safe_load=True, return_metadata=True)
    model, clip, vae = _load_parts(sd, metadata, weight_dtype, output_clip=part == "clip", output_vae=part == "vae",
                                   output_model=part == "model", disable_dynamic=disable_dynamic)
    if part == "model":
        force_epsilon(model)
    patcher = {"model": model, "clip": getattr(clip, "patcher", None), "vae": getattr(vae, "patcher", None)}[part]
    patcher.cached_patcher_init = (reload_turbo_part, (ckpt_path, weight_dtype, part))
    return patcher


def _register_reload(ckpt_path: str, weight_dtype: str, model, clip, vae) -> None:
    for part, patcher in (("model", model), ("clip", getattr(clip, "patcher", None)),
                          ("vae", getattr(vae, "patcher", None))):
        if patcher is not None:
            patcher.cached_patcher_init = (reload_turbo_part, (ckpt_path, weight_dtype, part))


class TurboCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TurboCheckpointLoader",
            display_name="Load Turbo Checkpoint",
            category="sampling/turbo",
            description=(
                "Loads an SD-Turbo or SDXL-Turbo single-file checkpoint (including SDXL turbo merges) with "
                "ComfyUI's own loader, forces epsilon prediction, and reports the variant and its native "
                "512x512 resolution. Other model families are refused with a clear error."),
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="A checkpoint in models/checkpoints: sd_turbo.safetensors, "
                                       "sd_xl_turbo_1.0_fp16.safetensors or an SDXL turbo merge."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="UNet weight precision. 'default' lets ComfyUI choose for your device."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The denoising UNet, epsilon prediction."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder(s) for CLIP Text Encode."),
                io.Vae.Output(display_name="VAE", tooltip="The VAE for encoding and decoding images."),
                io.String.Output(display_name="variant", tooltip="'sd-turbo' or 'sdxl-turbo'."),
                io.Int.Output(display_name="width", tooltip="Native width: 512."),
                io.Int.Output(display_name="height", tooltip="Native height: 512."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name, weight_dtype="default") -> io.NodeOutput:
        path = folder_paths.get_full_path("checkpoints", ckpt_name)
        if path is None:
            raise TurboError(f"Checkpoint '{ckpt_name}' is not in models/checkpoints. "
                             "Put the file there and refresh the page (press R).")
        ckpt = load_turbo_checkpoint(path, weight_dtype)
        return io.NodeOutput(ckpt.model, ckpt.clip, ckpt.vae, ckpt.variant, ckpt.width, ckpt.height)
