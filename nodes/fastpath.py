"""Turbo Fast Path: make the one CFG-free UNet call per step cheaper, without leaving ComfyUI's machinery.

Everything is attached to a clone of the MODEL through ComfyUI's own extension points, so LoRA
weight patches, ControlNet residuals, model management and Cancel keep working:

* attention: ``transformer_options["optimized_attention_override"]``, the hook ComfyUI's
  ``wrap_attn`` consults before every attention call (comfy/ldm/modules/attention.py), routes all
  attention to ``attention_pytorch`` (``torch.nn.functional.scaled_dot_product_attention``). On the
  CPU ComfyUI otherwise uses its sub-quadratic attention, whose Python loops also break
  ``torch.compile`` graphs. An optional pinned SDPA backend is applied with
  ``torch.nn.attention.sdpa_kernel(backend, MATH)``: the pinned kernel where it supports the
  inputs, PyTorch's math kernel otherwise, never an error. Another node's override (SageAttention,
  say) is never overwritten: ``sdpa`` keeps it and says so on the node, ``comfy`` keeps it (and removes
  an earlier fast path's SDPA).
* channels_last: before each UNet call, any 4-D weight not in channels_last layout (a fresh load, or
  one a LoRA just patched) is converted in place; cuDNN / oneDNN then run the convolutions in NHWC.
  This is a layout change only: the numbers are the same (up to summation order) for every model
  that shares these weights.
* compile: ``torch.compile(diffusion_model, backend="inductor", dynamic=False)`` swapped in around
  ``BaseModel.apply_model`` under core ``TorchCompileModel``'s wrapper key, as its
  ``apply_torch_compile_factory`` does, one compiled module per loaded UNet and mode, reused by every clone. The
  weights are inputs of the compiled graph (``torch._dynamo.config.inline_inbuilt_nn_modules``), so a
  LoRA patch takes effect without recompiling; a new shape or a ControlNet recompiles once. The
  UNet's weights are set to ``requires_grad=False``, as ComfyUI's patched weights already are, so that
  patched and unpatched weights look alike to dynamo's guards. On the CPU inductor's convolution
  layout optimisation is turned off (see ``inductor_options``).

* ComfyUI stays in charge of memory: the clone is a ``FastPathPatcher`` (a ModelPatcher subclass, as
  ComfyUI-GGUF keeps its own state). It patches LoRAs in place (ComfyUI's ``weight_inplace_update``:
  ``param.data.copy_`` instead of a new Parameter) and keeps the real offload device. Where ComfyUI would
  re-patch a fully loaded model by moving it to the offload device and back (a LoRA or strength change), it
  restores and patches the same tensors instead, so every weight keeps its address. An unload (a bigger model
  loading, ``/free``) moves the weights off the GPU as for any model, and drops the graphs and compiled
  module tied to them; a partial unload drops the graphs (the call runs without them, with a warning).
  The state lives in one ``FastPathState`` attachment, shared by the clone's clones and adopted by the next
  fast-path clone of a model ComfyUI still holds loaded (a LoRA strength changed upstream): nothing is kept
  on the UNet module. On ComfyUI 0.33 a dynamic-VRAM input (per-call LoRA patches) is swapped for its
  non-dynamic delegate, as core ``TorchCompileModel`` does, loaded once and reused while it stays loaded.
* CUDA graphs (``cuda_graphs``): each ``apply_model`` call is captured once per input signature and
  replayed (samplers/cuda_graphs.py), ControlNet residuals copied into static buffers, the weights'
  addresses checked before every replay (a mismatch re-captures). Needs a CUDA device; ComfyUI's
  ``--disable-cuda-graphs`` turns it off. Calls with attention patches (IPAdapter and the like), object
  patches below the model's top level, other nodes' wrappers, or a partially loaded (low-VRAM) model run
  without a graph, with one log line saying why.
"""
from __future__ import annotations

import functools
import logging
from collections import deque

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
from comfy_api.latest import io
from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS

from ..samplers.cuda_graphs import GraphCache
from .errors import TurboError

log = logging.getLogger("comfy_turbo")

ATTENTION = ("sdpa", "comfy")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
COMPILE_MODES = {"off": None, "inductor": "default", "inductor-max-autotune": "max-autotune-no-cudagraphs"}
WRAPPER_KEY = "comfy-turbo.fastpath"
GRAPHS_KEY = "comfy-turbo.cuda_graphs"

def sdpa_attention(func, *args, **kwargs):
    """``optimized_attention_override``: ComfyUI calls it as ``override(func, q, k, v, heads, ...)``."""
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def conv_weights(module: torch.nn.Module) -> list:
    """The (module, name) of every 4-D parameter of ``module``."""
    return [(m, n) for m in module.modules() for n, p in m.named_parameters(recurse=False) if p.dim() == 4]


def make_channels_last(weights: list) -> int:
    """Put every listed 4-D parameter in channels_last layout; returns how many were converted."""
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


def _fastpath_wrapper(state: "FastPathState", channels_last: bool, sdpa_backend: str):
    """An APPLY_MODEL wrapper (comfy/patcher_extension.py) for the per-call parts of the fast path."""
    backends = None if sdpa_backend == "auto" else [SDPA_KERNELS[sdpa_backend], SDPBackend.MATH]

    def wrapper(executor, *args, **kwargs):
        if channels_last:
            make_channels_last(state.conv_weights(executor.class_obj.diffusion_model))
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


def compile_settings(mode: str, device) -> dict:
    """What ``torch.compile`` really runs with for a compile option on ``device``: for results files."""
    import torch._dynamo
    plain = (bool, int, float, str, type(None))
    return {"backend": "inductor", "mode": mode, "dynamic": False, "fullgraph": False,
            "options": {k: v if isinstance(v, plain) else repr(v) for k, v in inductor_options(mode, device).items()},
            "inline_inbuilt_nn_modules": bool(torch._dynamo.config.inline_inbuilt_nn_modules),
            "torch": torch.__version__}


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


class FastPathState:
    """What the fast path keeps for one loaded model: its graphs, compiled UNets and weight lists.

    A ModelPatcher attachment (``STATE_KEY``): the fast-path clone and its clones share it, and it lives as
    long as they do. ``drop`` (ComfyUI unloaded the model) frees the graphs, with their static buffers and
    memory pool, and the compiled modules; the next call rebuilds what it needs.
    """

    def __init__(self, source_model):
        self.source_model = source_model      # the input patcher's model (0.33: the dynamic one we replaced)
        self.delegate = None                  # 0.33: the non-dynamic delegate's clone override, reused
        self._graphs: dict = {}
        self._compiled: dict = {}
        self._pointers: WeightPointers | None = None
        self._conv: tuple | None = None
        self.drops: deque[str] = deque(maxlen=16)   # why state was dropped, newest last (tests, the bench)

    def graph_cache(self, backend=None) -> GraphCache:
        key = id(backend) if backend is not None else "cuda"
        if key not in self._graphs:
            self._graphs[key] = GraphCache(backend=backend)
        return self._graphs[key]

    def compiled_unet(self, diffusion_model: torch.nn.Module, mode: str, device="cuda"):
        """One ``torch.compile`` of this UNet per mode, reused by every clone until ComfyUI unloads it."""
        key = (mode, id(diffusion_model))
        entry = self._compiled.get(key)
        if entry is None or entry[0] is not diffusion_model:
            # ComfyUI's LoRA-patched weights are Parameters with requires_grad=False (comfy.utils.set_attr_param),
            # loaded ones have True; dynamo guards on it, so every LoRA would recompile. Inference never needs grads.
            diffusion_model.requires_grad_(False)
            compiled = torch.compile(diffusion_model, backend="inductor", options=inductor_options(mode, device),
                                     dynamic=False)
            entry = self._compiled[key] = (diffusion_model, compiled)
        return entry[1]

    def weight_pointers(self, base_model) -> "WeightPointers":
        """The model's WeightPointers, rebuilt when an object patch has swapped the UNet or model_sampling."""
        pointers = self._pointers
        if pointers is None or pointers.modules[0] is not base_model.diffusion_model \
                or pointers.modules[1] is not base_model.model_sampling:
            pointers = self._pointers = WeightPointers(base_model)
        return pointers

    def conv_weights(self, diffusion_model: torch.nn.Module) -> list:
        if self._conv is None or self._conv[0] is not diffusion_model:
            self._conv = (diffusion_model, conv_weights(diffusion_model))
        return self._conv[1]

    def holds_graphs(self) -> bool:
        return any(cache.graphs for cache in self._graphs.values())

    def drop_graphs(self, reason: str) -> None:
        if self.holds_graphs():
            log.info("comfy-turbo: Turbo Fast Path dropped its CUDA graphs: %s.", reason)
            self.drops.append(reason)
        for cache in self._graphs.values():
            cache.clear()

    def drop(self, reason: str) -> None:
        """Everything tied to the loaded weights goes; the next call captures and compiles again."""
        if not self.empty():
            self.drops.append(reason)
        self._graphs.clear()
        self._compiled.clear()
        self._pointers = None
        self._conv = None

    def empty(self) -> bool:
        return not self.holds_graphs() and not self._compiled and self._pointers is None and self._conv is None


STATE_KEY = "comfy-turbo.fastpath-state"


def fast_path_state(patcher) -> FastPathState | None:
    return patcher.get_attachment(STATE_KEY) if hasattr(patcher, "get_attachment") else None


class FastPathMixin:
    """ModelPatcher behaviour of the fast path: re-patch a fully loaded model in place, drop the state on unload.

    Mixed into the input patcher's own class (``FastPathPatcher`` for ComfyUI's), so another pack's patcher
    subclass (ComfyUI-GGUF's, say) keeps its behaviour."""

    @staticmethod
    def clone_of(patcher, **kwargs):
        """``patcher.clone(**kwargs)`` with the mixin (ComfyUI's clone keeps the class from then on)."""
        n = patcher.clone(**kwargs)
        n.__class__ = fast_path_class(type(n))
        return n

    def _loaded_on(self, device) -> bool:
        return (not getattr(self.model, "model_lowvram", False) and self.model.model_loaded_weight_memory > 0
                and self.model.device == torch.device(device))

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        # ComfyUI re-patches a model whose patches changed by unpatching it onto the offload device (every
        # weight gets new storage) and loading it again. A fully loaded model is unpatched where it is instead:
        # the backups (kept on the offload device, as ComfyUI keeps them) are copied back into the same
        # tensors, and the new patches copied into them.
        # Only for a full load (ComfyUI's own test below): under a VRAM budget ComfyUI loads part of the model and
        # counts only that, so the rest must really go to the offload device, as it does for any model.
        current = getattr(self.model, "current_weight_patches_uuid", None)
        full_load = self.model.model_loaded_weight_memory + extra_memory > self.model_size()
        self._unpatch_in_place = current is not None and (current != self.patches_uuid or force_patch_weights) \
            and full_load and self._loaded_on(device_to)
        try:
            return super().partially_load(device_to, extra_memory, force_patch_weights)
        finally:
            self._unpatch_in_place = False

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if getattr(self, "_unpatch_in_place", False):
            device_to = None                      # restore in place; the weights stay where they are loaded
        return super().unpatch_model(device_to, unpatch_weights)

    def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
        freed = super().partially_unload(device_to, memory_to_free, *args, **kwargs)
        if freed and (state := fast_path_state(self)) is not None:
            state.drop_graphs("ComfyUI moved part of the model off its device to free memory")
        return freed

    def detach(self, unpatch_all=True):
        self._unpatch_in_place = False            # (an error while re-patching: off the device, as ComfyUI would)
        model = super().detach(unpatch_all)
        if unpatch_all and (state := fast_path_state(self)) is not None:
            state.drop("ComfyUI unloaded the model")
        return model


class FastPathPatcher(FastPathMixin, comfy.model_patcher.ModelPatcher):
    pass


@functools.cache
def fast_path_class(patcher_class: type) -> type:
    if issubclass(patcher_class, FastPathMixin):
        return patcher_class
    if patcher_class is comfy.model_patcher.ModelPatcher:
        return FastPathPatcher
    return type(f"FastPath{patcher_class.__name__}", (FastPathMixin, patcher_class), {})


OWN_APPLY_MODEL_WRAPPERS = {WRAPPER_KEY, GRAPHS_KEY, COMPILE_KEY}


# Object patches a graph key covers: the modules themselves are part of the key.
KEYED_OBJECT_PATCHES = {"diffusion_model", "model_sampling"}


def graph_refusal(base_model, transformer_options: dict, pointers: "WeightPointers") -> str | None:
    """Why this call must run without a graph, or None."""
    if getattr(base_model, "model_lowvram", False):
        return "the model is only partly loaded (low VRAM), so its weights are cast or patched per call"
    patcher = getattr(base_model, "current_patcher", None)
    if patcher is None:
        return "no ModelPatcher is running this model (so its object patches cannot be checked)"
    other = sorted(set(patcher.object_patches) - KEYED_OBJECT_PATCHES)
    if other:
        return f"the model carries object patches a graph cannot follow ({other[:4]})"
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


def _cuda_graph_wrapper(state: FastPathState, settings: tuple, backend=None):
    """An APPLY_MODEL wrapper replaying one CUDA graph per input signature (samplers/cuda_graphs.py)."""
    reported = set()

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        base = executor.class_obj
        pointers = state.weight_pointers(base)
        reason = graph_refusal(base, transformer_options, pointers)
        if reason is not None:
            if reason not in reported:
                reported.add(reason)
                log.warning("comfy-turbo: Turbo Fast Path runs this model without CUDA graphs: %s.", reason)
            if getattr(base, "model_lowvram", False):
                state.drop_graphs("the model is only partly loaded")
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        def call(x, t, c_concat, c_crossattn, control, **kw):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

        # The modules themselves, not their ids: the key keeps them alive, so no new module can reuse an id.
        extra_key = (settings, base.diffusion_model, base.model_sampling, torch.is_inference_mode_enabled())
        return state.graph_cache(backend)(call, pointers, (x, t, c_concat, c_crossattn, control), kwargs, extra_key)
    return wrapper


def cuda_graphs_unavailable(load_device) -> str | None:
    """Why CUDA graphs cannot be used for a model on ``load_device``, or None."""
    import comfy.cli_args
    if getattr(comfy.cli_args.args, "disable_cuda_graphs", False):
        return "ComfyUI was started with --disable-cuda-graphs"
    if torch.device(load_device).type != "cuda" or not torch.cuda.is_available():
        return f"CUDA graphs need a CUDA GPU, and this model runs on '{load_device}'"
    return None


def _compile_wrapper(state: FastPathState, mode: str, device):
    """ComfyUI's ``apply_torch_compile_factory`` technique (the compiled UNet swapped in for the call), with the
    compiled module taken from the state per call, so it goes when ComfyUI unloads the model."""
    def wrapper(executor, *args, **kwargs):
        base = executor.class_obj
        original = base.diffusion_model
        base.diffusion_model = state.compiled_unet(original, mode, device)
        try:
            return executor(*args, **kwargs)
        finally:
            base.diffusion_model = original
    return wrapper


def loaded_state(source_model) -> FastPathState | None:
    """The state of a fast-path clone of ``source_model`` that ComfyUI still holds loaded, if any."""
    for loaded in list(comfy.model_management.current_loaded_models):
        patcher = loaded.model
        state = fast_path_state(patcher) if patcher is not None else None
        if isinstance(patcher, FastPathMixin) and state is not None and state.source_model is source_model:
            return state
    return None


def fast_clone(model) -> tuple["FastPathMixin", FastPathState]:
    """A fast-path clone of ``model`` and its state: the state of a loaded fast-path clone of the same
    model when there is one (a LoRA strength changed upstream: same graphs, same compiled UNet)."""
    state = loaded_state(model.model) or FastPathState(model.model)
    # ComfyUI 0.33 may hand us a dynamic-VRAM patcher, which patches LoRAs per call: swap in its non-dynamic
    # delegate, like core TorchCompileModel, loaded once (the loader registers the cached_patcher_init this
    # needs) and reused while its fast-path clone stays loaded. 0.3.75 has no such patcher.
    if getattr(model, "is_dynamic", lambda: False)():
        if hasattr(model, "get_non_dynamic_delegate"):
            if getattr(model, "non_dynamic_delegate_model", None) is None:
                model.non_dynamic_delegate_model = state.delegate
            m = FastPathMixin.clone_of(model.get_non_dynamic_delegate())
            state.delegate = model.non_dynamic_delegate_model
        else:
            m = FastPathMixin.clone_of(model, disable_dynamic=True)
    else:
        m = FastPathMixin.clone_of(model)
    m.weight_inplace_update = True          # patch with copy_to_param, restore backups in place
    m.set_attachments(STATE_KEY, state)
    return m, state


def set_attention(m, attention: str) -> str | None:
    """Route attention to SDPA, or leave ComfyUI's own; never overwrite another node's override (the message
    for the user when 'sdpa' keeps one)."""
    transformer_options = m.model_options.setdefault("transformer_options", {})
    current = transformer_options.get("optimized_attention_override")
    foreign = current is not None and current is not sdpa_attention
    if attention == "sdpa":
        if foreign:
            name = f"{getattr(current, '__module__', '?')}.{getattr(current, '__qualname__', type(current).__name__)}"
            return f"Another node already replaced this model's attention ({name}, SageAttention or the like): " \
                   "Turbo Fast Path keeps it and does not use SDPA. Set attention to 'comfy' to silence this, or " \
                   "remove that node to use SDPA."
        transformer_options["optimized_attention_override"] = sdpa_attention
    elif current is sdpa_attention:         # an earlier fast path's SDPA: back to ComfyUI's attention
        del transformer_options["optimized_attention_override"]
    elif foreign:
        log.info("comfy-turbo: Turbo Fast Path keeps another node's attention override (attention='comfy').")
    return None


def apply_fast_path(model, attention: str = "sdpa", sdpa_backend: str = "auto", channels_last: bool = True,
                    compile: str = "off", cuda_graphs: bool = False, graph_backend=None, notify=None):
    """A clone of ``model`` (a ModelPatcher) with the fast path attached.

    ``model`` itself keeps its options; the UNet weights it shares with the clone may change layout
    (channels_last) and lose ``requires_grad`` (compile), never value. ``graph_backend`` replaces
    ``torch.cuda.CUDAGraph`` (tests emulate capture on the CPU with it); ``notify(text)`` tells the user
    something worth knowing (default: the log).
    """
    for value, allowed, what in ((attention, ATTENTION, "attention"), (sdpa_backend, SDPA_BACKENDS, "sdpa_backend"),
                                 (compile, tuple(COMPILE_MODES), "compile")):
        if value not in allowed:
            raise TurboError(f"Unknown {what} {value!r}: use one of {', '.join(allowed)}.")
    m, state = fast_clone(model)
    notice = set_attention(m, attention)
    if notice is not None:
        (notify or (lambda text: log.warning("comfy-turbo: Turbo Fast Path: %s", text)))(notice)
    # Wrappers run in the order added, outermost first: fast path, graphs, then our compile (if any).
    mode = COMPILE_MODES[compile]
    for key in (WRAPPER_KEY, GRAPHS_KEY) + ((COMPILE_KEY,) if mode is not None else ()):
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key)
    if channels_last or sdpa_backend != "auto":
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                               _fastpath_wrapper(state, channels_last, sdpa_backend))
    if cuda_graphs and (graph_backend is not None or cuda_graphs_unavailable(m.load_device) is None):
        settings = (attention, sdpa_backend, channels_last, compile)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, GRAPHS_KEY,
                               _cuda_graph_wrapper(state, settings, graph_backend))
    if mode is not None:
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY,
                               _compile_wrapper(state, mode, m.load_device))
        settings = compile_settings(mode, m.load_device)
        m.model_options[TORCH_COMPILE_KWARGS] = {k: settings[k] for k in ("backend", "fullgraph", "options", "dynamic")}
        m.model_options[TORCH_COMPILE_KWARGS]["mode"] = None      # the mode's options are in "options"
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
                                       "sub-quadratic attention, which torch.compile cannot fuse), or another "
                                       "node's attention override (SageAttention, say), which 'sdpa' keeps "
                                       "(saying so on the node)."),
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
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        return io.NodeOutput(apply_fast_path(model, attention, sdpa_backend, channels_last, compile, cuda_graphs,
                                             notify=lambda text: tell_user(text, node_id)))


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
