"""Turbo Fast Path: make the one CFG-free UNet call per step cheaper, without leaving ComfyUI's machinery.

Everything is attached to a clone of the MODEL through ComfyUI's own extension points, so LoRA
weight patches, ControlNet residuals, model management and Cancel keep working:

* attention: ``transformer_options["optimized_attention_override"]``, the hook ComfyUI's
  ``wrap_attn`` consults before every attention call (comfy/ldm/modules/attention.py), routes all
  attention to ``attention_pytorch`` (``torch.nn.functional.scaled_dot_product_attention``). On the
  CPU ComfyUI otherwise uses its sub-quadratic attention, whose Python loops also break
  ``torch.compile`` graphs. An optional pinned SDPA backend is applied with
  ``torch.nn.attention.sdpa_kernel(backend, MATH)``: the pinned kernel where it supports the
  inputs, PyTorch's math kernel otherwise, never an error.
* channels_last: before each UNet call, any 4-D weight not in channels_last layout (a fresh load, or
  one a LoRA just patched) is converted in place; cuDNN / oneDNN then run the convolutions in NHWC.
  This is a layout change only: the numbers are the same (up to summation order) for every model
  that shares these weights.
* compile: ``torch.compile(diffusion_model, backend="inductor", dynamic=False)`` swapped in around
  ``BaseModel.apply_model`` with ComfyUI's own ``apply_torch_compile_factory`` wrapper (the one core
  ``TorchCompileModel`` uses), one compiled module per UNet and mode, reused by every clone. The
  weights are inputs of the compiled graph (``torch._dynamo.config.inline_inbuilt_nn_modules``), so a
  LoRA patch takes effect without recompiling; a new shape or a ControlNet recompiles once. The
  UNet's weights are set to ``requires_grad=False``, as ComfyUI's patched weights already are, so that
  patched and unpatched weights look alike to dynamo's guards. On the CPU inductor's convolution
  layout optimisation is turned off (see ``inductor_options``).

CUDA graph capture (``mode="reduce-overhead"``) is deliberately not offered: ComfyUI replaces weight
tensors when it patches a LoRA, which a captured graph would not see. It is left for a GPU session.
"""
from __future__ import annotations

import weakref

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import comfy.ldm.modules.attention
import comfy.patcher_extension
from comfy_api.latest import io
from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS, apply_torch_compile_factory

from .errors import TurboError

ATTENTION = ("sdpa", "comfy")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
COMPILE_MODES = {"off": None, "inductor": "default", "inductor-max-autotune": "max-autotune-no-cudagraphs"}
WRAPPER_KEY = "comfy-turbo.fastpath"

_conv_weights: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def sdpa_attention(func, *args, **kwargs):
    """``optimized_attention_override``: ComfyUI calls it as ``override(func, q, k, v, heads, ...)``."""
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def make_channels_last(module: torch.nn.Module) -> int:
    """Put every 4-D parameter of ``module`` in channels_last layout; returns how many were converted."""
    weights = _conv_weights.get(module)
    if weights is None:
        weights = [(m, n) for m in module.modules() for n, p in m.named_parameters(recurse=False) if p.dim() == 4]
        _conv_weights[module] = weights
    converted = 0
    for m, name in weights:
        p = getattr(m, name)
        if not p.is_contiguous(memory_format=torch.channels_last):
            # Keep each weight an inference tensor or not, as ComfyUI loaded it (its executor loads and
            # samples under inference_mode): a compiled graph must not see a mix.
            with torch.inference_mode(p.is_inference()), torch.no_grad():
                p.data = p.data.contiguous(memory_format=torch.channels_last)
            converted += 1
    return converted


def _fastpath_wrapper(channels_last: bool, sdpa_backend: str):
    """An APPLY_MODEL wrapper (comfy/patcher_extension.py) for the per-call parts of the fast path."""
    backends = None if sdpa_backend == "auto" else [SDPA_KERNELS[sdpa_backend], SDPBackend.MATH]

    def wrapper(executor, *args, **kwargs):
        if channels_last:
            make_channels_last(executor.class_obj.diffusion_model)
        if backends is None:
            return executor(*args, **kwargs)
        with sdpa_kernel(backends):
            return executor(*args, **kwargs)
    return wrapper


def inductor_options(mode: str, device) -> dict:
    """Inductor options for a ``torch.compile`` mode on ``device``.

    On the CPU inductor's ``layout_optimization`` (convolutions in channels_last, with layout
    conversions around them) made these UNets and decoders 6-10x slower than eager in our
    measurements (torch 2.11, oneDNN), so it is off there; without it compiled beats eager.
    """
    import torch._inductor  # only when compiling: it is slow to import
    options = dict(torch._inductor.list_mode_options(mode))
    if torch.device(device).type == "cpu":
        options["layout_optimization"] = False
    return options


def compiled_unet(diffusion_model: torch.nn.Module, mode: str, device="cuda"):
    """One ``torch.compile`` of this UNet per mode, kept on the module so every clone reuses it."""
    memo = diffusion_model.__dict__.setdefault("_comfy_turbo_compiled", {})
    if mode not in memo:
        # ComfyUI's LoRA-patched weights are Parameters with requires_grad=False (comfy.utils.set_attr_param),
        # loaded ones have True; dynamo guards on it, so every LoRA would recompile. Inference never needs grads.
        diffusion_model.requires_grad_(False)
        memo[mode] = torch.compile(diffusion_model, backend="inductor", options=inductor_options(mode, device),
                                   dynamic=False)
    return memo[mode]


def apply_fast_path(model, attention: str = "sdpa", sdpa_backend: str = "auto", channels_last: bool = True,
                    compile: str = "off"):
    """A clone of ``model`` (a ModelPatcher) with the fast path attached.

    ``model`` itself keeps its options; the UNet weights it shares with the clone may change layout
    (channels_last) and lose ``requires_grad`` (compile), never value.
    """
    for value, allowed, what in ((attention, ATTENTION, "attention"), (sdpa_backend, SDPA_BACKENDS, "sdpa_backend"),
                                 (compile, tuple(COMPILE_MODES), "compile")):
        if value not in allowed:
            raise TurboError(f"Unknown {what} {value!r}: use one of {', '.join(allowed)}.")
    m = model.clone()
    transformer_options = m.model_options.setdefault("transformer_options", {})
    if attention == "sdpa":
        transformer_options["optimized_attention_override"] = sdpa_attention
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    if channels_last or sdpa_backend != "auto":
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                               _fastpath_wrapper(channels_last, sdpa_backend))
    mode = COMPILE_MODES[compile]
    if mode is not None:
        compiled = compiled_unet(m.get_model_object("diffusion_model"), mode, m.load_device)
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY,
                               apply_torch_compile_factory({"diffusion_model": compiled}))
        m.model_options[TORCH_COMPILE_KWARGS] = {"backend": "inductor", "mode": None, "fullgraph": False,
                                                 "options": inductor_options(mode, m.load_device), "dynamic": False}
    return m


class TurboFastPath(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TurboFastPath",
            display_name="Turbo Fast Path",
            category="sampling/turbo",
            description=(
                "Speeds up the single CFG-free UNet call of SD-Turbo / SDXL-Turbo: PyTorch fused attention "
                "(SDPA), channels_last convolutions and, optionally, torch.compile. Put it after Load Turbo "
                "Checkpoint (and any LoRA loaders); LoRA and ControlNet keep working. Same images up to "
                "floating-point rounding."),
            inputs=[
                io.Model.Input("model", tooltip="The Turbo model, LoRAs already applied or not."),
                io.Combo.Input("attention", options=list(ATTENTION), default="sdpa",
                               tooltip="'sdpa': PyTorch's fused scaled_dot_product_attention for every attention "
                                       "layer. 'comfy': whatever ComfyUI chose at start-up (on the CPU its slower "
                                       "sub-quadratic attention, which torch.compile cannot fuse)."),
                io.Combo.Input("sdpa_backend", options=list(SDPA_BACKENDS), default="auto",
                               tooltip="'auto': PyTorch picks the fastest kernel that supports the inputs. Or pin "
                                       "flash / efficient / cudnn (CUDA) or math; where the pinned kernel cannot "
                                       "run, the math kernel is used."),
                io.Boolean.Input("channels_last", default=True,
                                 tooltip="Run convolutions in channels_last (NHWC) layout. Changes the layout of "
                                         "the UNet's weights in memory, not their values."),
                io.Combo.Input("compile", options=list(COMPILE_MODES), default="off",
                               tooltip="'inductor': torch.compile the UNet (fixed shapes). The first image per "
                                       "size/batch compiles for a minute or more; later ones are faster. Needs a "
                                       "C++ compiler on the CPU, Triton on the GPU. 'inductor-max-autotune' "
                                       "compiles longer and may run faster. Off by default."),
            ],
            outputs=[io.Model.Output(tooltip="The same model with the fast path attached, for Turbo Sampler "
                                             "or SamplerCustom.")],
        )

    @classmethod
    def execute(cls, model, attention="sdpa", sdpa_backend="auto", channels_last=True, compile="off") -> io.NodeOutput:
        return io.NodeOutput(apply_fast_path(model, attention, sdpa_backend, channels_last, compile))
