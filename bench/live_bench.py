#!/usr/bin/env python3
"""Three live loops through a real ComfyUI server, side by side in one run: ours now, ours before, and stock.

    bash bench/live.sh                                  # CPU: tiny checkpoints, 512x512 frames
    bash bench/live.sh --device cuda --models full      # GPU: full-size SD-Turbo and SDXL-Turbo
    python bench/live_bench.py --page docs/live.md            # only re-render the figures in docs/live.md

The loops (``LOOPS``), each in its own session, taking turns frame by frame (the order rotating) or round
by round:

* **server** (protocol 2, what the Turbo Live panel does now; ``live_client.ServerLoop``): the graph is
  handed over once on the pack's websocket, JPEG frames follow on it, and the server queues each run
  itself (one executing, one waiting, the newest input wins); pictures come back as JPEG in ComfyUI's
  binary message type 4.
* **browser-driven** (protocol 1, the panel's previous loop; ``live_client.LiveLoop``): the same frames
  and pictures, but the client POSTs ``/prompt`` for every run itself, one at a time.
* **stock**, stock ComfyUI's best equivalent, what its web UI offers: Run (Instant) re-queues the graph
  each time the queue empties (strictly one after another, no frame dropping), the core webcam node
  uploads every frame as a PNG (``/upload/image``) for ``LoadImage``, and the picture comes back through
  ``PreviewImage`` (a PNG in temp/) and ``/view``.

Every loop encodes its frame in the client as the browser would (JPEG, or PNG for stock's webcam node),
and that counts. Between turns the bench waits out the server's housekeeping after a run (``settle``:
ComfyUI's gc.collect()), so that it lands in no other loop's turn; what a loop's own runs cause counts.
Measured:

1. **transport**: frames with no model at all (Turbo Live Input -> Output against LoadImage ->
   PreviewImage), ``--size`` (512) square, one at a time: frame in to picture out, and the server loop's
   stages (``turbo_live.timings_ms`` of the output metadata).
2. **webcam, per frame** (``turbo_live_webcam``: TAESD encode, 1 step, TAESD decode), one frame at a time:
   capture to display, the model's share (the model nodes' time from ComfyUI's ``executing`` messages),
   and the rest, the per-frame overhead outside the model.
3. **webcam, streaming**: a camera at ``--camera-fps`` (30) for ``--seconds`` a loop, in rounds, with a
   model slower than the camera, so a frame is always there when a run ends: sustained fps, capture to display, and how much
   of the wall time the model was busy (the runs' model time, ``timings.graph`` for ours and the
   ``executing`` messages for stock, over the span from the first picture to the last). The per-frame
   overhead outside the model is, for ours, ``timings.between`` (from a run's output node to the next
   run's model start: the loop's own time per frame; ``timings.gc`` says how much of it was Python's
   garbage collector), and, for all three, the gaps: the time between two pictures less the model time of
   the run that made the second. The tail: of the slowest 5% of betweens, the share that was GC.
4. **prompt-as-you-type** (``turbo_live_txt2img``): a sentence typed at 8 characters a second;
   edit-to-pixels p50/p95, from each keystroke to the first picture that includes it (the server loop
   sends each edit as ``set`` values; the browser-driven one queues the edited graph when the last run ends).

Then the targets (issue #18's, ``targets``): on the CPU the per-frame overhead outside the model is the
server loop's streaming ``timings.between``, one at a time beside it.

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
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
from comfy_host import ComfyHost, default_comfyui_path  # noqa: E402
from live_client import (Http, LiveClient, LiveLoop, ServerLoop, passthrough_graph as passthrough,  # noqa: E402
                         percentile)

import models as bench_models  # noqa: E402
import report  # noqa: E402
from run import device_name, git_commit, slug  # noqa: E402

PAGE = REPO / "docs" / "live.md"
PAGE_START, PAGE_END = "<!-- live-figures:start -->", "<!-- live-figures:end -->"
MD_HEADER = "# Turbo Live benchmark\n\nWritten by `bench/live.sh` (bench/live_bench.py explains the method).\n\n"
RESULTS = REPO / "bench" / "results" / "live"      # apart from bench/run.py's results in bench/results/
SCHEMA = 2                                         # 2: three loops (server, browser-driven, stock)
WORKFLOWS = REPO / "workflows" / "api"
SENTENCE = "a red fox in fresh snow, golden hour"
TYPING_CPS = 8.0                 # characters per second
CAMERA_FPS = 30.0
LOOPS = ("server", "browser_driven", "stock")
LABELS = {"server": "server loop (ours now)", "browser_driven": "browser-driven (ours before)",
          "stock": "stock's best equivalent"}
OURS = LOOPS[:2]
LIVE_IO = {"TurboLiveInput", "TurboLiveOutput", "LoadImage", "PreviewImage"}
STREAM_STAGES = ("between", "gc")   # timings that mean something only in a stream (one at a time, loops take turns)
CHECKPOINTS = {"sd-turbo": "sd_turbo.safetensors", "sdxl-turbo": "sd_xl_turbo_1.0_fp16.safetensors"}
TAIL = 0.05                      # the slowest share of betweens looked into


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


# --- our two loops --------------------------------------------------------------------------------

class ServerLoopWithSets(ServerLoop):
    """ServerLoop that also notes, for each ``set`` answered, the run that holds those values (its prompt id),
    so that a picture can tell which keystrokes it includes."""

    def __post_init__(self):
        self.set_runs: list[str | None] = []          # one per set, in the order sent (answered in order)
        super().__post_init__()

    def _handle_live(self, reply: dict, at: float) -> None:
        if reply.get("type") == "set":
            self.set_runs.append(reply.get("prompt_id"))
        super()._handle_live(reply, at)


def our_loop(kind: str, client: LiveClient, prompt: dict, **camera) -> ServerLoop | LiveLoop:
    return (ServerLoopWithSets if kind == "server" else LiveLoop)(client, prompt, **camera)


def session_of(name: str, kind: str) -> str:
    return f"bench-{name}-{kind.replace('_', '-')}"


def pump_until(loop, condition, timeout: float = 600.0) -> None:
    deadline = time.perf_counter() + timeout
    errors_before = len(loop.errors)
    while not condition():
        if len(loop.errors) > errors_before:      # a graph the server refuses fails the same way each frame
            raise RuntimeError(f"the live loop's graph failed: {loop.errors[errors_before:][-3:]}")
        if loop.closed:
            raise RuntimeError(f"the live loop's connection closed; errors: {loop.errors[-3:]}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the live loop did not deliver in {timeout:.0f}s; errors: {loop.errors[-3:]}")
        loop.pump(deadline - time.perf_counter(), until=condition)


def our_frame(loop, camera: "Camera", t: float, prompt: dict) -> tuple[float, float, dict]:
    """One frame, one at a time: capture, JPEG, send, wait for its picture; then (untimed) the run's end.
    (seconds capture to display, model seconds, the output's timings_ms)."""
    start = time.perf_counter()
    frame_id = loop.push_frame(encode(camera.capture(t), "JPEG"), captured_at=start)
    pump_until(loop, lambda: loop.outputs and loop.outputs[-1].frame_id == frame_id)
    output = loop.outputs[-1]
    loop.drain(600)                   # the next loop's turn starts on an idle server
    model = model_seconds(loop.node_seconds(output.prompt_id), prompt)
    return output.shown_at - start, model, output.metadata["turbo_live"]["timings_ms"]


class Keepalive:
    """While one loop has its turn, a thread keeps the idle loops reading their websockets, so that they answer
    the live socket's heartbeat pings (the server drops a client that leaves one unanswered for 5 s, as a
    browser never does); the main thread leaves those loops alone meanwhile."""

    def __init__(self, loops: list):
        self.loops, self.stop = loops, threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while not self.stop.is_set():
            for loop in self.loops:
                loop.pump(0.05)

    def __enter__(self) -> "Keepalive":
        if self.loops:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.loops:
            self.thread.join()


def settle(host: ComfyHost) -> None:
    """Untimed, after each turn: wait out the server's housekeeping after a run, so that it does not fall into
    the next loop's turn. ComfyUI's prompt worker runs gc.collect() after a prompt (at most every 10 s, so
    after every one of the per-frame webcam's), holding the GIL; a request through the server's event loop
    is answered only once that is over."""
    time.sleep(0.05)
    host.get_json("/queue")


def stage_medians(timings: list[dict]) -> dict:
    keys = dict.fromkeys(k for t in timings for k in t if k not in STREAM_STAGES)
    return {k: statistics.median(t[k] for t in timings if k in t) for k in keys}


def turns(i: int) -> tuple[str, ...]:
    """The loops' order for turn i: rotating, so that none always follows the same one."""
    return LOOPS[i % len(LOOPS):] + LOOPS[:i % len(LOOPS)]


# --- the measurements -----------------------------------------------------------------------------

def one_at_a_time(host: ComfyHost, name: str, graph_of, size: int, frames: int, warm: int) -> dict:
    """`frames` frames (after `warm` each) one at a time through the three loops, taking turns frame by frame.
    Per loop: capture to display, model and the rest (ms), and for ours the output's timings."""
    camera = Camera(size)
    graphs = {kind: graph_of(session_of(name, kind)) for kind in LOOPS}
    rows = {kind: [] for kind in LOOPS}
    stock = Stock(host)
    clients = {kind: LiveClient(host.url, session_of(name, kind)).connect() for kind in OURS}
    try:
        loops = {kind: our_loop(kind, clients[kind], graphs[kind]) for kind in OURS}
        for i in range(warm + frames):
            t = i / CAMERA_FPS
            for kind in turns(i):
                with Keepalive([loop for other, loop in loops.items() if other != kind]):
                    if kind == "stock":
                        total, model = stock.frame(graphs["stock"], camera, t, f"bench-{name}-{i}.png")
                        timings = {}
                    else:
                        total, model, timings = our_frame(loops[kind], camera, t, graphs[kind])
                    settle(host)
                if i >= warm:
                    rows[kind].append((total * 1000, model * 1000, timings))
        for kind, loop in loops.items():
            if loop.errors:
                raise RuntimeError(f"{kind} loop: {loop.errors[-3:]}")
    finally:
        stock.close()
        for client in clients.values():
            client.close()
    figures = {}
    for kind in LOOPS:
        figures[kind] = {"total_ms": summary([r[0] for r in rows[kind]]), "model_ms": summary([r[1] for r in rows[kind]]),
                         "overhead_ms": summary([r[0] - r[1] for r in rows[kind]])}
        if kind in OURS:
            figures[kind]["stages_ms"] = stage_medians([r[2] for r in rows[kind]])
    return figures


def transport(host: ComfyHost, frames: int, size: int) -> dict:
    figures = one_at_a_time(host, "transport", passthrough, size, frames, warm=2)
    return {"frames": frames, "size": size, **figures}


def webcam_per_frame(host: ComfyHost, model: str, size: int, frames: int) -> dict:
    """The webcam twin one frame at a time (after one warm-up frame a loop: the models are loaded once)."""
    figures = one_at_a_time(host, f"webcam-{model}",
                            lambda session: live_graph("turbo_live_webcam", model, size, session), size, frames, warm=1)
    return {"model": model, "size": size, "frames": frames, **figures}


@dataclass
class Shown:
    """A picture of a stream: when it was shown, and what its run spent (ms)."""
    at: float
    model_ms: float
    latency_ms: float | None
    between_ms: float | None = None
    gc_ms: float | None = None


def our_round(host: ComfyHost, kind: str, graph: dict, camera: "Camera", seconds: float,
              camera_fps: float) -> tuple[list[Shown], dict, int]:
    """One streaming round of one of our loops, on a new session (so its first run has no between):
    the pictures, the server's frame counters, the most prompts ComfyUI's queue held."""
    session = graph_session(graph)
    with LiveClient(host.url, session) as client:
        begin = time.perf_counter()
        loop = our_loop(kind, client, graph, camera=lambda: encode(camera.capture(time.perf_counter() - begin), "JPEG"),
                        fps_cap=camera_fps)
        loop.pump(seconds)
        loop.drain(600)
        counters = host.get_json(f"/comfy-turbo/live/{session}")["frames"]
    if loop.errors:
        raise RuntimeError(f"{kind} loop: {loop.errors[-3:]}")
    shown = []
    for output in loop.outputs:
        timings = output.metadata["turbo_live"]["timings_ms"]
        model = timings.get("graph")
        if model is None:                          # no fresh frame: the executing messages
            model = model_seconds(loop.node_seconds(output.prompt_id), graph) * 1000
        shown.append(Shown(output.shown_at, model, output.latency_ms, timings.get("between"), timings.get("gc")))
    return shown, counters, loop.max_queue_remaining


def stock_round(stock: "Stock", graph: dict, camera: "Camera", seconds: float, name: str) -> list[Shown]:
    """Stock's webcam node under Run (Instant): frame after frame, each captured when the last one is shown
    (two at least, a cycle, as our rounds end with the frame waiting)."""
    begin, shown = time.perf_counter(), []
    while time.perf_counter() - begin < seconds or len(shown) < 2:
        captured = time.perf_counter()
        total, model = stock.frame(graph, camera, captured - begin, name)
        shown.append(Shown(captured + total, model * 1000, total * 1000))
    return shown


def stream_figures(rounds: list[list[Shown]]) -> dict:
    """fps, the model's busy share and the overhead from the gaps, over each round's span from its first
    picture to its last (so over the runs of its second picture on: their whole cycle lies in the span)."""
    spans = [(r[-1].at - r[0].at) * 1000 for r in rounds if len(r) > 1]
    cycles = [(b.at - a.at) * 1000 for r in rounds for a, b in zip(r, r[1:])]
    later = [s for r in rounds for s in r[1:]]
    span, model = sum(spans), sum(s.model_ms for s in later)
    return {"frames_shown": sum(map(len, rounds)), "fps": len(later) / span * 1000 if span else 0.0,
            "model_ms": summary([s.model_ms for s in later]), "busy": model / span if span else None,
            "gap_overhead_ms": {"mean": (span - model) / len(later) if later else None,
                                **summary([c - s.model_ms for c, s in zip(cycles, later)])},
            "latency_ms": summary([s.latency_ms for r in rounds for s in r if s.latency_ms is not None]),
            "pictures": [[i, *(None if v is None else round(v, 1)
                               for v in (shown.model_ms, shown.between_ms, shown.gc_ms, shown.latency_ms))]
                         for i, r in enumerate(rounds) for shown in r]}    # round, model, between, gc, latency (ms)


def between_figures(rounds: list[list[Shown]]) -> dict:
    """The server-side per-frame time outside the model (timings.between) and where its tail comes from:
    of the slowest TAIL share of betweens, how much was garbage collection (timings.gc)."""
    pairs = [(s.between_ms, s.gc_ms or 0.0) for r in rounds for s in r if s.between_ms is not None]
    slowest = sorted(pairs, reverse=True)[:max(1, math.ceil(len(pairs) * TAIL))] if pairs else []
    slow_between, slow_gc = sum(b for b, _ in slowest), sum(g for _, g in slowest)
    return {"between_ms": summary([b for b, _ in pairs]), "gc_ms": summary([g for _, g in pairs]),
            "without_gc_ms": summary([b - g for b, g in pairs]),
            "tail": {"frames": len(slowest), "of": len(pairs),
                     "between_ms": slow_between / len(slowest) if slowest else None,
                     "gc_ms": slow_gc / len(slowest) if slowest else None,
                     "gc_share": slow_gc / slow_between if slow_between else None}}


def webcam_stream(host: ComfyHost, model: str, size: int, seconds: float, camera_fps: float = CAMERA_FPS,
                  rounds: int = 4, loops: tuple = LOOPS, edit=None) -> dict:
    """A camera at the graph's size (as both the panel, at Turbo Live Input's size, and stock's webcam node, at
    its width and height, capture it), for `seconds` a loop, the three taking turns in `rounds`. Our loops
    read the camera just in time, as the panel does (a frame captured shortly before the running run ends),
    at most `camera_fps` times a second; stock captures when its last picture is shown.
    `loops`: which of LOOPS to run; `edit`: a function that changes each loop's graph (Turbo Fast Path
    inserted by `with_fast_path`, say)."""
    camera = Camera(size)
    tag = f"-{edit.tag}" if getattr(edit, "tag", "") else ""
    edit = edit or (lambda prompt: prompt)
    graphs = {kind: edit(live_graph("turbo_live_webcam", model, size, session_of(f"stream-{model}{tag}", kind)))
              for kind in loops}
    ours = tuple(kind for kind in OURS if kind in loops)
    shown = {kind: [] for kind in loops}
    counters = {kind: {"received": 0, "used": 0, "dropped": 0, "sent": 0} for kind in ours}
    max_queue = dict.fromkeys(ours, 0)
    stock = Stock(host)
    try:
        if "stock" in loops:
            stock.frame(graphs["stock"], camera, 0.0, f"bench-stream-{model}.png")             # warm
        for r in range(rounds):
            for kind in (k for k in turns(r) if k in loops):
                if kind == "stock":
                    shown[kind].append(stock_round(stock, graphs[kind], camera, seconds / rounds,
                                                   f"bench-stream-{model}.png"))
                    settle(host)
                    continue
                pictures, frames, queue = our_round(host, kind, graphs[kind], camera, seconds / rounds, camera_fps)
                settle(host)
                shown[kind].append(pictures)
                for key, value in frames.items():
                    if key in counters[kind]:
                        counters[kind][key] += value
                max_queue[kind] = max(max_queue[kind], queue)
    finally:
        stock.close()
    figures = {kind: stream_figures(shown[kind]) for kind in loops}
    for kind in ours:
        figures[kind].update(between_figures(shown[kind]), server_frames=counters[kind],
                             max_queue_remaining=max_queue[kind])
    return {"model": model, "size": size, "seconds": seconds, "rounds": rounds, "camera_fps": camera_fps, **figures}


def with_fast_path(options: dict, tag: str = "fast"):
    """An `edit` for webcam_stream: Turbo Fast Path (`options`: its inputs) between the checkpoint loader and
    everything that takes its MODEL."""
    def edit(prompt: dict) -> dict:
        prompt = copy.deepcopy(prompt)
        (loader,) = [n for n, node in prompt.items() if node["class_type"] == "TurboCheckpointLoader"]
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if value == [loader, 0]:
                    node["inputs"][name] = ["fast", 0]
        prompt["fast"] = {"class_type": "TurboFastPath", "inputs": {"model": [loader, 0], **options}}
        return prompt
    edit.tag = tag
    return edit


def graph_session(prompt: dict) -> str:
    return next(n["inputs"]["session"] for n in prompt.values() if n["class_type"] == "TurboLiveOutput")


def typing(host: ComfyHost, model: str, size: int, sentence: str = SENTENCE) -> dict:
    """Edit-to-pixels while typing `sentence` at TYPING_CPS, in each loop in turn (the same keystroke times
    after a warm-up picture). Each loop's text carries its own tag, new to the prompt memo and to ComfyUI's
    cache, so no loop reuses another's work."""
    stamp = time.time_ns() % 100000
    figures = {}
    for kind in LOOPS:
        tag = f" [{stamp} {kind}]"
        base = live_graph("turbo_live_txt2img", model, size, session_of(f"typing-{model}", kind))
        if kind == "stock":
            base = stock_text_encoder(stock_graph(base, None))
        figures[kind] = (stock_typing if kind == "stock" else our_typing)(host, kind, base, sentence, tag)
        settle(host)
    return {"model": model, "size": size, "characters": len(sentence), "chars_per_second": TYPING_CPS, **figures}


def our_typing(host: ComfyHost, kind: str, base: dict, sentence: str, tag: str) -> dict:
    def text(chars: int) -> str:
        return sentence[:chars] + tag

    with LiveClient(host.url, graph_session(base)) as client:
        loop = our_loop(kind, client, with_text(base, text(0)))
        pump_until(loop, lambda: loop.outputs and loop.in_flight is None)                  # warm
        warm_outputs, warm_runs = len(loop.outputs), len(loop.prompts)
        keystrokes = []
        begin = time.perf_counter()
        for chars in range(1, len(sentence) + 1):
            loop.pump(max(0.0, begin + chars / TYPING_CPS - time.perf_counter()))
            keystrokes.append(time.perf_counter())
            loop.edit(with_text(base, text(chars)), edited_at=keystrokes[-1])
        loop.drain(600)
    if loop.errors or getattr(loop, "refusals", None):
        raise RuntimeError(f"{kind} loop: {(loop.errors + getattr(loop, 'refusals', []))[-3:]}")
    if kind == "server":
        # The k-th set's answer names the run that holds keystroke k; a run holds every keystroke that an
        # earlier run held too.
        chars_of = {}
        for chars, run in enumerate(loop.set_runs, start=1):
            chars_of[run] = max(chars_of.get(run, 0), chars)
        typed, newest = {}, 0
        for run in loop.prompts:
            newest = typed[run] = max(newest, chars_of.get(run, 0))
    else:
        typed = {p: len(next(n["inputs"]["text"] for n in g.values() if "text" in n["inputs"])) - len(tag)
                 for p, g in loop.submitted.items()}
    shown = [(o.shown_at, typed[o.prompt_id]) for o in loop.outputs[warm_outputs:]]
    result = edit_to_pixels(keystrokes, shown)
    result["prompts"] = sum(1 for p in loop.prompts[warm_runs:] if p in loop.executed)     # runs that ran
    result["queued"] = len(loop.prompts) - warm_runs
    return result


def stock_typing(host: ComfyHost, kind: str, graph: dict, sentence: str, tag: str) -> dict:
    stock = Stock(host)
    try:
        stock.run(with_text(graph, tag))                          # warm
        shown, runs = [], 0
        begin = time.perf_counter()
        while True:                                  # the same typing, as keystrokes at the same times
            chars = min(len(sentence), int((time.perf_counter() - begin) * TYPING_CPS))
            stock.run(with_text(graph, sentence[:chars] + tag))           # Run (Instant): the current text
            runs += 1
            shown.append((time.perf_counter(), chars))
            if chars == len(sentence):
                break
    finally:
        stock.close()
    keystrokes = [begin + (c + 1) / TYPING_CPS for c in range(len(sentence))]
    result = edit_to_pixels(keystrokes, shown)
    result["prompts"] = result["queued"] = runs
    return result


def edit_to_pixels(keystrokes: list[float], shown: list[tuple[float, int]]) -> dict:
    """Per keystroke k (1-based): the first picture shown after it that includes it."""
    latencies = []
    for k, at in enumerate(keystrokes, start=1):
        later = [t for t, chars in shown if chars >= k and t >= at]
        if later:
            latencies.append((min(later) - at) * 1000)
    return {"keystrokes": len(keystrokes), "latency_ms": summary(latencies)}


# --- running and reporting ------------------------------------------------------------------------

def make_host(base: Path, device: str, model_set: str, families: list[str], extra_args: tuple = ()) -> ComfyHost:
    """A ComfyUI server (not started yet) with the bench's checkpoints and TAESD installed under the names the
    workflows use, and no frontend (``--front-end-root`` on an empty folder: the API and websockets only)."""
    models = bench_models.ensure(model_set, families, str(default_comfyui_path()))
    front = base / "no-frontend"
    front.mkdir(parents=True, exist_ok=True)
    host = ComfyHost(base, cpu=device == "cpu", extra_args=("--front-end-root", str(front), *extra_args))
    for family in families:
        host.install_model(models / "checkpoints" / bench_models.MODEL_SETS[model_set][family], "checkpoints",
                           CHECKPOINTS[family])
        taesd = bench_models.TAESD_NAMES[family]
        for part in ("encoder", "decoder"):
            host.install_model(models / "vae_approx" / f"{taesd}_{part}.safetensors", "vae_approx")
    return host


def start_host(base: Path, device: str, model_set: str, families: list[str]) -> ComfyHost:
    return make_host(base, device, model_set, families).start()


def ms(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f} ms"


def pair(figures: dict, digits: int = 1, a: str = "median", b: str = "p95") -> str:
    """'median / p95 ms' of a summary."""
    if figures.get(a) is None:
        return "–"
    return f"{figures[a]:.{digits}f} / {figures[b]:.{digits}f} ms"


def row(label: str, cells: dict, ratio: str = "") -> str:
    return f"| {label} | " + " | ".join(cells.get(kind, "–") for kind in LOOPS) + f" | {ratio} |"


def share(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def render(results: dict) -> str:
    """The markdown of one results file (also the figures in docs/live.md)."""
    r = results
    if r.get("schema") != SCHEMA:
        raise ValueError(f"results of {r.get('date', '?')[:10]} predate the three-loop benchmark (schema {SCHEMA}): "
                         "run `bash bench/live.sh` again")
    t = r["transport"]
    lines = [f"**{r['device_name']}** ({r['device']}, {r['models']} models, ComfyUI {r['comfyui_version']}, "
             f"torch {r['torch']}, {r['threads']} torch threads; `{r['command'].strip()}`, {r['date'][:10]}, commit "
             f"{r['commit']})", "",
             f"| measured ({t['size']}x{t['size']} frames unless noted) | " + " | ".join(LABELS[k] for k in LOOPS)
             + " | stock / server |", "|---|---|---|---|---|",
             row(f"transport, no model: frame in to picture out, median / p95 of {t['frames']}",
                 {k: pair(t[k]["total_ms"]) for k in LOOPS},
                 f"{t['stock']['total_ms']['median'] / t['server']['total_ms']['median']:.1f}x")]
    for w in r["webcam"]:
        lines += [
            row(f"webcam img2img ({w['model']}, {w['size']}x{w['size']}), one frame at a time: capture to display, "
                f"median of {w['frames']}", {k: f"{w[k]['total_ms']['median']:.0f} ms" for k in LOOPS},
                f"{w['stock']['total_ms']['median'] / w['server']['total_ms']['median']:.2f}x"),
            row("… of which the model (TAESD encode, 1 step, TAESD decode)",
                {k: f"{w[k]['model_ms']['median']:.0f} ms" for k in LOOPS}),
            row("… per-frame overhead outside the model, median / p95", {k: pair(w[k]["overhead_ms"]) for k in LOOPS},
                f"{w['stock']['overhead_ms']['median'] / w['server']['overhead_ms']['median']:.1f}x")]
    for s in r["stream"]:
        tail = {k: s[k]["tail"] for k in OURS}
        lines += [
            row(f"webcam streaming ({s['model']}, {s['size']}x{s['size']}, {s['camera_fps']:.0f} fps camera, model "
                f"{s['server']['model_ms']['median']:.0f} ms a frame, {s['seconds']:.0f} s a loop): sustained fps",
                {k: f"{s[k]['fps']:.2f}" for k in LOOPS}),
            row("… the model busy (its time over the wall time)", {k: share(s[k]["busy"]) for k in LOOPS}),
            row("… **per-frame overhead outside the model**: `timings.between` (output node to the next run's model "
                "start), median / p95", {k: "**" + pair(s[k]["between_ms"]) + "**" for k in OURS}),
            row("… the same from the gaps (time between pictures less the model's): mean; median / p95",
                {k: f"{ms(s[k]['gap_overhead_ms']['mean'])}; {pair(s[k]['gap_overhead_ms'])}" for k in LOOPS}),
            row(f"… the slowest {TAIL * 100:.0f}% of betweens: mean, of which garbage collection",
                {k: f"{ms(v['between_ms'])}, GC {ms(v['gc_ms'])} ({share(v['gc_share'])}; {v['frames']} of {v['of']})"
                 for k, v in tail.items()}),
            row("… `timings.between` less its GC: median / p95", {k: pair(s[k]["without_gc_ms"]) for k in OURS}),
            row("… capture to display p50 / p95", {k: pair(s[k]["latency_ms"], 0, "p50") for k in LOOPS}),
            row("… frames dropped (newest wins) / shown",
                {**{k: f"{s[k]['server_frames']['dropped']} / {s[k]['frames_shown']}" for k in OURS},
                 "stock": f"– / {s['stock']['frames_shown']} (serial)"})]
    for ty in r["typing"]:
        lines += [
            row(f"prompt-as-you-type ({ty['model']} at {ty['size']}x{ty['size']}, {ty['chars_per_second']:.0f} "
                "characters/s): edit to pixels p50 / p95", {k: pair(ty[k]["latency_ms"], 0, "p50") for k in LOOPS},
                f"{ty['stock']['latency_ms']['p50'] / ty['server']['latency_ms']['p50']:.2f}x"),
            row(f"… runs for {ty['characters']} keystrokes (Run (Instant) also re-queues an unchanged graph, which "
                "ComfyUI's cache answers at once)", {k: str(ty[k]["prompts"]) for k in LOOPS})]
    lines += ["", "| target (issue #18) | measured | status |", "|---|---|---|"] + targets(r)
    lines += ["", "The server loop's stages, median ms (`timings_ms` of the output metadata, one frame at a time): "
              "transport " + stages(t["server"]["stages_ms"])]
    for w in r["webcam"]:
        lines[-1] += f"; webcam {w['model']} " + stages(w["server"]["stages_ms"])
    lines[-1] += "."
    return "\n".join(lines)


def stages(medians: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in medians.items())


def targets(r: dict) -> list[str]:
    """Issue #18's targets for this device, each against what was measured."""
    def line(target: str, measured: str, met: bool | None) -> str:
        return f"| {target} | {measured} | {'–' if met is None else 'met' if met else '**missed**'} |"
    rows = []
    if r["device"] == "cpu":
        one = {w["model"]: w for w in r["webcam"]}
        for s in r["stream"]:
            between, at = s["server"]["between_ms"], f"{s['model']} at {s['size']}x{s['size']}"
            alone = one.get(s["model"])
            for stat, goal in (("median", 8), ("p95", 30)):
                measured = f"{ms(between[stat])} (streaming, {at}"
                if alone:
                    measured += (f"; one frame at a time, {alone['size']}x{alone['size']}: "
                                 f"{ms(alone['server']['overhead_ms'][stat])}")
                measured += ")"
                rows.append(line(f"CPU: per-frame overhead outside the model ≤ {goal} ms {stat} (the server loop's "
                                 "`timings.between`, streaming)", measured,
                                 None if between[stat] is None else between[stat] <= goal))
    for s in r["stream"]:
        busy = s["server"]["busy"]
        rows.append(line(f"streaming ({s['model']}): the model busy ≥ 90% of the wall time (server loop)",
                         f"{share(busy)} (browser-driven: {share(s['browser_driven']['busy'])})",
                         None if busy is None else busy >= 0.9))
    fps = {s["model"]: s for s in r["stream"]} if r["device"] == "cuda" else {}
    for model, goal in (("sd-turbo", 100), ("sdxl-turbo", 40)):
        target = f"GPU: {model} webcam img2img ≥ {goal} fps"
        if model in fps:
            s = fps[model]
            rows.append(line(target, f"{s['server']['fps']:.1f} fps ({s['camera_fps']:.0f} fps camera)",
                             s["server"]["fps"] >= goal))
        else:
            rows.append(line(target, "not measured (no GPU)" if r["device"] == "cpu" else "not measured", None))
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
    parser.add_argument("--frames", type=int, default=10, help="frames one at a time per loop: twice as many for "
                                                                "transport (default 10)")
    parser.add_argument("--seconds", type=float, default=20.0, help="streaming time per loop (default 20)")
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
    results = {"schema": SCHEMA, "device": args.device, "device_name": device_name(args.device), "models": model_set,
               "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": git_commit(), "command": "bash bench/live.sh " + " ".join(argv or sys.argv[1:]),
               "python": platform.python_version(), "loops": list(LOOPS)}
    began = time.perf_counter()
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
    results["wall_seconds"] = round(time.perf_counter() - began, 1)
    out = args.out or results_path(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(MD_HEADER + render(results) + "\n")
    print(render(results))
    print("wrote", out, f"({results['wall_seconds']:.0f} s)")
    if args.out is None:                  # a committed results file: its page follows at once
        update_page()
        print("updated", PAGE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
