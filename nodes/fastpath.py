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

* stable weight storage: the clone patches LoRAs in place (ComfyUI's ``weight_inplace_update``:
  ``param.data.copy_`` instead of a new Parameter) and stays resident on its load device (unpatching
  does not move it to the offload device), so every UNet weight keeps its address across LoRA and
  strength changes. On ComfyUI 0.33 the clone also opts out of dynamic VRAM (per-call LoRA patches),
  as core ``TorchCompileModel`` does, with ``clone(disable_dynamic=True)``.
* CUDA graphs (``cuda_graphs``): each ``apply_model`` call is captured once per input signature and
  replayed (samplers/cuda_graphs.py), ControlNet residuals copied into static buffers, the weights'
  addresses checked before every replay (a mismatch re-captures). Needs a CUDA device; ComfyUI's
  ``--disable-cuda-graphs`` turns it off. Calls with attention patches (IPAdapter and the like) or a
  partially loaded (low-VRAM) model run without a graph.
"""
from __future__ import annotations

import logging
import weakref

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import comfy.ldm.modules.attention
import comfy.patcher_extension
from comfy_api.latest import io
from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS, apply_torch_compile_factory

from ..samplers.cuda_graphs import GraphCache
from .errors import TurboError

log = logging.getLogger("comfy_turbo")

ATTENTION = ("sdpa", "comfy")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
COMPILE_MODES = {"off": None, "inductor": "default", "inductor-max-autotune": "max-autotune-no-cudagraphs"}
WRAPPER_KEY = "comfy-turbo.fastpath"
GRAPHS_KEY = "comfy-turbo.cuda_graphs"

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


class WeightPointers:
    """The data pointers of every parameter and buffer of a BaseModel (UNet and model_sampling).

    The modules' own parameter and buffer dicts are listed once and read directly (0.5 ms for SDXL's
    1680 weights on a slow CPU core; ``getattr`` costs ten times that). ComfyUI's patching replaces
    tensors in those same dicts; an object patch that swaps a whole submodule changes the ids in the
    graph key instead.
    """

    def __init__(self, base_model: torch.nn.Module):
        self.modules = (base_model.diffusion_model, base_model.model_sampling)   # what the list was built from
        self.entries = []
        self.plain = True          # quantized weights are tensor subclasses whose data_ptr says nothing useful
        for module in base_model.modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None:
                        self.entries.append((store, name))
                        self.plain &= type(t.data) is torch.Tensor

    def __call__(self) -> tuple:
        return tuple(0 if (t := d.get(n)) is None else t.data_ptr() for d, n in self.entries)


def _graph_state(base_model) -> dict:
    """The graph caches of one loaded model, kept on it so that every clone shares them."""
    return base_model.__dict__.setdefault("_comfy_turbo_graphs", {})


def graph_cache(base_model, backend=None) -> GraphCache:
    state = _graph_state(base_model)
    key = id(backend) if backend is not None else "cuda"
    if key not in state:
        state[key] = GraphCache(backend=backend)
    return state[key]


OWN_APPLY_MODEL_WRAPPERS = {WRAPPER_KEY, GRAPHS_KEY, COMPILE_KEY}


def graph_refusal(base_model, transformer_options: dict, pointers: "WeightPointers") -> str | None:
    """Why this call must run without a graph, or None."""
    if getattr(base_model, "model_lowvram", False):
        return "the model is only partly loaded (low VRAM), so its weights are cast or patched per call"
    if not pointers.plain:
        return "the model has quantized (tensor-subclass) weights"
    for key in ("patches", "patches_replace"):
        if transformer_options.get(key):
            return f"the model carries attention patches (transformer_options['{key}']: {sorted(transformer_options[key])})"
    # Other wrappers may decide per call in Python (a step cache, say): a graph would freeze that decision.
    wrappers = transformer_options.get("wrappers", {})
    foreign = set(wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {})) - OWN_APPLY_MODEL_WRAPPERS
    foreign |= set(wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}))
    if foreign:
        return f"other nodes wrap the model call ({sorted(foreign)})"
    return None


def weight_pointers(base_model) -> "WeightPointers":
    """The model's WeightPointers, rebuilt when an object patch has swapped the UNet or model_sampling."""
    pointers = base_model.__dict__.get("_comfy_turbo_weight_pointers")
    if pointers is None or pointers.modules[0] is not base_model.diffusion_model \
            or pointers.modules[1] is not base_model.model_sampling:
        pointers = base_model.__dict__["_comfy_turbo_weight_pointers"] = WeightPointers(base_model)
    return pointers


def _cuda_graph_wrapper(settings: tuple, backend=None):
    """An APPLY_MODEL wrapper replaying one CUDA graph per input signature (samplers/cuda_graphs.py)."""
    reported = set()

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        base = executor.class_obj
        pointers = weight_pointers(base)
        reason = graph_refusal(base, transformer_options, pointers)
        if reason is not None:
            if reason not in reported:
                reported.add(reason)
                log.info("comfy-turbo: Turbo Fast Path runs this model without CUDA graphs: %s.", reason)
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        def call(x, t, c_concat, c_crossattn, control, **kw):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

        # The modules themselves, not their ids: the key keeps them alive, so no new module can reuse an id.
        extra_key = (settings, base.diffusion_model, base.model_sampling, torch.is_inference_mode_enabled())
        return graph_cache(base, backend)(call, pointers, (x, t, c_concat, c_crossattn, control), kwargs, extra_key)
    return wrapper


def cuda_graphs_unavailable(load_device) -> str | None:
    """Why CUDA graphs cannot be used for a model on ``load_device``, or None."""
    import comfy.cli_args
    if getattr(comfy.cli_args.args, "disable_cuda_graphs", False):
        return "ComfyUI was started with --disable-cuda-graphs"
    if torch.device(load_device).type != "cuda" or not torch.cuda.is_available():
        return f"CUDA graphs need a CUDA GPU, and this model runs on '{load_device}'"
    return None


def keep_weights_in_place(m) -> None:
    """Make every LoRA / strength change of patcher ``m`` an in-place copy into the same tensors."""
    m.weight_inplace_update = True         # patch with copy_to_param, restore backups in place
    m.offload_device = m.load_device       # unpatching would otherwise move the model (new storage)


def apply_fast_path(model, attention: str = "sdpa", sdpa_backend: str = "auto", channels_last: bool = True,
                    compile: str = "off", cuda_graphs: bool = False, graph_backend=None):
    """A clone of ``model`` (a ModelPatcher) with the fast path attached.

    ``model`` itself keeps its options; the UNet weights it shares with the clone may change layout
    (channels_last) and lose ``requires_grad`` (compile), never value. ``graph_backend`` replaces
    ``torch.cuda.CUDAGraph`` (tests emulate capture on the CPU with it).
    """
    for value, allowed, what in ((attention, ATTENTION, "attention"), (sdpa_backend, SDPA_BACKENDS, "sdpa_backend"),
                                 (compile, tuple(COMPILE_MODES), "compile")):
        if value not in allowed:
            raise TurboError(f"Unknown {what} {value!r}: use one of {', '.join(allowed)}.")
    # ComfyUI 0.33 may hand us a dynamic-VRAM patcher, which patches LoRAs per call: opt out, like core
    # TorchCompileModel (the loader registers the cached_patcher_init this needs). 0.3.75 has no such patcher.
    m = model.clone(disable_dynamic=True) if getattr(model, "is_dynamic", lambda: False)() else model.clone()
    keep_weights_in_place(m)
    transformer_options = m.model_options.setdefault("transformer_options", {})
    if attention == "sdpa":
        transformer_options["optimized_attention_override"] = sdpa_attention
    # Wrappers run in the order added, outermost first: fast path, graphs, then our compile (if any).
    mode = COMPILE_MODES[compile]
    for key in (WRAPPER_KEY, GRAPHS_KEY) + ((COMPILE_KEY,) if mode is not None else ()):
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key)
    if channels_last or sdpa_backend != "auto":
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                               _fastpath_wrapper(channels_last, sdpa_backend))
    if cuda_graphs and (graph_backend is not None or cuda_graphs_unavailable(m.load_device) is None):
        settings = (attention, sdpa_backend, channels_last, compile)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, GRAPHS_KEY,
                               _cuda_graph_wrapper(settings, graph_backend))
    if mode is not None:
        compiled = compiled_unet(m.get_model_object("diffusion_model"), mode, m.load_device)
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
                io.Boolean.Input("cuda_graphs", default=False, optional=True,
                                 tooltip="CUDA GPUs: record each UNet call once per shape as a CUDA graph and "
                                         "replay it, removing the per-kernel launch cost. The first image per "
                                         "shape runs normally, the second records. LoRA and strength changes "
                                         "replay the same graph (weights are patched in place); ControlNet works. "
                                         "On the CPU, or with --disable-cuda-graphs, the fast path runs without "
                                         "graphs."),
            ],
            outputs=[io.Model.Output(tooltip="The same model with the fast path attached, for Turbo Sampler "
                                             "or SamplerCustom.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, attention="sdpa", sdpa_backend="auto", channels_last=True, compile="off",
                cuda_graphs=False) -> io.NodeOutput:
        if cuda_graphs:
            reason = cuda_graphs_unavailable(model.load_device)
            if reason is not None:
                tell_user(f"CUDA graphs are off: {reason}. The fast path runs without them (same images).",
                          cls.hidden.unique_id if cls.hidden is not None else None)
        return io.NodeOutput(apply_fast_path(model, attention, sdpa_backend, channels_last, compile, cuda_graphs))


def tell_user(message: str, node_id) -> None:
    """Log ``message`` and show it on the node in the web UI (ComfyUI's progress text, where it exists)."""
    log.warning("comfy-turbo: Turbo Fast Path: %s", message)
    try:
        from server import PromptServer
        server = PromptServer.instance
    except Exception:
        return
    if node_id is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(message, node_id)
