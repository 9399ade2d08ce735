#!/usr/bin/env python3
"""Turbo Live against stock ComfyUI's best equivalent, through a real ComfyUI server, in one run.

    bash bench/live.sh                                  # CPU: tiny checkpoints, 512x512 frames
    bash bench/live.sh --device cuda --models full      # GPU: full-size SD-Turbo and SDXL-Turbo
    python bench/live_bench.py --page docs/live.md            # only re-render the figures in docs/live.md

Stock's best equivalent of a live loop is what its web UI offers: Run (Instant) re-queues the graph
each time the queue empties (strictly one after another, no frame dropping), the core webcam node
uploads every frame as a PNG (``/upload/image``) for ``LoadImage``, and the picture comes back through
``PreviewImage`` (a PNG in temp/) and ``/view``. Ours is the Turbo Live panel's loop, driven by
``scripts/live_client.py``: JPEG frames on the pack's websocket, one prompt on the server at a time
with the newest input waiting, JPEG back as ComfyUI's binary message type 4.

Measured, ours and stock alternating in one run:

1. **transport**: frames with no model at all (Turbo Live Input -> Output against LoadImage ->
   PreviewImage), per frame, one at a time.
2. **webcam, per frame** (``turbo_live_webcam``: TAESD encode, 1 step, TAESD decode), one frame at a
   time: capture to display, the model's share (the model nodes' time from ComfyUI's ``executing``
   messages), and the rest: the per-frame overhead outside the model. Both sides encode their frame in
   the client as the browser would (JPEG for ours, PNG for stock's webcam node), and that counts.
3. **webcam, streaming**: a 30 fps camera for ``--seconds``: sustained fps, capture-to-display
   p50/p95, frames dropped (ours) or waiting (stock serialises them).
4. **prompt-as-you-type** (``turbo_live_txt2img``): a sentence typed at 8 characters a second;
   edit-to-pixels p50/p95, from each keystroke to the first picture that includes it.

Results go to ``bench/results/live/<device>-<device model>.{json,md}``; ``--page docs/live.md`` re-renders
those .md files and the section of docs/live.md between ``PAGE_START`` and ``PAGE_END`` from the JSON
(tests/test_live_bench.py checks that the page is up to date).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
from comfy_host import ComfyHost, default_comfyui_path  # noqa: E402
from live_client import Http, LiveClient, LiveLoop, percentile  # noqa: E402

import models as bench_models  # noqa: E402
import report  # noqa: E402
from run import device_name, git_commit, slug  # noqa: E402

PAGE = REPO / "docs" / "live.md"
PAGE_START, PAGE_END = "<!-- live-figures:start -->", "<!-- live-figures:end -->"
MD_HEADER = "# Turbo Live benchmark\n\nWritten by `bench/live.sh` (bench/live_bench.py explains the method).\n\n"
RESULTS = REPO / "bench" / "results" / "live"      # apart from bench/run.py's results in bench/results/
WORKFLOWS = REPO / "workflows" / "api"
SENTENCE = "a red fox in fresh snow, golden hour"
TYPING_CPS = 8.0                 # characters per second
CAMERA_FPS = 30.0
LIVE_IO = {"TurboLiveInput", "TurboLiveOutput", "LoadImage", "PreviewImage"}
CHECKPOINTS = {"sd-turbo": "sd_turbo.safetensors", "sdxl-turbo": "sd_xl_turbo_1.0_fp16.safetensors"}


# --- the camera and the graphs ----------------------------------------------------------------

class Camera:
    """A synthetic camera: a smooth scene with a moving square and sensor noise, at `size` x `size`.

    Its frames are made up front (a real camera hands them over for free): capturing costs nothing here,
    encoding them for the wire counts.
    """

    def __init__(self, size: int, frames: int = 90):
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        scene = np.stack([x * 200 + 30, y * 180 + 40, (1 - x) * 120 + 60], axis=2)
        rng, side = np.random.default_rng(0), size // 4
        self.frames = []
        for i in range(frames):                  # three seconds at 30 fps, then it loops
            frame = scene.copy()
            left = int((np.sin(i / CAMERA_FPS * 2.0) * 0.35 + 0.5) * (size - side))
            frame[size // 3: size // 3 + side, left:left + side] = (240, 210, 40)
            frame += rng.normal(0, 3, frame.shape)
            self.frames.append(np.clip(frame, 0, 255).astype(np.uint8))

    def capture(self, t: float) -> np.ndarray:
        return self.frames[int(t * CAMERA_FPS) % len(self.frames)]


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)         # the panel's canvas.toBlob(jpeg, 0.9)
    else:
        Image.fromarray(pixels).save(buffer, "PNG", compress_level=6)   # a browser canvas PNG, zlib's default
    return buffer.getvalue()


def load_twin(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}_api.json").read_text())


def live_graph(name: str, model: str, size: int, session: str) -> dict:
    """A live workflow's API twin on `model` (SD-Turbo or SDXL-Turbo with its TAESD) at size x size."""
    prompt = load_twin(name)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "TurboCheckpointLoader":
            inputs["ckpt_name"] = CHECKPOINTS[model]
        elif node["class_type"] == "VAELoader":
            inputs["vae_name"] = bench_models.TAESD_NAMES[model]
        elif node["class_type"] in ("TurboLiveInput", "EmptyLatentImage"):
            inputs.update(width=size, height=size)
        if node["class_type"] in ("TurboLiveInput", "TurboLiveOutput"):
            inputs["session"] = session
    return prompt


def stock_graph(live: dict, image_name: str | None) -> dict:
    """The same graph with stock I/O: LoadImage (an uploaded file) in, PreviewImage out."""
    prompt = copy.deepcopy(live)
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "TurboLiveInput":
            prompt[node_id] = {"class_type": "LoadImage", "inputs": {"image": image_name}}
        elif node["class_type"] == "TurboLiveOutput":
            prompt[node_id] = {"class_type": "PreviewImage", "inputs": {"images": node["inputs"]["images"]}}
    return prompt


def with_text(prompt: dict, text: str) -> dict:
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] in ("TurboTextEncode", "CLIPTextEncode"):
            node["inputs"]["text"] = text
    return prompt


def stock_text_encoder(prompt: dict) -> dict:
    """Stock has no prompt memo: core CLIP Text Encode instead of Turbo Text Encode."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "TurboTextEncode":
            node["class_type"] = "CLIPTextEncode"
    return prompt


def model_seconds(node_seconds: dict, prompt: dict) -> float:
    return sum(t for node, t in node_seconds.items() if prompt[node]["class_type"] not in LIVE_IO)


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"n": len(ordered), "median": statistics.median(ordered) if ordered else None,
            "p50": percentile(ordered, 50), "p95": percentile(ordered, 95)}


# --- stock: Run (Instant) -------------------------------------------------------------------------

class Stock:
    """Stock ComfyUI's web UI loop: each run uploads the newest frame (PNG) and queues when the last run ends.

    Its requests go over the same kept-alive HTTP connection as ours (live_client.Http), as a browser's would.
    """

    def __init__(self, host: ComfyHost):
        self.host, self.ws, self.http = host, host.connect(), Http(host.url)

    def close(self) -> None:
        self.ws.close()
        self.http.close()

    def upload(self, png: bytes, name: str) -> str:
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                "Content-Type: image/png\r\n\r\n").encode() + png + (
                f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'
                f"--{boundary}--\r\n").encode()
        status, answer = self.http.request("POST", "/upload/image", body, f"multipart/form-data; boundary={boundary}")
        if status != 200:
            raise RuntimeError(f"upload failed: HTTP {status} {answer[:300]!r}")
        return json.loads(answer)["name"]

    def run(self, prompt: dict) -> tuple[bytes, dict]:
        """Queue, wait, fetch the preview with /history and /view; (image bytes, node seconds)."""
        prompt_id = self.http.json("POST", "/prompt", {"prompt": prompt, "client_id": self.host.client_id})["prompt_id"]
        result = self.host.follow(self.ws, prompt_id, timeout=600, fetch_history=False)
        if result.status != "success":
            raise RuntimeError(f"stock run failed: {result.error}")
        while not (history := self.http.json("GET", f"/history/{prompt_id}")):   # execution_success comes first
            time.sleep(0.001)
        (entry,) = [img for output in history[prompt_id]["outputs"].values() for img in output.get("images", [])]
        status, data = self.http.request("GET", "/view?" + urllib.parse.urlencode(
            {k: entry[k] for k in ("filename", "subfolder", "type")}))
        return data, result.node_seconds()

    def frame(self, prompt: dict, camera: Camera, t: float, name: str) -> tuple[float, float]:
        """One webcam run: capture, PNG, upload, queue, wait, view. (seconds end to end, model seconds)."""
        start = time.perf_counter()
        png = encode(camera.capture(t), "PNG")
        graph = stock_graph(prompt, self.upload(png, name))
        _, seconds = self.run(graph)
        return time.perf_counter() - start, model_seconds(seconds, graph)


# --- the measurements -----------------------------------------------------------------------------

def transport(host: ComfyHost, frames: int, size: int) -> dict:
    camera = Camera(size)
    session = "bench-transport"
    graph = {"1": {"class_type": "TurboLiveInput", "inputs": {"session": session, "width": 0, "height": 0,
                                                               "source": "api"}},
             "2": {"class_type": "TurboLiveOutput", "inputs": {"images": ["1", 0], "session": session,
                                                               "format": "jpeg", "quality": 90}}}
    ours, stock_times, server = [], [], []
    stock = Stock(host)
    with LiveClient(host.url, session) as client:
        loop = LiveLoop(client, graph)
        for i in range(frames + 2):
            pixels = camera.capture(i / CAMERA_FPS)
            start = time.perf_counter()
            frame_id = loop.push_frame(encode(pixels, "JPEG"), captured_at=start)
            loop.pump(60, until=lambda: loop.outputs and loop.outputs[-1].frame_id == frame_id)
            if i >= 2:
                ours.append(time.perf_counter() - start)
                server.append(loop.outputs[-1].metadata["turbo_live"]["timings_ms"])
            start = time.perf_counter()
            png = encode(pixels, "PNG")
            stock.run(stock_graph(graph, stock.upload(png, f"bench-transport-{i}.png")))
            if i >= 2:
                stock_times.append(time.perf_counter() - start)
    stock.close()
    ours_ms, stock_ms = [t * 1000 for t in ours], [t * 1000 for t in stock_times]
    stages = {key: statistics.median(s[key] for s in server) for key in server[0]}
    return {"frames": frames, "size": size, "ours_ms": summary(ours_ms), "stock_ms": summary(stock_ms),
            "ratio": statistics.median(stock_ms) / statistics.median(ours_ms), "ours_server_stages_ms": stages}


def webcam_per_frame(host: ComfyHost, model: str, size: int, frames: int) -> dict:
    camera, session = Camera(size), f"bench-webcam-{model}"
    graph = live_graph("turbo_live_webcam", model, size, session)
    rows, stock_rows = [], []
    stock = Stock(host)
    with LiveClient(host.url, session) as client:
        loop = LiveLoop(client, graph)
        for i in range(frames + 2):                     # two warm-up frames each (models load, compile)
            t = i / CAMERA_FPS
            start = time.perf_counter()
            frame_id = loop.push_frame(encode(camera.capture(t), "JPEG"), captured_at=start)
            loop.pump(600, until=lambda: loop.outputs and loop.outputs[-1].frame_id == frame_id
                      and loop.in_flight is None)
            output = loop.outputs[-1]
            total = (output.shown_at - start) * 1000
            model_ms = model_seconds(loop.node_seconds(output.prompt_id), graph) * 1000
            if i >= 2:
                rows.append((total, model_ms, output.metadata["turbo_live"]["timings_ms"]))
            total_s, model_s = stock.frame(graph, camera, t, f"bench-webcam-{model}-{i}.png")
            if i >= 2:
                stock_rows.append((total_s * 1000, model_s * 1000))
    stock.close()
    overhead = [total - model for total, model, _ in rows]
    stock_overhead = [total - model for total, model in stock_rows]
    return {
        "model": model, "size": size, "frames": frames,
        "ours": {"total_ms": summary([r[0] for r in rows]), "model_ms": summary([r[1] for r in rows]),
                 "overhead_ms": summary(overhead),
                 "server_stages_ms": {k: statistics.median(r[2][k] for r in rows) for k in rows[0][2]}},
        "stock": {"total_ms": summary([r[0] for r in stock_rows]), "model_ms": summary([r[1] for r in stock_rows]),
                  "overhead_ms": summary(stock_overhead)},
        "overhead_ratio": statistics.median(stock_overhead) / statistics.median(overhead),
    }


def webcam_stream(host: ComfyHost, model: str, size: int, seconds: float, camera_fps: float = CAMERA_FPS,
                  rounds: int = 4) -> dict:
    """A camera at the graph's size (as both the panel, at Turbo Live Input's size, and stock's webcam node, at
    its width and height, capture it), for `seconds` a side, ours and stock alternating in rounds. The panel's
    fps cap is the camera's rate; a rate above the model's measures throughput."""
    camera, session = Camera(size), f"bench-stream-{model}"
    graph = live_graph("turbo_live_webcam", model, size, session)
    ours_shown, ours_latency, stock_shown, stock_latency = [], [], [], []
    counters, max_queue = {"received": 0, "used": 0, "dropped": 0, "sent": 0}, 0
    stock = Stock(host)
    stock.frame(graph, camera, 0.0, f"bench-stream-{model}.png")                 # warm
    for _ in range(rounds):
        with LiveClient(host.url, session) as client:
            begin = time.perf_counter()
            loop = LiveLoop(client, graph, camera=lambda: encode(camera.capture(time.perf_counter() - begin), "JPEG"),
                            fps_cap=camera_fps)
            loop.pump(seconds / rounds)
            loop.drain(600)
            for key, value in host.get_json(f"/comfy-turbo/live/{session}")["frames"].items():
                counters[key] += value
        max_queue = max(max_queue, loop.max_queue_remaining)
        ours_shown.append([o.shown_at for o in loop.outputs])
        ours_latency += [o.latency_ms for o in loop.outputs if o.latency_ms is not None]
        begin, shown = time.perf_counter(), []
        while time.perf_counter() - begin < seconds / rounds:
            captured = time.perf_counter()
            total, _ = stock.frame(graph, camera, captured - begin, f"bench-stream-{model}.png")
            shown.append(captured + total)
            stock_latency.append(total * 1000)
        stock_shown.append(shown)
    stock.close()

    def fps(rounds_shown: list[list[float]]) -> float:
        """Frames shown per second, over the spans between each round's first and last frame."""
        frames = sum(len(times) - 1 for times in rounds_shown if len(times) > 1)
        span = sum(times[-1] - times[0] for times in rounds_shown if len(times) > 1)
        return frames / span if span else 0.0

    return {"model": model, "size": size, "seconds": seconds, "rounds": rounds, "camera_fps": camera_fps,
            "ours": {"frames_shown": sum(map(len, ours_shown)), "fps": fps(ours_shown),
                     "latency_ms": summary(ours_latency), "server_frames": counters, "max_queue_remaining": max_queue},
            "stock": {"frames_shown": sum(map(len, stock_shown)), "fps": fps(stock_shown),
                      "latency_ms": summary(stock_latency)}}


def typing(host: ComfyHost, model: str, size: int, sentence: str = SENTENCE) -> dict:
    """Edit-to-pixels while typing `sentence` at TYPING_CPS, ours and stock."""
    session = f"bench-typing-{model}"
    base = live_graph("turbo_live_txt2img", model, size, session)
    tag = f" [{time.time_ns() % 100000}]"              # new to the prompt memo and to ComfyUI's cache

    def text(chars: int) -> str:
        return sentence[:chars] + tag

    def typed(prompt: dict) -> int:
        return next(len(n["inputs"]["text"]) - len(tag) for n in prompt.values() if "text" in n["inputs"])

    with LiveClient(host.url, session) as client:
        loop = LiveLoop(client, with_text(base, text(0)))
        loop.pump(600, until=lambda: loop.outputs and loop.in_flight is None)     # warm
        warm = len(loop.outputs)
        keystrokes = []
        begin = time.perf_counter()
        for chars in range(1, len(sentence) + 1):
            loop.pump(max(0.0, begin + chars / TYPING_CPS - time.perf_counter()))
            keystrokes.append(time.perf_counter())
            loop.edit(with_text(base, text(chars)), edited_at=keystrokes[-1])
        loop.drain(600)
        shown = [(o.shown_at, typed(loop.submitted[o.prompt_id])) for o in loop.outputs[warm:]]
        queued = len(loop.prompts) - warm
    ours = edit_to_pixels(keystrokes, shown)
    ours["prompts"] = queued

    stock = Stock(host)
    graph = stock_text_encoder(stock_graph(base, None))
    stock.run(with_text(graph, text(0) + " stock"))                          # warm
    shown, runs = [], 0
    begin = time.perf_counter()
    while True:                                  # the same typing, as keystrokes at the same times
        chars = min(len(sentence), int((time.perf_counter() - begin) * TYPING_CPS))
        stock.run(with_text(graph, text(chars) + " stock"))                  # Run (Instant): the current text
        runs += 1
        shown.append((time.perf_counter(), chars))
        if chars == len(sentence):
            break
    stock.close()
    keystrokes = [begin + (c + 1) / TYPING_CPS for c in range(len(sentence))]
    result = edit_to_pixels(keystrokes, shown)
    result["prompts"] = runs
    return {"model": model, "size": size, "characters": len(sentence), "chars_per_second": TYPING_CPS,
            "ours": ours, "stock": result}


def edit_to_pixels(keystrokes: list[float], shown: list[tuple[float, int]]) -> dict:
    """Per keystroke k (1-based): the first picture shown after it that includes it."""
    latencies = []
    for k, at in enumerate(keystrokes, start=1):
        later = [t for t, chars in shown if chars >= k and t >= at]
        if later:
            latencies.append((min(later) - at) * 1000)
    return {"keystrokes": len(keystrokes), "latency_ms": summary(latencies)}


# --- running and reporting ------------------------------------------------------------------------

def start_host(base: Path, device: str, model_set: str, families: list[str]) -> ComfyHost:
    models = bench_models.ensure(model_set, families, str(default_comfyui_path()))
    front = base / "no-frontend"
    front.mkdir(parents=True, exist_ok=True)
    host = ComfyHost(base, cpu=device == "cpu", extra_args=("--front-end-root", str(front)))
    for family in families:
        host.install_model(models / "checkpoints" / bench_models.MODEL_SETS[model_set][family], "checkpoints",
                           CHECKPOINTS[family])
        taesd = bench_models.TAESD_NAMES[family]
        for part in ("encoder", "decoder"):
            host.install_model(models / "vae_approx" / f"{taesd}_{part}.safetensors", "vae_approx")
    return host.start()


def render(results: dict) -> str:
    """The markdown of one results file (also the figures in docs/live.md)."""
    r = results
    t = r["transport"]
    lines = [f"**{r['device_name']}** ({r['device']}, {r['models']} models, ComfyUI {r['comfyui_version']}, "
             f"torch {r['torch']}, {r['threads']} torch threads; `{r['command'].strip()}`, {r['date'][:10]}, commit "
             f"{r['commit']})", "",
             f"| measured ({t['size']}x{t['size']} frames unless noted) | ours (Turbo Live) | stock's best "
             "equivalent | stock / ours |", "|---|---|---|---|",
             f"| transport, no model: frame in to picture out, median of {t['frames']} | "
             f"{t['ours_ms']['median']:.1f} ms | {t['stock_ms']['median']:.1f} ms | {t['ratio']:.1f}x |"]
    for w in r["webcam"]:
        lines += [
            f"| webcam img2img ({w['model']}, {w['size']}x{w['size']}): capture to display, median of {w['frames']} | "
            f"{w['ours']['total_ms']['median']:.0f} ms | {w['stock']['total_ms']['median']:.0f} ms | "
            f"{w['stock']['total_ms']['median'] / w['ours']['total_ms']['median']:.2f}x |",
            f"| … of which the model (TAESD encode, 1 step, TAESD decode) | {w['ours']['model_ms']['median']:.0f} ms | "
            f"{w['stock']['model_ms']['median']:.0f} ms | |",
            f"| … **per-frame overhead outside the model** | **{w['ours']['overhead_ms']['median']:.1f} ms** | "
            f"{w['stock']['overhead_ms']['median']:.1f} ms | **{w['overhead_ratio']:.1f}x** |"]
    for s in r["stream"]:
        o, st = s["ours"], s["stock"]
        lines += [
            f"| webcam streaming ({s['model']}, {s['size']}x{s['size']}, {s['camera_fps']:.0f} fps camera, "
            f"{s['seconds']:.0f} s): sustained fps | "
            f"{o['fps']:.2f} | {st['fps']:.2f} | |",
            f"| … capture to display p50 / p95 | {o['latency_ms']['p50']:.0f} / {o['latency_ms']['p95']:.0f} ms | "
            f"{st['latency_ms']['p50']:.0f} / {st['latency_ms']['p95']:.0f} ms | |",
            f"| … frames dropped (newest wins) / shown | {o['server_frames']['dropped']} / {o['frames_shown']} | "
            f"– / {st['frames_shown']} (serial) | |"]
    for ty in r["typing"]:
        o, st = ty["ours"], ty["stock"]
        lines += [f"| prompt-as-you-type ({ty['model']} at {ty['size']}x{ty['size']}, {ty['chars_per_second']:.0f} "
                  f"characters/s): edit to pixels p50 / p95 | {o['latency_ms']['p50']:.0f} / "
                  f"{o['latency_ms']['p95']:.0f} ms | {st['latency_ms']['p50']:.0f} / {st['latency_ms']['p95']:.0f} ms "
                  f"| {st['latency_ms']['p50'] / o['latency_ms']['p50']:.2f}x |",
                  f"| … prompts queued for {ty['characters']} keystrokes (Run (Instant) also re-queues an unchanged "
                  f"graph, which ComfyUI's cache answers at once) | {o['prompts']} | {st['prompts']} | |"]
    lines += ["", "| target (issue #10) | measured | status |", "|---|---|---|"] + targets(r)
    lines += ["", "Our server-side stages, median ms (`timings_ms` of the output metadata): transport "
              + ", ".join(f"{k} {v:.1f}" for k, v in t["ours_server_stages_ms"].items())]
    for w in r["webcam"]:
        lines[-1] += f"; webcam {w['model']} " + ", ".join(f"{k} {v:.1f}" for k, v in w["ours"]["server_stages_ms"].items())
    lines[-1] += "."
    return "\n".join(lines)


def targets(r: dict) -> list[str]:
    """The issue's targets for this device, each against what was measured."""
    def row(target: str, measured: str, met: bool) -> str:
        return f"| {target} | {measured} | {'met' if met else '**missed**'} |"
    if r["device"] == "cpu":
        rows = []
        for w in r["webcam"]:
            overhead = w["ours"]["overhead_ms"]["median"]
            rows += [row(f"CPU, {w['size']}x{w['size']} frames: per-frame overhead outside the model ≤ 15 ms median",
                         f"{overhead:.1f} ms ({w['model']})", overhead <= 15),
                     row("CPU: that overhead ≥ 3x below the stock path in the same run",
                         f"{w['overhead_ratio']:.1f}x", w["overhead_ratio"] >= 3)]
        return rows
    rows = []
    for s in r["stream"]:
        goal = 100 if s["model"] == "sd-turbo" else 40
        rows.append(row(f"GPU: {s['model']} webcam img2img ≥ {goal} fps", f"{s['ours']['fps']:.1f} fps "
                        f"({s['camera_fps']:.0f} fps camera)", s["ours"]["fps"] >= goal))
    for ty in r["typing"]:
        p50 = ty["ours"]["latency_ms"]["p50"]
        rows.append(row("GPU: prompt edit to pixels p50 ≤ 50 ms", f"{p50:.0f} ms ({ty['model']})", p50 <= 50))
    return rows


def results_path(results: dict) -> Path:
    return RESULTS / f"{results['device']}-{slug(results['device_name'])}.json"


def page_section() -> str:
    """The figures of docs/live.md: every committed results file, rendered."""
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        return "No live benchmark results are committed yet."
    return "\n\n".join(render(json.loads(f.read_text())) for f in files)


def update_page(page: Path = PAGE) -> None:
    report.replace_section(page, PAGE_START, PAGE_END, page_section())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", choices=sorted(bench_models.MODEL_SETS), help="default: tiny on cpu, full on cuda")
    parser.add_argument("--size", type=int, default=512, help="frame and graph size of the transport and per-frame "
                                                                 "measurements (default 512)")
    parser.add_argument("--model-size", type=int, help="frame and graph size when streaming and typing (default: "
                                                        "--size on cuda, 128 on cpu, where a tiny model at 512 takes "
                                                        "seconds a frame)")
    parser.add_argument("--frames", type=int, default=12, help="frames one at a time, per measurement (default 12)")
    parser.add_argument("--seconds", type=float, default=20.0, help="streaming time per side (default 20)")
    parser.add_argument("--camera-fps", type=float, default=CAMERA_FPS,
                        help="the streaming camera's frame rate (default 30; e.g. 1000 to measure throughput)")
    parser.add_argument("--webcam-models", nargs="+", choices=sorted(CHECKPOINTS),
                        help="default: sd-turbo on cpu, both on cuda")
    parser.add_argument("--typing-model", choices=sorted(CHECKPOINTS), default="sdxl-turbo")
    parser.add_argument("--typing-text", default=SENTENCE, help=f"what is typed (default {SENTENCE!r})")
    parser.add_argument("--threads", type=int, help="torch threads of the server (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/live/<device>-<model>.json)")
    parser.add_argument("--page", type=Path, metavar="PAGE",
                        help="only re-render bench/results/live/*.md and the figures in this docs page "
                             "(docs/live.md) from the results JSON")
    args = parser.parse_args(argv)
    if args.page:
        for path in RESULTS.glob("*.json"):
            path.with_suffix(".md").write_text(MD_HEADER + render(json.loads(path.read_text())) + "\n")
        update_page(args.page)
        print("updated", args.page)
        return 0
    model_set = args.models or ("tiny" if args.device == "cpu" else "full")
    model_size = args.model_size or (128 if args.device == "cpu" else args.size)
    webcam_models = args.webcam_models or (["sd-turbo"] if args.device == "cpu" else ["sd-turbo", "sdxl-turbo"])
    families = sorted(set(webcam_models) | {args.typing_model})
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)      # read by the server's torch at start
    import torch
    results = {"device": args.device, "device_name": device_name(args.device), "models": model_set,
               "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": git_commit(), "command": "bash bench/live.sh " + " ".join(argv or sys.argv[1:]),
               "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="comfy-turbo-live-bench-") as base:
        host = start_host(Path(base), args.device, model_set, families)
        try:
            results["comfyui_version"] = host.get_json("/system_stats")["system"]["comfyui_version"]
            print("transport ...", flush=True)
            results["transport"] = transport(host, args.frames * 2, args.size)
            results["webcam"], results["stream"] = [], []
            for model in webcam_models:
                print(f"webcam {model}: per frame ...", flush=True)
                results["webcam"].append(webcam_per_frame(host, model, args.size, args.frames))
                print(f"webcam {model}: streaming ...", flush=True)
                results["stream"].append(webcam_stream(host, model, model_size, args.seconds, args.camera_fps))
            print(f"typing {args.typing_model} ...", flush=True)
            results["typing"] = [typing(host, args.typing_model, model_size, args.typing_text)]
        finally:
            host.stop()
    out = args.out or results_path(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(MD_HEADER + render(results) + "\n")
    print(render(results))
    print("wrote", out)
    if args.out is None:                  # a committed results file: its page follows at once
        update_page()
        print("updated", PAGE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
