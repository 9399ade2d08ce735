"""Turbo checkpoint loader: ComfyUI's own single-file loading, restricted to the few-step families.

The weights tell the architecture (SD 1.x, SD 2.x, SDXL), never the distillation: a Lightning, DMD2,
Hyper-SD, LCM or PCM merge is an ordinary SDXL (or SD 1.5) file. So the ``family`` input decides,
checked against the architecture, and the default ``turbo`` is what the loader always did: SD-Turbo
for an SD 2.x file, SDXL-Turbo for an SDXL one. The family chosen is recorded on the MODEL (a
ModelPatcher attachment, which clones keep) so Turbo Family Schedule can say when it samples the
model as another family.
"""
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

from ..samplers import families as fam
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
# ComfyUI's detected model class -> the architecture names samplers/families.py uses.
ARCHITECTURE_OF = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
                   "KOALA_700M": "sdxl", "KOALA_1B": "sdxl"}
ARCHITECTURE_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# The families this loader takes (epsilon-prediction SD / SDXL distillations); "turbo" picks SD-Turbo or
# SDXL-Turbo by architecture. The flow families (SD3.5 Large Turbo, FLUX.1-schnell) come in through
# ComfyUI's own loaders.
LOADER_FAMILIES = ("turbo", "sd-turbo", "sdxl-turbo", "sdxl-lightning", "dmd2", "hyper-sd", "hyper-sd-1step-unet",
                   "hyper-sd-unified", "lcm", "tcd", "pcm")
FAMILY_ATTACHMENT = "comfy_turbo.family"   # the family a MODEL was loaded as
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
    variant: str            # the few-step family it was loaded as: "sd-turbo", "dmd2", ...
    family: str             # ComfyUI's model config class: "SD20", "SDXL", ...
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


def check_prediction(name: str, state_dict: dict, prefix: str, config, variant: str = "the Turbo models") -> None:
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
        f"'{name}' {problem}, but {variant} models predict epsilon (as SD-Turbo and SDXL-Turbo do), so it is not "
        f"a {variant} checkpoint. Load it with the core 'Load Checkpoint' node, or pick an epsilon-prediction file.")


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


def unknown_family_error(family: str) -> TurboError:
    if family in fam.FAMILIES and not set(fam.FAMILIES[family].architectures) & {"sd1", "sd2", "sdxl"}:
        return TurboError(
            f"{family} is a flow model: load it with ComfyUI's own loaders (Load Checkpoint for SD3.5 Large "
            "Turbo, Load Diffusion Model + DualCLIPLoader + Load VAE for FLUX.1-schnell) and set its family on "
            "Turbo Family Schedule. Load Turbo Checkpoint takes the SD 1.x / 2.x / SDXL families: "
            f"{', '.join(LOADER_FAMILIES)}.")
    return TurboError(f"Unknown family {family!r}: use one of {', '.join(LOADER_FAMILIES)}.")


def resolve_family(name: str, config_name: str, family: str = "turbo") -> str:
    """The few-step family a checkpoint of ComfyUI's ``config_name`` loads as, or a TurboError saying
    why not: ``family`` must exist for the file's architecture (the weights cannot tell which
    distillation it is, so the choice is the user's and is only checked)."""
    if family not in LOADER_FAMILIES:
        raise unknown_family_error(family)
    architecture = ARCHITECTURE_OF.get(config_name)
    if family == "turbo":
        variant = TURBO_VARIANTS.get(config_name)
        if variant is None:
            fits = [f for f in LOADER_FAMILIES[1:] if architecture in fam.FAMILIES[f].architectures]
            also = (f" If it is a {', '.join(fits)} model, set family to that." if fits else "")
            raise TurboError(
                f"'{name}' is a {config_name} checkpoint, not SD-Turbo (SD 2.1 family) or SDXL-Turbo (SDXL "
                f"family).{also} Otherwise load it with the core 'Load Checkpoint' node, or pick an SD-Turbo / "
                "SDXL-Turbo file.")
        return variant
    spec = fam.FAMILIES[family]
    if architecture not in spec.architectures:
        wanted = " / ".join(ARCHITECTURE_NAMES.get(a, a) for a in spec.architectures)
        have = ARCHITECTURE_NAMES.get(architecture, config_name)
        fits = [f for f in LOADER_FAMILIES[1:] if architecture in fam.FAMILIES[f].architectures]
        hint = (f"families for {have}: {', '.join(fits)}" if fits else f"this loader takes no {have} family")
        raise TurboError(f"'{name}' is a {have} checkpoint (ComfyUI's {config_name}), but {family} models are "
                         f"{wanted}. Pick the family this file was distilled as ({hint}), or another file.")
    return family


def native_resolution(variant: str, config_name: str) -> int:
    """The side the family was distilled at: 512 for the Turbo models and SD 1.x / 2.x, 1024 for the
    other SDXL distillations (Lightning, DMD2, Hyper-SD, LCM, TCD and PCM for SDXL)."""
    if variant in ("sd-turbo", "sdxl-turbo") or ARCHITECTURE_OF.get(config_name) != "sdxl":
        return NATIVE_RESOLUTION
    return 1024


def load_turbo_checkpoint(ckpt_path: str, weight_dtype: str = "default", family: str = "turbo") -> TurboCheckpoint:
    name = os.path.basename(ckpt_path)
    if weight_dtype not in WEIGHT_DTYPES:
        raise TurboError(f"Unknown weight_dtype {weight_dtype!r}: use one of {', '.join(WEIGHT_DTYPES)}.")
    if family not in LOADER_FAMILIES:
        raise unknown_family_error(family)
    try:
        # safe_load: pickles go through torch.load(weights_only=True) and never execute code.
        sd, metadata = comfy.utils.load_torch_file(ckpt_path, safe_load=True, return_metadata=True)
    except Exception as e:
        raise TurboError(unreadable_file_message(name, ckpt_path, e)) from e
    prefix, config = _detect(sd, metadata)
    config_name = type(config).__name__ if config is not None else "unrecognised"
    if config_name == "unrecognised":
        raise TurboError(
            f"'{name}' holds no diffusion model that ComfyUI recognises, so it is not an SD-Turbo or SDXL-Turbo "
            "checkpoint (LoRA, VAE, ControlNet and text-encoder files belong in their own loaders). "
            "Pick an SD-Turbo / SDXL-Turbo checkpoint.")
    variant = resolve_family(name, config_name, family)
    check_prediction(name, sd, prefix, config, variant)
    model, clip, vae = _load_parts(sd, metadata, weight_dtype, output_clip=True, output_vae=True)
    if clip is None:
        raise TurboError(
            f"'{name}' has no text encoder weights. Use a full checkpoint, or load this "
            "UNet with the core 'Load Diffusion Model' node and the text encoder with 'Load CLIP'.")
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise TurboError(
            f"'{name}' has no VAE weights. Use a full checkpoint, or add a core "
            "'Load VAE' node (e.g. sdxl_vae.safetensors, or taesd/taesdxl) and decode with it.")
    force_epsilon(model)
    model.set_attachments(FAMILY_ATTACHMENT, variant)
    _register_reload(ckpt_path, weight_dtype, model, clip, vae, variant)
    side = native_resolution(variant, config_name)
    log.info("comfy-turbo: '%s' (%s) loaded as %s%s", name, config_name, variant,
             " (family 'turbo': set the family input for a Lightning, DMD2, Hyper-SD, LCM, TCD or PCM file)"
             if family == "turbo" else "")
    return TurboCheckpoint(model=model, clip=clip, vae=vae, variant=variant, family=config_name, width=side, height=side)


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


def reload_turbo_part(ckpt_path: str, weight_dtype: str, part: str, variant: str | None = None,
                      disable_dynamic: bool = False):
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
        if variant is not None:
            model.set_attachments(FAMILY_ATTACHMENT, variant)
    patcher = {"model": model, "clip": getattr(clip, "patcher", None), "vae": getattr(vae, "patcher", None)}[part]
    patcher.cached_patcher_init = (reload_turbo_part, (ckpt_path, weight_dtype, part, variant))
    return patcher


def _register_reload(ckpt_path: str, weight_dtype: str, model, clip, vae, variant: str) -> None:
    for part, patcher in (("model", model), ("clip", getattr(clip, "patcher", None)),
                          ("vae", getattr(vae, "patcher", None))):
        if patcher is not None:
            patcher.cached_patcher_init = (reload_turbo_part, (ckpt_path, weight_dtype, part, variant))


class TurboCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TurboCheckpointLoader",
            display_name="Load Turbo Checkpoint",
            category="sampling/turbo",
            description=(
                "Loads a few-step single-file checkpoint with ComfyUI's own loader and forces epsilon "
                "prediction: SD-Turbo and SDXL-Turbo (and their merges) by default, or, with the family input, "
                "an SDXL-Lightning, DMD2, Hyper-SD, LCM, TCD or PCM checkpoint or merge. The weights cannot tell "
                "those apart, so the family you pick decides and is checked against the file's architecture. "
                "Reports the family and its native resolution. Other models are refused with a clear error."),
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="A checkpoint in models/checkpoints: sd_turbo.safetensors, "
                                       "sd_xl_turbo_1.0_fp16.safetensors or an SDXL turbo merge."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="UNet weight precision. 'default' lets ComfyUI choose for your device."),
                io.Combo.Input("family", options=list(LOADER_FAMILIES), default="turbo", optional=True,
                               tooltip="Which distillation the file is. 'turbo': SD-Turbo for an SD 2.x file, "
                                       "SDXL-Turbo for an SDXL one. A Lightning, DMD2, Hyper-SD, LCM, TCD or PCM "
                                       "checkpoint or merge: pick its family (the weights cannot tell), and the "
                                       "same family in Turbo Family Schedule."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The denoising UNet, epsilon prediction."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder(s) for CLIP Text Encode."),
                io.Vae.Output(display_name="VAE", tooltip="The VAE for encoding and decoding images."),
                io.String.Output(display_name="variant", tooltip="The family it was loaded as: 'sd-turbo', "
                                                                  "'sdxl-turbo', 'dmd2', ..."),
                io.Int.Output(display_name="width", tooltip="Native width: 512 (Turbo, SD 1.x), 1024 (other SDXL "
                                                            "families)."),
                io.Int.Output(display_name="height", tooltip="Native height, as width."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name, weight_dtype="default", family="turbo") -> io.NodeOutput:
        path = folder_paths.get_full_path("checkpoints", ckpt_name)
        if path is None:
            raise TurboError(f"Checkpoint '{ckpt_name}' is not in models/checkpoints. "
                             "Put the file there and refresh the page (press R).")
        ckpt = load_turbo_checkpoint(path, weight_dtype, family)
        return io.NodeOutput(ckpt.model, ckpt.clip, ckpt.vae, ckpt.variant, ckpt.width, ckpt.height)
