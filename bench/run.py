#!/usr/bin/env python3
"""Stock ComfyUI vs comfy-turbo, side by side in one process, through ComfyUI's own executor.

    bash bench/run.sh                                   # CPU: tiny checkpoints, 128x128
    bash bench/run.sh --device cuda --models full       # GPU: full-size SD-Turbo and SDXL-Turbo, 512x512

Five paths (bench/graphs.py): ``stock`` (CheckpointLoaderSimple, CLIPTextEncode, SDTurboScheduler,
SamplerCustom with KSamplerSelect euler_ancestral at cfg 1, VAEDecode), ``stock-taesd`` (the same,
decoded by core VAELoader taesd/taesdxl), ``ours`` (our nodes at their defaults), ``ours-fast``
(Turbo Fast Path: SDPA, channels_last, torch.compile; fp16 weights on CUDA) and
``ours-fast-taesd``. Each group of paths has its own ``execution.PromptExecutor`` with ComfyUI's
default (classic) cache, as ``main.py``'s prompt worker creates it, so loaders and the unchanged
prompt are cached exactly as in a server, and every timed run changes the seed, so the sampler and
decoder run each time.

Why in-process rather than over HTTP: the executor, its caching and every node are the same code
a server runs, but the latency of one prompt is then measured without the websocket and HTTP
round trips and PNG encoding (milliseconds, as large as the GPU targets themselves), the paths can
alternate run by run in one process, and stage timings and peak memory can be read in place.

Method: ``--warmup`` runs per path and setting (compiles happen here), then ``--runs`` rounds; each
round runs every path once, in a rotated order, so drift hits all paths alike. Reported: median,
p10, p90 of the per-prompt latency (``executor.execute``), ratios of medians against stock and the
median of the per-round paired ratios. Then ``--stage-runs`` instrumented runs per path, with a new
prompt text each time, time each node (device synchronised at every node boundary) and each UNet
step (each call of ComfyUI's ``comfy.samplers.sampling_function``: one denoiser evaluation incl.
conditioning batching), plus toggled repeat prompts (A, B, A, B) for the text encoder. Peak memory
is measured in separate runs: CUDA ``max_memory_allocated`` above what was allocated before the
run; on the CPU the peak resident set (sampled every millisecond, after ``malloc_trim``) above the
resident set before the run.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import graphs  # noqa: E402
import models as bench_models  # noqa: E402
import report  # noqa: E402

TEXT = "a cinematic photo of a red fox in the snow, golden hour, 35mm"


# -- set-up ------------------------------------------------------------------------------------

def setup_comfyui(device: str, comfyui_path: str, models_dir: Path):
    """Import ComfyUI for ``device``, register its built-in nodes, our pack and the bench sink."""
    sys.path.insert(0, comfyui_path)
    import utils.extra_config  # noqa: F401  (first, as main.py does: later imports can shadow 'utils')
    import comfy.cli_args
    comfy.cli_args.args.cpu = device == "cpu"
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import folder_paths
    import nodes
    for folder in ("checkpoints", "loras", "controlnet", "vae_approx"):
        folder_paths.add_model_folder_path(folder, str(models_dir / folder), is_default=True)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(REPO), ignore=set(nodes.NODE_CLASS_MAPPINGS))):
        raise SystemExit("comfy-turbo failed to load as a custom node (see the log above)")
    nodes.NODE_CLASS_MAPPINGS[graphs.SINK] = graphs.ImageSink


def device_name(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "nodes", "samplers", "bench",
                                ":!bench/results"], capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# -- running prompts ---------------------------------------------------------------------------

class BenchServer:
    """What PromptExecutor needs of the server; records events (with timestamps) when asked."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.events: list | None = None
        self.sync = None

    def send_sync(self, event, data, sid=None):
        if self.events is not None:
            self.sync()
            self.events.append((time.perf_counter(), event, data))

    def queue_updated(self):
        pass


class Group:
    """One executor (own cache, own loaded checkpoint) for the paths that share a graph."""

    def __init__(self, name: str):
        import execution
        self.name = name
        self.server = BenchServer()
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    def validate(self, prompt: dict) -> None:
        import execution
        valid = asyncio.run(execution.validate_prompt(uuid.uuid4().hex, prompt, None))
        if not valid[0]:
            raise RuntimeError(f"{self.name} graph is invalid: {json.dumps(valid[1])} {json.dumps(valid[3])[:2000]}")

    def run(self, prompt: dict, output: str) -> float:
        start = time.perf_counter()
        self.executor.execute(prompt, uuid.uuid4().hex, {"client_id": "bench"}, [output])
        elapsed = time.perf_counter() - start
        if not self.executor.success:
            errors = [m for m in self.executor.status_messages if m[0] == "execution_error"]
            raise RuntimeError(f"{self.name}/{output} failed: {errors[-1][1].get('exception_message') if errors else '?'}")
        return elapsed


@contextlib.contextmanager
def instrumented(group: Group, sync):
    """Record node start times and the duration of each denoiser call (UNet step), device-synchronised."""
    import comfy.samplers
    inner = comfy.samplers.sampling_function
    steps: list[float] = []

    def timed(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        sync()
        steps.append(time.perf_counter() - start)
        return out

    group.server.events, group.server.sync = [], sync
    comfy.samplers.sampling_function = timed
    try:
        yield group.server.events, steps
    finally:
        comfy.samplers.sampling_function = inner
        group.server.events = None


def node_times(events: list) -> dict[str, float]:
    """Seconds per executed node, from one prompt's 'executing' events up to 'execution_success'."""
    times, current, start = {}, None, None
    for t, kind, data in events:
        if kind not in ("executing", "execution_success"):
            continue
        if current is not None:
            times[current] = times.get(current, 0.0) + t - start
        current, start = (data.get("node") if kind == "executing" else None), t
    return times


class PeakRSS:
    """Peak resident set of this process while in the block, sampled every millisecond."""

    def __init__(self):
        self.peak = self.base = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # hand freed heap back, so the next peak is visible
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def measure_memory(device: str, group: Group, prompt: dict, output: str) -> dict:
    import gc
    import torch
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        group.run(prompt, output)
        peak = torch.cuda.max_memory_allocated()
        return {"kind": "cuda max_memory_allocated", "working_mb": (peak - base) / 2**20, "peak_mb": peak / 2**20}
    with PeakRSS() as rss:
        group.run(prompt, output)
    return {"kind": "cpu resident set", "working_mb": (rss.peak - rss.base) / 2**20, "peak_mb": rss.peak / 2**20}


# -- statistics --------------------------------------------------------------------------------

def summary_ms(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return {"median": statistics.median(ms), "p10": q[0], "p90": q[-1], "min": ms[0], "n": len(ms)}


def median_ms(values: list[float]) -> float | None:
    return statistics.median(values) * 1000 if values else None


# -- the benchmark -----------------------------------------------------------------------------

FAST_PATHS = ("ours-fast", "ours-fast-taesd")


class FamilyBench:
    """One model family's paths, each group of paths with its own executor, kept across settings.

    ``measure(steps, batch)`` is one setting of the table: warm-up, rotated rounds, instrumented stage runs
    and peak memory, as the module docstring says. The executors (and so the loaded checkpoints, text
    encodings and captured graphs) live until ``close()``, so later settings and ``lora_switch`` reuse them.
    ``variants`` adds Turbo Fast Path configurations beside the main one (``fast``), name -> fast options:
    their fast paths (``FAST_PATHS``) run in the same rounds, in groups of their own, and their rows say
    ``"variant": name``.
    """

    def __init__(self, args, family: str, ckpt: str, sync, log, paths=None, fast: dict | None = None,
                 variants: dict | None = None):
        self.args, self.family, self.ckpt, self.sync, self.log = args, family, ckpt, sync, log
        self.taesd = bench_models.TAESD_NAMES[family]
        self.options = {None: fast or fast_options(args), **(variants or {})}
        main = [p for p in graphs.PATHS if p in (args.paths if paths is None else paths)]
        self.entries = [(p, None) for p in main] + [(p, v) for v in (variants or {}) for p in FAST_PATHS]
        self.seed, self.text, self.first_setting = 0, TEXT, True
        self.groups = {}
        for entry in self.entries:
            key = self.group_key(entry)
            if key not in self.groups:
                self.groups[key] = Group(graphs.GROUP_OF[entry[0]] + (f"[{key[1]}]" if key[1] else ""))
                self.groups[key].validate(self.graph(entry, steps=1, batch=1, seed=0))

    @staticmethod
    def group_key(entry) -> tuple:
        path, variant = entry
        return graphs.GROUP_OF[path], (variant if graphs.GROUP_OF[path] == "fast" else None)

    @staticmethod
    def label(entry) -> str:
        return entry[0] + (f"[{entry[1]}]" if entry[1] else "")

    def graph(self, entry, steps: int, batch: int, seed: int) -> dict:
        group, variant = self.group_key(entry)
        return graphs.group_graph(group, ckpt=self.ckpt, taesd=self.taesd, steps=steps, batch=batch,
                                  size=self.args.size, seed=seed, text=self.text, fast=self.options[variant])

    def prompt_for(self, entry, steps: int, batch: int) -> dict:
        self.seed += 1
        return self.graph(entry, steps, batch, self.seed)

    def run(self, entry, steps: int, batch: int) -> float:
        return self.groups[self.group_key(entry)].run(self.prompt_for(entry, steps, batch), graphs.OUTPUT_OF[entry[0]])

    def measure(self, steps: int, batch: int, runs: int | None = None, warmup: int | None = None,
                stage_runs: int | None = None, memory: bool = True) -> list[dict]:
        """One (steps, batch) setting of every path: its rows."""
        args, log, sync, family = self.args, self.log, self.sync, self.family
        runs = args.runs if runs is None else runs
        warmup = args.warmup if warmup is None else warmup
        stage_runs = args.stage_runs if stage_runs is None else stage_runs
        entries, run = self.entries, self.run
        log(f"[{family}] {steps} step(s), batch {batch}: warm-up")
        warm = {e: [] for e in entries}          # the first ones pay for loading, compiling and graph capture
        for _ in range(warmup):
            for e in entries:
                warm[e].append(run(e, steps, batch))
        latencies = {e: [] for e in entries}
        for r in range(runs):
            order = entries[r % len(entries):] + entries[:r % len(entries)]
            for e in order:
                latencies[e].append(run(e, steps, batch))
        log(f"[{family}] {steps} step(s), batch {batch}: " + ", ".join(
            f"{self.label(e)} {statistics.median(v) * 1000:.1f} ms" for e, v in latencies.items() if v))

        stages = {e: {"steps": [], "sampler": [], "decode": []} for e in entries}
        encode = {key: {"new": [], "repeat": []} for key in self.groups}
        texts = [f"{TEXT}, variation {self.seed}-{i}" for i in range(stage_runs)]
        toggles = texts[-2:] * 2 if self.first_setting and len(texts) >= 2 else []   # A, B, A, B: repeats
        self.first_setting = False
        for i, new_text in enumerate(texts + toggles):
            self.text = new_text
            for e in entries:
                key = self.group_key(e)
                with instrumented(self.groups[key], sync) as (events, unet_steps):
                    run(e, steps, batch)
                times = node_times(events)
                if graphs.ENCODE_NODE in times:          # the group's first path; the next ones reuse it
                    encode[key]["new" if i < len(texts) else "repeat"].append(times[graphs.ENCODE_NODE])
                if i < len(texts):
                    stages[e]["steps"].append(unet_steps)
                    stages[e]["sampler"].append(times[graphs.SAMPLER_NODE])
                    stages[e]["decode"].append(times[graphs.DECODE_NODE_OF[e[0]]])
        self.text = TEXT
        if texts:
            for e in entries:                            # the usual prompt back in every cache
                run(e, steps, batch)
        used = {e: measure_memory(args.device, self.groups[self.group_key(e)], self.prompt_for(e, steps, batch),
                                  graphs.OUTPUT_OF[e[0]]) for e in entries} if memory else {}

        stock = latencies.get(("stock", None))
        stock_taesd = latencies.get(("stock-taesd", None))
        rows = []
        for e in entries:
            path, variant = e
            st = stages[e]
            per_step = [median_ms([s[k] for s in st["steps"] if len(s) > k]) for k in range(steps)]
            row = {
                "steps": steps, "batch": batch, "path": path, **({"variant": variant} if variant else {}),
                "latency_ms": summary_ms(latencies[e]) if latencies[e] else None,
                "warmup_ms": [round(w * 1000, 1) for w in warm[e]],
                "stages_ms": {
                    "text_encode_new": median_ms(encode[self.group_key(e)]["new"]),
                    "text_encode_repeat": median_ms(encode[self.group_key(e)]["repeat"]),
                    "unet_steps": per_step,
                    "sampler_node": median_ms(st["sampler"]),
                    "sampler_overhead": median_ms([n - sum(s) for n, s in zip(st["sampler"], st["steps"])]),
                    "decode": median_ms(st["decode"]),
                    "decoder": "taesd" if path.endswith("taesd") else "vae",
                },
                **({"memory": used[e]} if e in used else {}),
            }
            if stock and latencies[e]:
                row["ratio_vs_stock"] = statistics.median(latencies[e]) / statistics.median(stock)
                row["paired_ratio_vs_stock"] = statistics.median(a / b for a, b in zip(latencies[e], stock))
            if path == "ours-fast-taesd" and stock_taesd and latencies[e]:
                row["ratio_vs_stock_taesd"] = statistics.median(latencies[e]) / statistics.median(stock_taesd)
            rows.append(row)
        return rows

    def close(self) -> None:
        """Drop the executors and unload every model."""
        import gc
        import comfy.model_management
        self.groups.clear()
        comfy.model_management.unload_all_models()
        gc.collect()
        comfy.model_management.soft_empty_cache()


def bench_model(args, family: str, ckpt: str, sync, log) -> dict:
    bench = FamilyBench(args, family, ckpt, sync, log)
    try:
        rows = [row for steps in args.steps for batch in args.batch for row in bench.measure(steps, batch)]
    finally:
        bench.close()
    return {"rows": rows}


def _quiet_lora_keys() -> None:
    """The bench LoRA also holds text-encoder keys, which LoraLoaderModelOnly reports one by one."""
    root = logging.getLogger()
    if not any(getattr(f, "comfy_turbo_bench", False) for f in root.filters):
        def drop(record):
            return "lora key not loaded" not in record.getMessage()
        drop.comfy_turbo_bench = True
        root.addFilter(drop)


def lora_switch(args, family: str, ckpt: str, fast: dict, log, runs: int | None = None, warmup: int = 4,
                group: "Group | None" = None) -> dict:
    """Latency with a core LoraLoaderModelOnly after Turbo Fast Path (1 step, batch 1, TAESD decode), its
    strength the same every run, then alternating 1.0 / 0.5 (every prompt re-patches the UNet in place);
    the difference of the medians is the cost of a switch (with CUDA graphs on: no re-capture).
    ``group``: an executor to run in (one of FamilyBench's keeps the checkpoint loaded), else a new one."""
    import statistics as stats
    runs = args.runs if runs is None else runs
    taesd = bench_models.TAESD_NAMES[family]
    lora = bench_models.lora_name(ckpt)
    seed = [10_000]

    def prompt(strength):
        seed[0] += 1
        graph = graphs.ours_graph(ckpt=ckpt, taesd=taesd, steps=1, batch=1, size=args.size, seed=seed[0], text=TEXT,
                                  fast=fast, lora=(lora, strength))
        return graph, graphs.OUTPUT_OF["ours-fast-taesd"]

    _quiet_lora_keys()
    group = group or Group("lora")
    for strength in (1.0, 0.5, 1.0, 0.5)[:warmup]:              # warm-up: load, compile, capture
        group.run(*prompt(strength))
    steady = [group.run(*prompt(1.0)) for _ in range(runs)]
    switching = [group.run(*prompt(0.5 if r % 2 == 0 else 1.0)) for r in range(runs)]
    out = {"steady_ms": summary_ms(steady), "switching_ms": summary_ms(switching),
           "switch_cost_ms": (stats.median(switching) - stats.median(steady)) * 1000}
    log(f"[{family}] LoRA: steady {stats.median(steady) * 1000:.1f} ms, switching every prompt "
        f"{stats.median(switching) * 1000:.1f} ms")
    return out


def bench_extras(args, family: str, ckpt: str, sync, log) -> dict:
    """What the main table does not show, for the fast path at 1 step, batch 1 (TAESD decode):

    * ``lora_switch``: the cost of a LoRA strength switch (``lora_switch``);
    * ``precision``: the same graph with fp16 and with bf16 weights, runs alternating;
    * ``fast_vs_plain``: max |difference| of the decoded images (0..1) of the fast path and of our plain
      path at the same weight precision and seed, full VAE.
    """
    import statistics as stats
    taesd = bench_models.TAESD_NAMES[family]
    fast = fast_options(args)
    seed = [10_000]

    def prompt(fast_opts, dtype=None):
        seed[0] += 1
        opts = dict(fast_opts, weight_dtype=dtype or fast_opts["weight_dtype"])
        graph = graphs.ours_graph(ckpt=ckpt, taesd=taesd, steps=1, batch=1, size=args.size, seed=seed[0], text=TEXT,
                                  fast=opts)
        return graph, graphs.OUTPUT_OF["ours-fast-taesd"]

    def timed(group, graph_and_output, repeat=1):
        return [group.run(*graph_and_output) for _ in range(repeat)]

    out = {"lora_switch": lora_switch(args, family, ckpt, fast, log)}

    if args.device == "cuda":
        groups = {d: Group(d) for d in ("fp16", "bf16")}
        for d, g in groups.items():
            for _ in range(max(args.warmup, 2)):
                timed(g, prompt(fast, dtype=d))
        lat = {d: [] for d in groups}
        for r in range(args.runs):
            for d in (("fp16", "bf16") if r % 2 == 0 else ("bf16", "fp16")):
                lat[d] += timed(groups[d], prompt(fast, dtype=d))
        out["precision"] = {d: summary_ms(v) for d, v in lat.items()}
        log(f"[{family}] fp16 {stats.median(lat['fp16']) * 1000:.1f} ms, bf16 {stats.median(lat['bf16']) * 1000:.1f} ms")
        del groups

    images = {}
    for name, graph, output in (
            ("plain", _plain_at(ckpt, taesd, args.size, fast["weight_dtype"]), graphs.OUTPUT_OF["ours"]),
            ("fast", graphs.ours_graph(ckpt=ckpt, taesd=taesd, steps=1, batch=1, size=args.size, seed=7, text=TEXT,
                                       fast=fast), graphs.OUTPUT_OF["ours-fast"])):
        g = Group(name)
        for _ in range(3):                                       # the last run is a warm (captured) one
            g.run(graph, output)
        images[name] = graphs.ImageSink.last_image.float()
    difference = (images["fast"] - images["plain"]).abs()
    out["fast_vs_plain"] = {"weight_dtype": fast["weight_dtype"], "decoder": "vae",
                            "max_abs_diff": difference.max().item(), "mean_abs_diff": difference.mean().item()}
    log(f"[{family}] fast vs plain at {fast['weight_dtype']}: max |diff| {difference.max().item():.2e}")
    import comfy.model_management
    comfy.model_management.unload_all_models()
    return out


def _plain_at(ckpt: str, taesd: str, size: int, weight_dtype: str) -> dict:
    """Our plain graph with the loader at ``weight_dtype`` (no fast path)."""
    graph = graphs.ours_graph(ckpt=ckpt, taesd=taesd, steps=1, batch=1, size=size, seed=7, text=TEXT, fast=None)
    graph["ckpt"]["inputs"]["weight_dtype"] = weight_dtype
    return graph


def merge_entry(old: dict | None, entry: dict, rows: list[dict], run_info: dict) -> dict:
    """Add this run's settings to a model's results, replacing the same settings of earlier runs.

    Every (steps, batch) setting comes whole from one run, so its ratios are always side by side;
    a different checkpoint, size or fast path configuration starts the model's results afresh.
    """
    same = old is not None and all(old.get(k) == entry[k] for k in ("checkpoint", "model_set", "size", "fast_options"))
    measured = {tuple(s) for s in run_info["settings"]}
    runs = [r for r in old["runs"] if {tuple(s) for s in r["settings"]} - measured] if same else []
    for r in runs:
        r["settings"] = [s for s in r["settings"] if tuple(s) not in measured]
    kept = [r for r in old["rows"] if (r["steps"], r["batch"]) not in measured] if same else []
    merged = sorted(kept + rows, key=lambda r: (r["steps"], r["batch"], graphs.PATHS.index(r["path"])))
    notes = old.get("notes", []) if same else []   # hand-written remarks on earlier runs (report.py shows them)
    extras = old.get("extras") if same else None   # replaced by bench_extras when this run measures them
    return {**entry, "runs": runs + [run_info], "rows": merged, **({"notes": notes} if notes else {}),
            **({"extras": extras} if extras else {})}


def pack_module(path: str):
    """A module of the pack as ComfyUI loaded it (a custom node loads under its folder's name), or None."""
    target = (REPO / path).resolve()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == target:
            return module
    return None


def compile_settings(compile: str, device: str) -> dict | None:
    """What torch.compile really ran with on the ours-fast paths (nodes/fastpath.py's compile_settings)."""
    fastpath = pack_module("nodes/fastpath.py")
    if compile == "off" or fastpath is None:
        return None
    return fastpath.compile_settings(fastpath.COMPILE_MODES[compile], device)


def fast_options(args) -> dict:
    return {
        "weight_dtype": "fp16" if args.device == "cuda" else "default",
        "model": {"attention": "sdpa", "sdpa_backend": "auto", "channels_last": True, "compile": args.compile,
                  "cuda_graphs": args.cuda_graphs == "on"},
        "vae": {"precision": "auto", "compile": args.compile != "off" and args.compile_vae},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", choices=sorted(bench_models.MODEL_SETS),
                        help="checkpoints: 'tiny' test fixtures (CPU default) or 'full' full-size (CUDA default)")
    parser.add_argument("--only", nargs="+", choices=sorted(bench_models.TAESD_NAMES),
                        default=sorted(bench_models.TAESD_NAMES), help="model families (default: both)")
    parser.add_argument("--size", type=int, help="square image size (default: 512 on CUDA, 128 on the CPU)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--runs", type=int, default=20, help="timed rounds per setting (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per path and setting (default 3)")
    parser.add_argument("--stage-runs", type=int, default=5, help="instrumented runs per path and setting")
    parser.add_argument("--paths", nargs="+", choices=graphs.PATHS, default=list(graphs.PATHS))
    parser.add_argument("--compile", choices=["off", "inductor", "inductor-max-autotune"], default="inductor",
                        help="Turbo Fast Path's compile option on the ours-fast paths (default inductor)")
    parser.add_argument("--cuda-graphs", choices=["on", "off"],
                        help="Turbo Fast Path's cuda_graphs option on the ours-fast paths (default: on with CUDA)")
    parser.add_argument("--extras", choices=["on", "off"],
                        help="also measure LoRA switches, fp16 vs bf16 and the fast path's difference from the "
                             "plain path (default: on with CUDA)")
    parser.add_argument("--no-compile-vae", dest="compile_vae", action="store_false",
                        help="do not compile the decoders on the ours-fast paths")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", help="results file name (default: <device>-<device model>)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.models = args.models or ("full" if args.device == "cuda" else "tiny")
    args.size = args.size or (512 if args.device == "cuda" else 128)
    args.cuda_graphs = args.cuda_graphs or ("on" if args.device == "cuda" else "off")
    args.extras = args.extras or ("on" if args.device == "cuda" else "off")
    if args.runs < 2 or args.size % 64:
        parser.error("--runs must be at least 2 and --size a multiple of 64")

    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        parser.error("COMFYUI_PATH is not set: run bench/run.sh, or point it at a ComfyUI checkout")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0, commit = time.monotonic(), git_commit()
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[{time.monotonic() - t0:6.0f} s] {msg}", flush=True))

    models_dir = bench_models.ensure(args.models, args.only, comfyui)
    setup_comfyui(args.device, comfyui, models_dir)
    import torch
    import comfyui_version
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    name = device_name(args.device)
    out_name = args.name or f"{args.device}-{slug(name)}"
    log(f"device: {name} ({args.device}); ComfyUI {comfyui_version.__version__}; torch {torch.__version__}; "
        f"{args.models} checkpoints at {args.size}x{args.size}")

    results_path = args.out / f"{out_name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update({"schema": 1, "device": args.device, "device_name": name, "name": out_name})
    results.setdefault("models", {})
    for family in args.only:
        ckpt = bench_models.MODEL_SETS[args.models][family]
        load_start = os.getloadavg()
        started = time.monotonic()
        rows = bench_model(args, family, ckpt, sync, log)["rows"]
        run_info = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "torch": torch.__version__, "comfyui": comfyui_version.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "seconds": round(time.monotonic() - started, 1),
            "runs": args.runs, "warmup": args.warmup, "stage_runs": args.stage_runs,
            "settings": sorted({(r["steps"], r["batch"]) for r in rows}),
            "compile_settings": compile_settings(args.compile, args.device),
            "command": "bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        entry = {"checkpoint": ckpt, "model_set": args.models, "size": args.size, "fast_options": fast_options(args),
                 "unet_parameters": bench_models.unet_parameters(models_dir / "checkpoints" / ckpt)}
        results["models"][family] = merge_entry(results["models"].get(family), entry, rows, run_info)
        if args.extras == "on":
            results["models"][family]["extras"] = bench_extras(args, family, ckpt, sync, log)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    paths = report.write_all(results_path)
    log("wrote " + ", ".join(str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
