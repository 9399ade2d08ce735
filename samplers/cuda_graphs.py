"""CUDA graphs for one model call, replayed only while the weights stay where they were captured.

Pure torch, no ComfyUI import. A captured graph replays the exact kernels it recorded, reading its
inputs from fixed ("static") buffers and its weights from fixed addresses. So:

* a graph is keyed by everything that changes the kernels: the structure of the inputs (which
  ControlNet residuals are present, for instance), each tensor's shape, dtype, device and strides,
  and the plain values (ints, strings) among them, plus a caller-supplied extra key;
* every replay first copies the new inputs into the static buffers (ControlNet residuals included);
* before every replay the weights' data pointers are compared with those recorded at capture; on a
  mismatch (a LoRA patched by replacing tensors, a model moved between devices) the graph is dropped
  and re-captured, never replayed stale. In-place LoRA updates (``param.data.copy_``) keep the
  pointers, so the same graph replays the new values;
* the first call of a key runs eagerly (a warm-up: lazy initialisation, cuDNN autotuning,
  torch.compile's compilation), the second captures after one more warm-up on a side stream, as
  ``torch.cuda.graphs`` recommends, and later calls replay;
* a call that cannot be captured (an input that is neither a tensor nor a plain value, an operation
  that synchronises) runs eagerly, for good, with one log line saying why.

References: PyTorch "CUDA Graphs" notes (https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs),
``torch.cuda.graph`` / ``torch.cuda.CUDAGraph``; stable-fast's graph-per-shape design.
"""
from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

import torch

log = logging.getLogger("comfy_turbo")

PLAIN_TYPES = (type(None), bool, int, float, str)


class Uncapturable(Exception):
    """An input a graph cannot hold (neither a tensor nor a plain value)."""


def flatten(obj: Any, tensors: list) -> Hashable:
    """A hashable signature of ``obj`` (nested dicts, lists and tuples), appending its tensors to ``tensors``.

    A tensor is described by shape, dtype, device and strides: whatever selects different kernels.
    """
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device, obj.stride())
    if isinstance(obj, PLAIN_TYPES):
        return ("value", type(obj).__name__, obj)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(flatten(item, tensors) for item in obj))
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise Uncapturable("a dict with non-string keys")
        return ("dict", tuple((k, flatten(v, tensors)) for k, v in obj.items()))
    raise Uncapturable(f"an input of type {type(obj).__name__}")


def unflatten(signature: Hashable, tensors: Iterator[torch.Tensor]) -> Any:
    """Rebuild what ``flatten`` described, taking the tensors from ``tensors`` in order."""
    kind = signature[0]
    if kind == "tensor":
        return next(tensors)
    if kind == "value":
        return signature[2]
    if kind in ("list", "tuple"):
        items = [unflatten(s, tensors) for s in signature[1]]
        return items if kind == "list" else tuple(items)
    return {k: unflatten(s, tensors) for k, s in signature[1]}


class CudaGraphBackend:
    """Capture and replay with ``torch.cuda.CUDAGraph``, all graphs sharing one memory pool."""

    def __init__(self):
        self.pool = None

    def capture(self, run: Callable[[], torch.Tensor], device: torch.device):
        with torch.cuda.device(device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run()                                 # warm-up on a side stream, as torch.cuda.graphs asks
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA work (a second GPU's sampler) does not break this capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = run()
        return graph, output

    def replay(self, graph) -> None:
        graph.replay()


@dataclass
class CapturedGraph:
    graph: Any
    static_inputs: list
    output: torch.Tensor
    weight_pointers: tuple


class GraphCache:
    """Captured graphs of one function, at most ``capacity`` of them (least recently used dropped first).

    ``stats`` counts ``warmups``, ``captures``, ``recaptures`` (weights moved), ``replays`` and
    ``eager`` calls (uncapturable), for tests and the bench.
    """

    def __init__(self, capacity: int = 8, backend=None):
        self.capacity = capacity
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.graphs: "OrderedDict[Hashable, CapturedGraph]" = OrderedDict()
        self.warmed: set = set()
        self.refused: dict = {}
        self.stats: Counter = Counter()

    def clear(self) -> None:
        """Drop every graph (their static buffers and outputs; the memory pool goes with the backend's last
        graph). Calls warm up and capture again."""
        self.graphs.clear()
        self.warmed.clear()
        self.stats["cleared"] += 1

    def __call__(self, fn: Callable[..., torch.Tensor], weight_pointers: Callable[[], tuple], args: tuple,
                 kwargs: dict, extra_key: Hashable = ()) -> torch.Tensor:
        """``fn(*args, **kwargs)``, from a graph when one can be used.

        ``weight_pointers()`` returns the data pointers of every tensor ``fn`` reads besides its
        arguments (the weights); ``extra_key`` anything else the captured kernels depend on.
        """
        tensors: list = []
        try:
            signature = flatten((args, kwargs), tensors)
        except Uncapturable as e:
            self.stats["eager"] += 1
            return fn(*args, **kwargs)
        key = (signature, extra_key)
        if key in self.refused:
            self.stats["eager"] += 1
            return fn(*args, **kwargs)
        pointers = weight_pointers()
        entry = self.graphs.get(key)
        if entry is not None and entry.weight_pointers != pointers:
            del self.graphs[key]                  # weights were replaced or moved: never replay stale
            entry = None
            self.stats["recaptures"] += 1
        if entry is None:
            if key not in self.warmed:
                self.warmed.add(key)
                self.stats["warmups"] += 1
                return fn(*args, **kwargs)
            entry = self._capture(key, fn, signature, tensors, pointers, args, kwargs)
            if entry is None:
                return fn(*args, **kwargs)
        else:
            self.graphs.move_to_end(key)
            for static, new in zip(entry.static_inputs, tensors):
                if static is not new:
                    static.copy_(new)
        self.backend.replay(entry.graph)
        self.stats["replays"] += 1
        return entry.output.clone()            # the next replay overwrites entry.output

    def _capture(self, key, fn, signature, tensors, pointers, args, kwargs):
        static_inputs = [t.clone() for t in tensors]

        def run():
            static_args, static_kwargs = unflatten(signature, iter(static_inputs))
            return fn(*static_args, **static_kwargs)

        try:
            graph, output = self.backend.capture(run, tensors[0].device if tensors else None)
        except Exception as e:                  # e.g. a synchronising operation inside the model
            if isinstance(e, torch.cuda.OutOfMemoryError) or type(e).__name__ == "InterruptProcessingException":
                raise                           # out of memory, or Cancel: not the graph's fault, try again later
            self.refused[key] = f"{type(e).__name__}: {e}"
            self.stats["eager"] += 1
            log.warning("comfy-turbo: this model call cannot be captured in a CUDA graph (%s); it runs without one.",
                        self.refused[key])
            return None
        if not isinstance(output, torch.Tensor):
            self.refused[key] = f"the call returned {type(output).__name__}, not a tensor"
            self.stats["eager"] += 1
            return None
        self.stats["captures"] += 1
        self.graphs[key] = CapturedGraph(graph, static_inputs, output, pointers)
        while len(self.graphs) > self.capacity:
            self.graphs.popitem(last=False)
        return self.graphs[key]
