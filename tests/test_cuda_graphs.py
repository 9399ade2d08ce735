"""Stable weight storage, dynamic-VRAM opt-out and CUDA graphs on Turbo Fast Path (CPU).

This machine has no GPU, so capture and replay are emulated by ``EmulatedGraphs``: "capture" keeps
the call on its static buffers, "replay" runs it again on whatever the buffers then hold and writes
into the captured output, and it raises if asked to replay after the weights moved (what a real graph
would silently get wrong). Everything around it is real: ComfyUI's sampler, LoRA patching,
ControlNet residuals, the graph cache's keys, buffer copies and pointer checks.
"""
from __future__ import annotations

import inspect
import logging
import types

import pytest
import torch

from workflow_utils import SD_TURBO, SDXL_TURBO

# The fast path's own helpers (and its module-wide one-torch-thread fixture).
from test_fastpath import LATENT, close, one_thread, rel_change, with_control  # noqa: E402,F401


@pytest.fixture(scope="module")
def pack(comfy):
    import comfy_turbo.nodes.fastpath as fastpath
    import comfy_turbo.nodes.loader as loader
    import comfy_turbo.nodes.prompt_cache as prompt_cache
    import comfy_turbo.nodes.sampler as sampler
    import comfy_turbo.nodes.scheduler as scheduler
    import comfy_turbo.samplers.cuda_graphs as cuda_graphs
    return type("Pack", (), dict(fastpath=fastpath, loader=loader, prompt_cache=prompt_cache, sampler=sampler,
                                 scheduler=scheduler, cuda_graphs=cuda_graphs))


def load(pack, model_files, name):
    """A fresh checkpoint, loaded under inference_mode as ComfyUI's executor loads it."""
    with torch.inference_mode():
        return pack.loader.load_turbo_checkpoint(str(model_files[name]))


def lora_for(model_files, name, model, strength):
    import comfy.sd
    import comfy.utils
    lora = comfy.utils.load_torch_file(str(model_files[name.replace(".safetensors", "-lora.safetensors")]))
    unet_only = {k: v for k, v in lora.items() if not k.startswith("lora_te")}
    return comfy.sd.load_lora_for_models(model, None, unet_only, strength, 0.0)[0]


def sample(pack, model, cond, steps=2, seed=7):
    with torch.inference_mode():
        sigmas = pack.scheduler.turbo_model_sigmas(model, steps)
        latent = {"samples": torch.zeros(1, 4, LATENT, LATENT)}
        return pack.sampler.turbo_sample(model, cond, latent, sigmas, seed)["samples"]


class EmulatedGraphs:
    """``torch.cuda.CUDAGraph`` semantics on the CPU, for GraphCache's ``backend``.

    A real graph replays the kernels it recorded, on the weights and modules of its capture: replaying
    after the weights moved (``weight_pointers``) or after a module was swapped (``modules``: the ids of
    the model's submodules) raises here, where a real graph would silently compute with stale state."""

    def __init__(self, weight_pointers=None, modules=None):
        self.weight_pointers = weight_pointers
        self.modules = modules
        self.captured = 0

    def capture(self, run, device=None):
        output = run()
        self.captured += 1
        return {"run": run, "output": output,
                "pointers": self.weight_pointers() if self.weight_pointers else None,
                "modules": self.modules() if self.modules else None}, output

    def replay(self, graph):
        if self.weight_pointers is not None and self.weight_pointers() != graph["pointers"]:
            raise AssertionError("replayed a graph whose weights have moved: a real graph would read stale memory")
        if self.modules is not None and self.modules() != graph["modules"]:
            raise AssertionError("replayed a graph whose modules were swapped: a real graph would run the old ones")
        with torch.inference_mode(graph["output"].is_inference()):
            graph["output"].copy_(graph["run"]())


# -- GraphCache alone ------------------------------------------------------------------------------

def test_graph_cache_warms_up_captures_replays_and_copies_inputs(pack):
    weight = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    holder = {"w": weight}
    backend = EmulatedGraphs(lambda: (holder["w"].data_ptr(),))
    cache = pack.cuda_graphs.GraphCache(backend=backend)

    def fn(x, control=None, scale=1.0):
        out = x @ holder["w"] * scale
        return out if control is None else out + control["middle"][0]

    pointers = lambda: (holder["w"].data_ptr(),)
    for i in range(4):
        x = torch.randn(2, 4)
        assert torch.equal(cache(fn, pointers, (x,), {}), fn(x))
    assert cache.stats == {"warmups": 1, "captures": 1, "replays": 3}

    control = {"input": [None], "middle": [torch.randn(2, 4)]}
    x = torch.randn(2, 4)
    for _ in range(3):                                   # a new input structure: its own graph
        control["middle"][0] = torch.randn(2, 4)
        assert torch.equal(cache(fn, pointers, (x,), {"control": control}), fn(x, control))
    cache(fn, pointers, (x,), {"scale": 2.0})                 # a plain value is part of the key
    assert cache.stats["captures"] == 2 and cache.stats["warmups"] == 3
    for _ in range(2):                                   # a new shape: warmed up, then its own graph
        y = torch.randn(3, 4)
        assert torch.equal(cache(fn, pointers, (y,), {}), fn(y))
    assert cache.stats["captures"] == 3 and cache.stats["warmups"] == 4

    holder["w"].data.copy_(torch.randn(4, 4))             # in place: same graph, new values
    assert torch.equal(cache(fn, pointers, (x,), {}), fn(x)) and cache.stats["recaptures"] == 0
    holder["w"] = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)   # replaced: re-capture
    assert torch.equal(cache(fn, pointers, (x,), {}), fn(x)) and cache.stats["recaptures"] == 1


def test_graph_cache_runs_uncapturable_calls_eagerly(pack, caplog):
    cache = pack.cuda_graphs.GraphCache(backend=EmulatedGraphs())
    x = torch.randn(3)
    assert torch.equal(cache(lambda x, f: f(x), lambda: (), (x, torch.sin), {}), torch.sin(x))
    assert cache.stats == {"eager": 1}

    class Refusing(EmulatedGraphs):
        def capture(self, run, device=None):
            raise RuntimeError("operation not permitted when stream is capturing")
    cache = pack.cuda_graphs.GraphCache(backend=Refusing())
    with caplog.at_level(logging.WARNING, logger="comfy_turbo"):
        for _ in range(3):
            assert torch.equal(cache(torch.cos, lambda: (), (x,), {}), torch.cos(x))
    assert cache.stats == {"warmups": 1, "eager": 2} and "cannot be captured" in caplog.text
    assert caplog.text.count("cannot be captured") == 1


def test_graph_cache_keeps_at_most_capacity_graphs(pack):
    cache = pack.cuda_graphs.GraphCache(capacity=2, backend=EmulatedGraphs())
    for n in (1, 2, 3, 1):
        for _ in range(2):
            cache(torch.neg, lambda: (), (torch.ones(n),), {})
    assert len(cache.graphs) == 2 and cache.stats["captures"] == 4     # n=1 was dropped, then captured again


# -- stable weight storage -------------------------------------------------------------------------

OTHER_CPU = torch.device("cpu", 1)   # an offload device distinct from the load device: moves copy the weights
META = torch.device("meta")          # one that keeps no data: what is left behind shows


@pytest.mark.parametrize("name", [SD_TURBO, SDXL_TURBO])
def test_lora_changes_keep_every_weight_in_place_on_the_fast_path(pack, model_files, name):
    fast_ckpt, plain_ckpt = load(pack, model_files, name), load(pack, model_files, name)
    cond = pack.prompt_cache.encode(fast_ckpt.clip, "a photo of a cat")
    # On this CPU-only machine the offload device would equal the load device; "cpu:1" is distinct (a move
    # there gives every weight new storage). ComfyUI re-patches a LoRA change by moving the model to its
    # offload device and back; the fast path keeps that device and re-patches in place instead.
    fast_ckpt.model.offload_device = OTHER_CPU
    fast = pack.fastpath.apply_fast_path(fast_ckpt.model)
    assert isinstance(fast, pack.fastpath.FastPathPatcher) and fast.weight_inplace_update
    assert fast.offload_device == OTHER_CPU, "the fast path must keep the real offload device"
    pointers = pack.fastpath.WeightPointers(fast_ckpt.model.model)
    plain_pointers = pack.fastpath.WeightPointers(plain_ckpt.model.model)

    close(sample(pack, fast, cond), first_plain := sample(pack, plain_ckpt.model, cond))
    fast_start, plain_start = pointers(), plain_pointers()
    plain_moved = False
    for strength in (1.0, 0.5, None, 1.0, -0.7):        # None: the LoRA removed again
        fast_model = fast if strength is None else lora_for(model_files, name, fast, strength)
        plain_model = plain_ckpt.model if strength is None else lora_for(model_files, name, plain_ckpt.model, strength)
        ours, reference = sample(pack, fast_model, cond), sample(pack, plain_model, cond)
        close(ours, reference)
        if strength is not None:
            assert rel_change(ours, first_plain) > 0.01, "the LoRA did not apply"
        assert pointers() == fast_start, f"a UNet weight moved at LoRA strength {strength}"
        plain_moved |= plain_pointers() != plain_start
    assert plain_moved, "the plain path also kept its pointers: this test would not see a moved weight"


def test_a_lora_changed_upstream_adopts_the_loaded_fast_paths_graphs(comfy, pack, model_files):
    """LoRA loader -> Turbo Fast Path: a new strength makes a new fast-path clone, which takes over the state of
    the one ComfyUI holds loaded: the same graphs replay, the weights stay put, the images follow the LoRA."""
    ckpt = load(pack, model_files, SD_TURBO)
    cond = pack.prompt_cache.encode(ckpt.clip, "a photo of a cat")
    ckpt.model.offload_device = OTHER_CPU
    pointers = pack.fastpath.WeightPointers(ckpt.model.model)
    backend = EmulatedGraphs(pointers)
    first = pack.fastpath.apply_fast_path(lora_for(model_files, SD_TURBO, ckpt.model, 0.8), cuda_graphs=True,
                                          graph_backend=backend)
    sample(pack, first, cond)
    state, loaded_at = pack.fastpath.fast_path_state(first), pointers()
    second = pack.fastpath.apply_fast_path(lora_for(model_files, SD_TURBO, ckpt.model, 0.3), cuda_graphs=True,
                                           graph_backend=backend)
    assert pack.fastpath.fast_path_state(second) is state
    ours = sample(pack, second, cond)
    assert pointers() == loaded_at and backend.captured == 1 and state.graph_cache(backend).stats["replays"] == 3
    close(ours, sample(pack, lora_for(model_files, SD_TURBO, ckpt.model, 0.3), cond))
    assert rel_change(ours, sample(pack, first, cond)) > 0.01, "the new strength did not apply"


# -- ComfyUI's unloads ----------------------------------------------------------------------------

def test_comfyuis_unload_moves_the_fast_paths_weights_off_and_drops_its_state(comfy, pack, model_files):
    import comfy.model_management as mm
    ckpt = load(pack, model_files, SD_TURBO)
    cond = pack.prompt_cache.encode(ckpt.clip, "a photo of a cat")
    ckpt.model.offload_device = META
    base = ckpt.model.model
    backend = EmulatedGraphs(pack.fastpath.WeightPointers(base))
    fast = pack.fastpath.apply_fast_path(ckpt.model, cuda_graphs=True, graph_backend=backend)
    assert fast.offload_device == META, "the fast path must keep the real offload device"
    state = pack.fastpath.fast_path_state(fast)
    sample(pack, fast, cond)                                            # warm-up, capture, replay
    assert state.holds_graphs() and backend.captured == 1
    mm.unload_all_models()                                              # what /free {"unload_models": true} runs
    assert state.empty() and list(state.drops) == ["ComfyUI unloaded the model"]
    assert all(t.is_meta for t in base.state_dict().values()), "a weight stayed on the load device"
    assert not any(m.model is not None and m.model.model is base for m in mm.current_loaded_models)


def test_after_an_unload_the_next_run_gives_the_same_image_with_new_graphs(comfy, pack, model_files):
    import comfy.model_management as mm
    ckpt = load(pack, model_files, SD_TURBO)
    cond = pack.prompt_cache.encode(ckpt.clip, "a photo of a cat")
    ckpt.model.offload_device = OTHER_CPU
    base = ckpt.model.model
    pointers = pack.fastpath.WeightPointers(base)
    backend = EmulatedGraphs(pointers)
    fast = pack.fastpath.apply_fast_path(ckpt.model, cuda_graphs=True, graph_backend=backend)
    state = pack.fastpath.fast_path_state(fast)
    lora = lora_for(model_files, SD_TURBO, fast, 0.8)
    before = sample(pack, lora, cond)
    loaded = list(base.state_dict().values())       # held, so no new weight can reuse their addresses
    with torch.inference_mode():     # as inside ComfyUI's executor, when a bigger model's load unloads this one
        mm.unload_all_models()       # (on a GPU the reload makes inference tensors again; cpu:1 -> cpu cannot)
    assert state.empty() and not set(pointers()) & {t.data_ptr() for t in loaded}, "a weight kept its storage"
    del loaded
    after = sample(pack, lora, cond)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    stats = state.graph_cache(backend).stats
    assert stats["warmups"] == 1 and stats["captures"] == 1 and backend.captured == 2     # captured afresh


def test_a_nested_object_patch_runs_without_a_graph(comfy, pack, model_files, caplog):
    """The graph key holds the UNet and model_sampling modules, not what an object patch swaps below them."""
    ckpt = load(pack, model_files, SD_TURBO)
    cond = pack.prompt_cache.encode(ckpt.clip, "a photo of a cat")
    base = ckpt.model.model
    backend = EmulatedGraphs(pack.fastpath.WeightPointers(base), modules=lambda: [id(m) for m in base.modules()])
    graphed = pack.fastpath.apply_fast_path(ckpt.model, cuda_graphs=True, graph_backend=backend)
    sample(pack, graphed, cond)
    assert backend.captured == 1
    out = base.diffusion_model.out[2]
    louder = torch.nn.Conv2d(out.in_channels, out.out_channels, out.kernel_size, padding=out.padding)
    with torch.no_grad():
        louder.weight.copy_(out.weight * 2)
        louder.bias.copy_(out.bias * 2)
    patched = graphed.clone()
    patched.add_object_patch("diffusion_model.out.2", louder)
    eager = pack.fastpath.apply_fast_path(ckpt.model).clone()
    eager.add_object_patch("diffusion_model.out.2", louder)
    with caplog.at_level(logging.WARNING, logger="comfy_turbo"):
        ours = sample(pack, patched, cond)
    assert "object patches a graph cannot follow (['diffusion_model.out.2'])" in caplog.text
    torch.testing.assert_close(ours, sample(pack, eager, cond), rtol=0, atol=1e-6)
    assert rel_change(ours, sample(pack, graphed, cond)) > 0.01, "the object patch did not apply"


def test_a_lora_change_under_a_vram_budget_offloads_what_comfyui_does_not_count(comfy, pack, model_files):
    """Re-patching in place is for a full load only: under a budget, ComfyUI loads part of the model and counts
    that, so the model must go through its offload device as ComfyUI moves any model (the part it does not count
    stays there). A full re-patch never moves it."""
    import comfy.model_management as mm
    ckpt = load(pack, model_files, SD_TURBO)
    ckpt.model.offload_device = OTHER_CPU
    base = ckpt.model.model
    moves = []
    move = base.to
    base.to = lambda *args, **kwargs: (moves.append(args[:1]), move(*args, **kwargs))[1]

    def repatch(strength, budget=None):
        """What load_models_gpu does for a LoRA changed on the loaded model (LoadedModel.model_load)."""
        new = lora_for(model_files, SD_TURBO, fast, strength)
        for i, entry in enumerate(list(mm.current_loaded_models)):
            if entry.model is not None and entry.model.model is base:
                mm.current_loaded_models.pop(i)
                entry.model.detach(unpatch_all=False)
                entry.model_finalizer.detach()
        extra = 1e32 if budget is None else budget - base.model_loaded_weight_memory
        with torch.inference_mode():
            new.partially_load(torch.device("cpu"), extra_memory=extra)
        return new

    fast = pack.fastpath.apply_fast_path(ckpt.model)
    with torch.inference_mode():
        mm.load_models_gpu([lora_for(model_files, SD_TURBO, fast, 1.0)])
    moves.clear()
    repatch(0.7)                                           # fully loaded, and again: in place
    assert (OTHER_CPU,) not in moves and not base.model_lowvram
    half = repatch(0.5, budget=fast.model_size() // 2)     # a budget: ComfyUI's own path
    assert base.model_lowvram, "the budget should have made a partial load"
    assert (OTHER_CPU,) in moves, "a partial load must unpatch onto the offload device, as ComfyUI does"
    half.detach()
    del base.to


def test_a_partial_unload_drops_the_graphs_and_the_model_runs_without_them(comfy, pack, model_files, caplog):
    ckpt = load(pack, model_files, SD_TURBO)
    cond = pack.prompt_cache.encode(ckpt.clip, "a photo of a cat")
    backend = EmulatedGraphs(pack.fastpath.WeightPointers(ckpt.model.model))
    fast = pack.fastpath.apply_fast_path(ckpt.model, cuda_graphs=True, graph_backend=backend)
    before = sample(pack, fast, cond)
    state = pack.fastpath.fast_path_state(fast)
    assert state.holds_graphs()
    with torch.inference_mode():
        freed = fast.partially_unload(OTHER_CPU, fast.model_size() // 2)
    assert freed > 0 and not state.holds_graphs()
    assert list(state.drops) == ["ComfyUI moved part of the model off its device to free memory"]


# -- ComfyUI 0.33's dynamic VRAM -------------------------------------------------------------------

def test_loader_registers_reload_factories_and_fast_path_opts_out_of_dynamic_vram(pack, model_files):
    import comfy.model_patcher
    ckpt = load(pack, model_files, SD_TURBO)
    cond = pack.prompt_cache.encode(ckpt.clip, "a photo of a cat")
    for patcher, part in ((ckpt.model, "model"), (ckpt.clip.patcher, "clip"), (ckpt.vae.patcher, "vae")):
        factory, args = patcher.cached_patcher_init
        assert factory is pack.loader.reload_turbo_part and args[2] == part
    fresh = pack.loader.reload_turbo_part(*ckpt.model.cached_patcher_init[1], disable_dynamic=True)
    reference = ckpt.model.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in fresh.model.state_dict().items())
    assert fresh.model.model_type == ckpt.model.model.model_type       # epsilon forced again

    if "disable_dynamic" in inspect.signature(comfy.model_patcher.ModelPatcher.clone).parameters:   # 0.33
        # What a dynamic-VRAM patcher is and does (--cpu never makes one): is_dynamic, and its cached delegate.
        def dynamic(patcher):
            patcher.is_dynamic = lambda: True
            patcher.non_dynamic_delegate_model = None
            patcher.get_non_dynamic_delegate = types.MethodType(
                comfy.model_patcher.ModelPatcherDynamic.get_non_dynamic_delegate, patcher)
            return patcher

        reloads = []
        factory, args = ckpt.model.cached_patcher_init

        def counted(*a, **kw):
            reloads.append(a)
            return factory(*a, **kw)
        ckpt.model.cached_patcher_init = (counted, args)
        fast = pack.fastpath.apply_fast_path(dynamic(ckpt.model))
        del ckpt.model.is_dynamic
        assert type(fast) is pack.fastpath.FastPathPatcher and not fast.is_dynamic()
        assert fast.model is not ckpt.model.model, "the non-dynamic delegate is reloaded through cached_patcher_init"
        close(sample(pack, fast, cond), sample(pack, ckpt.model, cond))
        # A LoRA strength changed upstream: a new dynamic patcher, the same delegate while it stays loaded.
        lora = dynamic(lora_for(model_files, SD_TURBO, ckpt.model, 0.7))
        fast_lora = pack.fastpath.apply_fast_path(lora)
        assert len(reloads) == 1 and fast_lora.model is fast.model, "the checkpoint was loaded from disk again"
        del lora.is_dynamic
        close(sample(pack, fast_lora, cond), sample(pack, lora, cond))
    else:                                          # 0.3.75: no dynamic VRAM, a plain clone
        fast = pack.fastpath.apply_fast_path(ckpt.model)
        assert fast.model is ckpt.model.model
    close(sample(pack, fast, cond), sample(pack, ckpt.model, cond))


# -- CUDA graphs -----------------------------------------------------------------------------------

def test_cuda_graphs_off_on_the_cpu_with_a_message(comfy, pack, model_files, caplog, monkeypatch):
    ckpt = load(pack, model_files, SD_TURBO)
    with caplog.at_level(logging.WARNING, logger="comfy_turbo"):
        model = pack.fastpath.TurboFastPath.execute(ckpt.model, cuda_graphs=True).result[0]
    assert "CUDA graphs need a CUDA GPU" in caplog.text and "runs without them" in caplog.text
    assert not model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, pack.fastpath.GRAPHS_KEY)
    monkeypatch.setattr(comfy.cli_args.args, "disable_cuda_graphs", True, raising=False)
    assert pack.fastpath.cuda_graphs_unavailable("cuda:0") == "ComfyUI was started with --disable-cuda-graphs"


@pytest.mark.parametrize("name", [SD_TURBO, SDXL_TURBO])
def test_cuda_graphs_replay_through_lora_and_controlnet_changes(pack, model_files, name):
    ckpt = load(pack, model_files, name)
    cond = pack.prompt_cache.encode(ckpt.clip, "a photo of a cat")
    base = ckpt.model.model
    backend = EmulatedGraphs(pack.fastpath.WeightPointers(base))
    graphed = pack.fastpath.apply_fast_path(ckpt.model, cuda_graphs=True, graph_backend=backend)
    eager = pack.fastpath.apply_fast_path(ckpt.model)          # same weights, same kernels, no graph
    stats = pack.fastpath.fast_path_state(graphed).graph_cache(backend).stats

    def same(model_graphed, model_eager, c):
        torch.testing.assert_close(sample(pack, model_graphed, c), sample(pack, model_eager, c), rtol=0, atol=1e-6)

    same(graphed, eager, cond)              # step 1 warms up, step 2 captures and replays
    same(graphed, eager, cond)
    assert stats["captures"] == 1 and stats["replays"] == 3 and stats["recaptures"] == 0

    for strength in (1.0, 0.4):             # in-place LoRA patches: the same graph, new values
        same(lora_for(model_files, name, graphed, strength), lora_for(model_files, name, eager, strength), cond)
    assert stats["captures"] == 1 and stats["recaptures"] == 0 and stats["replays"] == 7

    for strength in (1.0, 0.3):             # ControlNet residuals: one more graph, buffers refilled per call
        controlled = with_control(model_files, name, cond, strength)
        same(graphed, eager, controlled)
    assert stats["captures"] == 2 and stats["recaptures"] == 0

    # The plain path patches by replacing tensors (and restores the originals): still no stale replay.
    close(sample(pack, lora_for(model_files, name, ckpt.model, 1.0), cond),
          sample(pack, lora_for(model_files, name, eager, 1.0), cond))
    same(graphed, eager, cond)
    with torch.inference_mode():            # new storage, as an offload and reload gives
        for p in base.diffusion_model.parameters():
            p.data = p.data.clone()
    same(graphed, eager, cond)
    assert stats["recaptures"] == 1, "moved weights must re-capture, never replay"


def test_cuda_graphs_step_aside_for_attention_patches_and_other_wrappers(comfy, pack, model_files, caplog):
    ckpt = load(pack, model_files, SD_TURBO)
    cond = pack.prompt_cache.encode(ckpt.clip, "a photo of a cat")
    backend = EmulatedGraphs()
    graphed = pack.fastpath.apply_fast_path(ckpt.model, cuda_graphs=True, graph_backend=backend)
    patched = graphed.clone()
    patched.set_model_attn1_patch(lambda q, k, v, extra_options: (q, k * 1.5, v))
    with caplog.at_level(logging.INFO, logger="comfy_turbo"):
        out = sample(pack, patched, cond)
    assert backend.captured == 0 and "attention patches" in caplog.text
    close(out, sample(pack, patched, cond))

    wrapped = graphed.clone()                # another node's wrapper may decide per call: no graph either
    wrapped.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "someone.else",
                                 lambda executor, *args, **kwargs: executor(*args, **kwargs))
    with caplog.at_level(logging.INFO, logger="comfy_turbo"):
        for _ in range(2):
            sample(pack, wrapped, cond)
    assert backend.captured == 0 and "other nodes wrap the model call (['someone.else'])" in caplog.text
    for _ in range(2):                       # the same model without it captures
        sample(pack, graphed, cond)
    assert backend.captured == 1
