"""Turbo Live against a real ComfyUI server: frames in and out over its websockets, the live loop on tiny
models, backpressure, and every kind of bad input. The client is scripts/live_client.py's ServerLoop, which
does what the web UI's panel does: it hands the graph over once and the server runs the loop
(tests/test_live_loop.py has the loop's own rules, the sessions' privacy and the heartbeat).
"""
from __future__ import annotations

import copy
import io
import json
import statistics
import struct
import time
import uuid

import numpy as np
import pytest
import requests
import websocket
from PIL import Image

from comfy_host import PromptRejected
from live_client import LiveClient, LiveError, ServerLoop, passthrough_graph as passthrough
from workflow_utils import TEST_SIZE, live_names, load_api_twin, node_of, shrink

LIVE_SIZE = 64                      # the model loops run at 64x64: a few frames per second on 2 cores
KEPT_PROMPTS = 8                    # live/sessions.py: history entries a session keeps


# --- frames -----------------------------------------------------------------------------------

def id_frame(frame_id: int, size: int = 512) -> np.ndarray:
    """A frame that shows its own id: 16 bits as dark/light cells of a 4x4 grid, with a camera's sensor noise
    on top (which costs PNG what it costs for real frames); the bits survive JPEG."""
    bits = [(frame_id >> i) & 1 for i in range(16)]
    cells = np.array(bits, dtype=np.float32).reshape(4, 4) * 160 + 48
    pixels = np.kron(cells, np.ones((size // 4, size // 4), dtype=np.float32))
    noise = np.random.default_rng(frame_id).normal(0, 10, (size, size, 3))
    return np.clip(pixels[:, :, None] + noise, 0, 255).astype(np.uint8)


def read_id(image: bytes) -> int:
    with Image.open(io.BytesIO(image)) as img:
        gray = np.asarray(img.convert("L"), dtype=np.float32)
    size = gray.shape[0] // 4
    cells = gray.reshape(4, size, 4, size).mean(axis=(1, 3)).reshape(-1) > 127
    return sum(int(bit) << i for i, bit in enumerate(cells))


def webcam_like(t: int, size: int = LIVE_SIZE) -> np.ndarray:
    """A smooth picture with a square that moves a little each frame, like a camera's."""
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 128)], axis=2).astype(np.uint8)
    left = (t * 3) % (size // 2)
    pixels[size // 4: size // 2, left: left + size // 4] = (250, 220, 30)
    return pixels


def encode(pixels: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **options)
    return buffer.getvalue()


def live_twin(name: str, session: str, size: int = LIVE_SIZE) -> dict:
    prompt = shrink(load_api_twin(name), size)
    for node in prompt.values():
        if node["class_type"] in ("TurboLiveInput", "TurboLiveOutput"):
            node["inputs"]["session"] = session
    return prompt


def new_session() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def post_prompt_with_token(host, prompt: dict, token: str | None, client_id: str | None = None) -> str:
    """POST /prompt by hand; with a session's token the prompt is one of that session's runs."""
    body = {"prompt": prompt, "client_id": client_id or host.client_id,
            "extra_data": {"turbo_live_token": token} if token else {}}
    response = requests.post(f"{host.url}/prompt", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["prompt_id"]


def got_prompt_lines(host) -> int:
    """How many POST /prompt the server has logged ("got prompt") so far."""
    return host.log_path.read_bytes().count(b"got prompt")


def with_text(prompt: dict, text: str) -> dict:
    prompt = copy.deepcopy(prompt)
    node_of(prompt, "TurboTextEncode")["inputs"]["text"] = text
    return prompt


def close_code(ws: websocket.WebSocket) -> int:
    """Read up to the server's close frame; its status code."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack(">H", data[:2])[0]


@pytest.fixture
def live(host):
    """A connected live client on a fresh session; closed after the test."""
    client = LiveClient(host.url, new_session()).connect()
    yield client
    client.close()


def wait_for(loop: ServerLoop, condition, timeout: float = 120.0) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, f"timed out; errors: {loop.errors[-3:]}"
        loop.pump(0.05, until=condition)


def files_under(host) -> set:
    return {str(p.relative_to(host.base_dir)) for folder in ("output", "temp", "input")
            for p in (host.base_dir / folder).rglob("*") if p.is_file()}


def assert_serving(host) -> None:
    """The server answers, and a plain live round trip still works on a new session."""
    assert host.alive(), host.log_tail()
    with LiveClient(host.url, new_session()) as client:
        loop = ServerLoop(client, passthrough(client.session))
        loop.push_frame(encode(id_frame(5, 64)))
        wait_for(loop, lambda: loop.outputs, timeout=60)
        assert read_id(loop.outputs[-1].image) == 5


# --- transport --------------------------------------------------------------------------------

def _stock_round_trip(host, ws, png: bytes, name: str) -> bytes:
    """Stock ComfyUI's best equivalent: upload the frame, LoadImage -> PreviewImage, then /view."""
    upload = requests.post(host.url + "/upload/image", files={"image": (name, png, "image/png")},
                           data={"overwrite": "true"}, timeout=30)
    upload.raise_for_status()
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": upload.json()["name"]}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    result = host.follow(ws, host.post_prompt(prompt)["prompt_id"], timeout=60)
    assert result.status == "success", result.error
    return host.view(result.images()[0])


def test_live_transport_is_at_least_twice_as_fast_as_upload_preview_view(host):
    """512x512 frames with no model: live in -> live out against upload -> LoadImage -> PreviewImage -> /view,
    alternating frame by frame in one run. Every output is its own input (the id drawn in its pixels)."""
    frames = 16
    ws = host.connect()
    ours, stock, timings = [], [], []
    try:
        with LiveClient(host.url, new_session()) as client:
            loop = ServerLoop(client, passthrough(client.session))
            for frame_id in range(1, frames + 1):
                pixels = id_frame(frame_id)
                jpeg, png = encode(pixels), encode(pixels, "PNG", compress_level=4)
                start = time.perf_counter()
                pushed = loop.push_frame(jpeg, captured_at=start)
                wait_for(loop, lambda: loop.outputs and loop.outputs[-1].frame_id == pushed, timeout=60)
                ours.append(time.perf_counter() - start)
                output = loop.outputs[-1]
                assert read_id(output.image) == pushed == frame_id
                timings.append(output.metadata["turbo_live"]["timings_ms"])

                start = time.perf_counter()
                viewed = _stock_round_trip(host, ws, png, f"live-transport-{frame_id}.png")
                stock.append(time.perf_counter() - start)
                assert read_id(viewed) == frame_id
            assert not loop.errors
    finally:
        ws.close()
    ours_ms, stock_ms = statistics.median(ours[2:]) * 1000, statistics.median(stock[2:]) * 1000
    print(f"\nper frame, median of {frames - 2}: live {ours_ms:.1f} ms, stock {stock_ms:.1f} ms, "
          f"ratio {stock_ms / ours_ms:.1f}x; server-side stages (ms) of the last frame: {timings[-1]}")
    assert stock_ms >= 2 * ours_ms, (ours_ms, stock_ms)


# --- the live twins ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", live_names())
def test_live_twin_streams_frames_at_its_size_with_taesd(host, user_models, name):
    prompt = live_twin(name, "twin-" + name[len("turbo_live_"):], TEST_SIZE)
    vae_loaders = [n["inputs"]["vae_name"] for n in prompt.values() if n["class_type"] == "VAELoader"]
    assert vae_loaders and set(vae_loaders) <= {"taesd", "taesdxl"}       # TAESD decode, as the issue asks
    with LiveClient(host.url, node_of(prompt, "TurboLiveOutput")["inputs"]["session"]) as client:
        loop = ServerLoop(client, prompt)
        needs_frames = any(n["class_type"] == "TurboLiveInput" for n in prompt.values())
        for t in range(2):
            if needs_frames:
                loop.push_frame(encode(webcam_like(t, 96)))        # another size: the node resizes it
            else:
                loop.edit(with_text(prompt, f"a lighthouse, version {t}"))
            wait_for(loop, lambda: len(loop.outputs) > t, timeout=300)
        assert not loop.errors
        for output in loop.outputs:
            with Image.open(io.BytesIO(output.image)) as img:
                assert (img.format, img.size) == ("JPEG", (TEST_SIZE, TEST_SIZE))
        assert loop.outputs[0].image != loop.outputs[1].image


def test_a_live_session_samples_a_dmd2_model(host, user_models):
    """The live text-to-image twin with the DMD2 recipe (issue 20): Load Turbo Checkpoint and Turbo Family
    Schedule set to dmd2 at 4 steps (LCM's sampler at 999/749/499/249, unit initial noise) streams pictures,
    its runs sample 4 steps where the SDXL-Turbo recipe's take 1, and the pictures differ at the same seed
    and text."""
    session = "twin-dmd2"
    turbo = live_twin("turbo_live_txt2img", session, TEST_SIZE)
    dmd2 = copy.deepcopy(turbo)
    node_of(dmd2, "TurboCheckpointLoader")["inputs"]["family"] = "dmd2"
    node_of(dmd2, "TurboFamilySchedule")["inputs"].update(family="dmd2", steps=4)
    with LiveClient(host.url, session) as client:
        loop = ServerLoop(client, with_text(dmd2, "a lighthouse at dusk"))
        wait_for(loop, lambda: len(loop.outputs) > 0, timeout=300)
        loop.edit(with_text(turbo, "a lighthouse at dusk"))
        turbo_steps = node_of(turbo, "TurboFamilySchedule")["inputs"]["steps"]
        assert turbo_steps != 4
        # The turbo run's picture: the first from a run that sampled turbo's step count.
        wait_for(loop, lambda: loop.outputs and loop.steps.get(loop.outputs[-1].prompt_id) == turbo_steps, timeout=300)
        assert not loop.errors
        assert loop.steps[loop.outputs[0].prompt_id] == 4            # DMD2's four steps, one progress tick each
        with Image.open(io.BytesIO(loop.outputs[0].image)) as img:
            assert (img.format, img.size) == ("JPEG", (TEST_SIZE, TEST_SIZE))
        assert loop.outputs[0].image != loop.outputs[-1].image
    assert "with the sdxl-turbo recipe" not in host.log_path.read_text()     # loader and schedule agree


# --- the loop ---------------------------------------------------------------------------------

def test_a_50_frame_loop_on_a_tiny_model(host, user_models):
    """The webcam twin on SD-Turbo-shaped tiny weights, handed over once: 50 frames pushed at 30 fps, faster
    than the loop takes them, with the prompt text changed on the way (A -> B -> A), each change running
    before the next. The server runs every run: the client never POSTs /prompt. Another client's prompt,
    queued in the middle, runs in between."""
    session = new_session()
    prompt_a = with_text(live_twin("turbo_live_webcam", session), f"an oil painting {session}")  # new to the memo
    prompt_b = with_text(prompt_a, f"a charcoal sketch {session}")
    before = files_under(host)
    bystander_id = uuid.uuid4().hex
    bystander = host.connect(client_id=bystander_id)       # another client of the same ComfyUI
    bystander_prompt = bystander_done = None
    with LiveClient(host.url, session) as client:
        posts_before = got_prompt_lines(host)
        loop = ServerLoop(client, prompt_a)
        for frame_id in range(1, 51):
            if frame_id in (20, 35):
                queued = len(loop.prompts)
                loop.edit(prompt_b if frame_id == 20 else prompt_a)
                wait_for(loop, lambda: len(loop.prompts) > queued and loop.in_flight is None)
                assert loop.reasons[loop.prompts[-1]] == "values"      # only the text went, not the graph
            started = time.perf_counter()
            loop.push_frame(encode(webcam_like(frame_id)))
            if frame_id == 1:
                wait_for(loop, lambda: loop.outputs, timeout=300)       # the models load once
            if frame_id == 10:          # the bystander's own graph (its image comes back to it alone)
                bystander_prompt = post_prompt_with_token(host, {
                    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                    "2": {"class_type": "TurboLiveOutput", "inputs": {"images": ["1", 0], "session": "bystander",
                                                                      "format": "jpeg", "quality": 80}}},
                    None, client_id=bystander_id)
                queue = host.get_json("/queue")
                number = next(item[0] for item in queue["queue_pending"] + queue["queue_running"]
                              if item[1] == bystander_prompt)
                ahead = [item for item in queue["queue_pending"] if item[0] < number] + queue["queue_running"]
            loop.pump(max(0.0, started + 1 / 30 - time.perf_counter()))
            if bystander_prompt and bystander_done is None and host.history(bystander_prompt):
                bystander_done = len(loop.prompts)
        loop.drain(timeout=300)
        session_status = host.get_json(f"/comfy-turbo/live/{session}")
        posts_during = got_prompt_lines(host) - posts_before
    assert not loop.errors, loop.errors
    assert not loop.refusals, loop.refusals
    # The server queued every run: the only POST /prompt was the bystander's.
    assert posts_during == 1, posts_during
    assert len(loop.prompts) >= 5 and set(loop.reasons.values()) <= {"frame", "values", "graph", "recovery"}
    # The bystander waited its turn behind at most the running and the waiting run, not behind the loop.
    # The bystander waited its turn behind the loop's running and waiting run at most, and ran while the loop
    # went on (ComfyUI's queue is first come, first served: the loop's later runs are numbered after it).
    assert len(ahead) <= 2, ahead
    assert host.history(bystander_prompt)["status"]["completed"] and bystander_done is not None
    assert bystander_done < len(loop.prompts), (bystander_done, len(loop.prompts))

    outputs = loop.outputs
    ids = [o.frame_id for o in outputs]
    # Each output carries the id of the frame it was made from: ids only go forward, the newest wins.
    assert all(1 <= i <= 50 for i in ids) and ids == sorted(ids)
    assert ids[-1] == 50
    fresh = [o.frame_id for o in outputs if o.metadata["turbo_live"]["fresh_frame"]]
    assert len(set(fresh)) == len(fresh)
    counters = session_status["frames"]
    assert counters["received"] == 50 and counters["used"] == len(set(ids))
    assert counters["dropped"] == 50 - counters["used"] and counters["sent"] == len(outputs)
    # One run executing and one waiting at most (the bystander's prompt may add one).
    assert loop.max_queue_remaining <= 3
    # The text encoder node runs only when the text changes (A, B, A), and going back to A is a memo hit.
    encodes = [(pid, seconds["2"]) for pid in loop.prompts if "2" in (seconds := loop.node_seconds(pid))]
    assert len(encodes) == 3, encodes       # (the memo's hits: tests/test_fastpath.py, bench/prompt_memo.py)
    # The binary messages are ComfyUI's type 4 with our metadata; the images are JPEG at the graph's size.
    for output in outputs:
        meta = output.metadata
        assert meta["prompt_id"] in loop.prompts and meta["image_type"] == "image/jpeg"
        assert meta["node_id"] == meta["display_node_id"] == "7"
        assert set(meta["turbo_live"]["timings_ms"]) >= {"encode", "graph", "prompt"}
        with Image.open(io.BytesIO(output.image)) as img:
            assert (img.format, img.size) == ("JPEG", (LIVE_SIZE, LIVE_SIZE))
    # Nothing on disk, and the history keeps only the session's last few prompts.
    assert files_under(host) == before
    history = host.get_json("/history")
    assert len(set(loop.prompts) & set(history)) <= KEPT_PROMPTS
    assert set(loop.prompts[-3:]) <= set(history)
    assert all(not history[pid]["outputs"] for pid in set(loop.prompts) & set(history))
    # The frames went to the session's own client only: the bystander got its own picture, nothing else.
    bystander.settimeout(0.5)
    seen = []
    try:
        while True:
            seen.append(bystander.recv())
    except websocket.WebSocketTimeoutException:
        pass
    finally:
        bystander.close()
    pictures = [m for m in seen if isinstance(m, bytes)]
    assert len(pictures) == 1
    # It announced no supports_preview_metadata: ComfyUI's type 1, a JPEG, of its own 8x8 image.
    assert struct.unpack_from(">II", pictures[0]) == (1, 1)
    with Image.open(io.BytesIO(pictures[0][8:])) as img:
        assert img.size == (8, 8)


def test_a_live_graph_with_lora_controlnet_and_the_fast_path_changes_while_it_runs(host, model_files):
    """Any graph that holds the live nodes: a LoRA, a ControlNet fed by the live frame, Turbo Fast Path.
    Changing the LoRA's strength while live re-runs the graph on the same frame; a new frame runs it again."""
    session = new_session()
    prompt = live_twin("turbo_live_webcam", session)
    prompt["1"]["inputs"]["ckpt_name"] = "sd-turbo-tiny.safetensors"
    prompt.update({
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "strength_model": 1.0,
                                                      "strength_clip": 1.0, "lora_name": "sd-turbo-tiny-lora.safetensors"}},
        "11": {"class_type": "TurboFastPath", "inputs": {"model": ["10", 0], "attention": "sdpa", "sdpa_backend": "auto",
                                                         "channels_last": True, "compile": "off"}},
        "12": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "sd-turbo-tiny-controlnet.safetensors"}},
        "13": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["2", 0], "control_net": ["12", 0], "image": ["8", 0], "strength": 0.8,
            "start_percent": 0.0, "end_percent": 1.0}},
    })
    prompt["2"]["inputs"]["clip"] = ["10", 1]
    prompt["5"]["inputs"].update(model=["11", 0], positive=["13", 0])
    with LiveClient(host.url, session) as client:
        loop = ServerLoop(client, prompt)
        loop.push_frame(encode(webcam_like(1)))
        wait_for(loop, lambda: len(loop.outputs) == 1 and loop.in_flight is None, timeout=300)
        without_lora = copy.deepcopy(prompt)
        without_lora["10"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
        loop.edit(without_lora)
        wait_for(loop, lambda: len(loop.outputs) == 2 and loop.in_flight is None, timeout=300)
        loop.push_frame(encode(webcam_like(9)))
        wait_for(loop, lambda: len(loop.outputs) == 3, timeout=300)
    assert not loop.errors, loop.errors
    first, edited, new_frame = loop.outputs
    assert (first.frame_id, edited.frame_id, new_frame.frame_id) == (1, 1, 2)
    assert first.metadata["turbo_live"]["fresh_frame"] and not edited.metadata["turbo_live"]["fresh_frame"]
    assert first.image != edited.image != new_frame.image


def test_frames_pushed_at_60_fps_into_a_slow_graph_queue_nothing(host, user_models):
    """Backpressure: a graph far slower than the camera. Frames that no prompt takes are dropped and counted,
    and nothing queues up: every output is made from a frame newer than any that had been pushed when the
    output before last was shown, so latency stays within about two prompts instead of growing with a queue
    (an ordering of events, not a timing, so a loaded machine cannot flip it)."""
    session = new_session()
    prompt = live_twin("turbo_live_webcam", session, size=192)
    with LiveClient(host.url, session) as client:
        loop = ServerLoop(client, prompt)
        loop.push_frame(encode(webcam_like(0, 192)))
        wait_for(loop, lambda: loop.outputs, timeout=300)          # models loaded
        warm = len(loop.outputs)
        start, pushed, push_times = time.perf_counter(), 0, []
        while time.perf_counter() - start < 8.0:
            pushed += 1
            push_times.append((time.perf_counter(), loop.push_frame(encode(webcam_like(pushed, 192)))))
            loop.pump(max(0.0, start + pushed / 60 - time.perf_counter()))
        loop.drain(timeout=120)
        status = host.get_json(f"/comfy-turbo/live/{session}")["frames"]
    assert not loop.errors
    latencies = [o.latency_ms for o in loop.outputs[warm:] if o.latency_ms is not None]
    graph_ms = statistics.median(o.metadata["turbo_live"]["timings_ms"]["prompt"] for o in loop.outputs[warm:])
    print(f"\n{pushed} frames at 60 fps, {len(latencies)} shown; latency ms {[round(x) for x in latencies]}; "
          f"prompt {graph_ms:.0f} ms; server counters {status}")
    assert len(latencies) >= 4
    shown = loop.outputs[warm:]
    for before_last, output in zip(shown, shown[2:]):
        newest_then = max((frame for at, frame in push_times if at <= before_last.shown_at), default=0)
        assert output.frame_id > newest_then, (output.frame_id, newest_then, [o.frame_id for o in shown])
    assert status["received"] == pushed + 1
    assert status["dropped"] == status["received"] - status["used"] >= pushed // 2
    assert loop.max_queue_remaining <= 2           # one run executing, one waiting


def test_a_camera_is_read_just_in_time_so_no_frame_is_wasted(host, user_models):
    """The panel's webcam scheduling (LiveLoop with a camera): a frame is captured only when a prompt will
    take it, shortly before the running one ends, so frames are fresh when read and almost none dropped."""
    session = new_session()
    prompt = live_twin("turbo_live_webcam", session, size=96)
    captured = []

    def camera() -> bytes:
        captured.append(time.perf_counter())
        return encode(webcam_like(len(captured), 96))

    with LiveClient(host.url, session) as client:
        loop = ServerLoop(client, prompt, camera=camera, fps_cap=30)
        wait_for(loop, lambda: len(loop.outputs) >= 2, timeout=300)            # models loaded, timings known
        warm = len(loop.outputs)
        loop.pump(5.0)
        loop.drain(120)
        counters = host.get_json(f"/comfy-turbo/live/{session}")["frames"]
    assert not loop.errors
    outputs = loop.outputs[warm:]
    assert len(outputs) >= 4
    # Each frame sent was used, bar the one sent ahead when the camera stopped; a 30 fps push would have
    # sent ~150 in these 5 s.
    assert counters["received"] == len(captured) and counters["dropped"] <= 1
    assert len(captured) <= len(loop.prompts) + 1
    # Fresh frames: a frame waits for its prompt a fraction of the prompt's own time.
    waits = [o.metadata["turbo_live"]["timings_ms"]["wait"] for o in outputs]
    graphs = [o.metadata["turbo_live"]["timings_ms"]["graph"] for o in outputs]
    assert statistics.median(waits) * 2 < statistics.median(graphs), (waits, graphs)
    assert loop.max_queue_remaining <= 2


# --- bad input --------------------------------------------------------------------------------

def _post_frame(host, session: str, body: bytes, token: str | None = None, **query):
    return requests.post(f"{host.url}/comfy-turbo/live/{session}/frame", params=query, data=body, timeout=60,
                         headers={"X-Turbo-Live-Token": token} if token else {})


def end_http_session(host, session: str, token: str) -> bool:
    return requests.delete(f"{host.url}/comfy-turbo/live/{session}", headers={"X-Turbo-Live-Token": token},
                           timeout=10).json()["ended"]


@pytest.mark.parametrize("body, query, status, message", [
    (b"\x00\x01garbage", {}, 415, "not a JPEG, PNG or WebP image"),
    (b"GIF89a" + bytes(64), {}, 415, "not a JPEG, PNG or WebP image"),
    ("png-as-jpeg", {"format": "jpeg"}, 415, "declared jpeg but its bytes are png"),
    ("truncated-jpeg", {}, 400, "could not be decoded"),
    ("huge-png", {}, 413, "4096x1100 = 4505600 pixels; the limit is 4194304"),
    (bytes(16 * 1024 * 1024 + 1), {}, 413, "the limit is 16777216"),
    (bytes(10), {"format": "rgba", "width": 2, "height": 2}, 400, "raw RGBA frame of 2x2 is 16 bytes; got 10"),
    (bytes(16), {"format": "rgba", "width": "two", "height": 2}, 400, "width must be an integer"),
    (bytes(16), {"format": "tiff"}, 415, "format 'tiff' is not accepted"),
    (bytes(16), {"frame_id": -3}, 400, "frame_id must be 1 or more"),
], ids=["garbage", "gif", "declared-wrong", "truncated", "too-many-pixels", "too-many-bytes", "rgba-size",
        "rgba-width", "format", "frame-id"])
def test_bad_frames_over_http_get_a_clear_error_and_the_server_keeps_serving(host, body, query, status, message):
    body = {"png-as-jpeg": lambda: encode(webcam_like(1), "PNG"),
            "truncated-jpeg": lambda: encode(webcam_like(1))[:300],
            "huge-png": lambda: encode(np.zeros((1100, 4096, 3), np.uint8), "PNG")}.get(body, lambda: body)()
    session = new_session()
    response = _post_frame(host, session, body, **query)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["message"].startswith("comfy-turbo live: ")
    assert requests.get(f"{host.url}/comfy-turbo/live/{session}", timeout=10).status_code == 404  # none opened
    ok = _post_frame(host, session, encode(webcam_like(2)))
    assert ok.status_code == 200 and ok.json()["accepted"]
    assert end_http_session(host, session, ok.json()["token"])


def test_frames_over_http_and_raw_rgba_reach_the_graph(host):
    session, client_ws = new_session(), host.connect()
    client_ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    try:
        rgba = np.concatenate([id_frame(77, 64), np.full((64, 64, 1), 255, np.uint8)], axis=2)
        ack = _post_frame(host, session, rgba.tobytes(), format="rgba", width=64, height=64,
                          client_id=host.client_id).json()
        assert ack["accepted"] and (ack["width"], ack["height"], ack["frame_id"]) == (64, 64, 1)
        token = ack["token"]                   # the first push opened the session
        post_prompt_with_token(host, passthrough(session), token)
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline
            message = client_ws.recv()
            if isinstance(message, bytes) and struct.unpack_from(">I", message)[0] == 4:
                break
        length = struct.unpack_from(">I", message, 4)[0]
        metadata = json.loads(message[8:8 + length])
        assert metadata["turbo_live"]["frame_id"] == 1 and read_id(message[8 + length:]) == 77
    finally:
        client_ws.close()
    status = host.get_json(f"/comfy-turbo/live/{session}")
    assert "client_id" not in status and "token" not in status and status["frames"]["sent"] == 1
    assert end_http_session(host, session, token)


def test_an_unchanged_frame_leaves_the_graph_cached_and_a_new_one_runs_it(host):
    session = new_session()
    token = _post_frame(host, session, encode(id_frame(1, 64)), client_id=host.client_id).json()["token"]

    def executed() -> list[str]:
        ws = host.connect()
        try:
            result = host.follow(ws, post_prompt_with_token(host, passthrough(session), token), timeout=60)
        finally:
            ws.close()
        assert result.status == "success", result.error
        return [e["data"]["node"] for e in result.events if e["type"] == "executing" and e["data"]["node"]]

    try:
        assert executed() == ["1", "2"]
        assert executed() == []                       # same frame: ComfyUI's cache answers, nothing runs
        _post_frame(host, session, encode(id_frame(2, 64)), token, client_id=host.client_id)
        assert executed() == ["1", "2"]
    finally:
        end_http_session(host, session, token)


def test_bad_messages_on_the_live_websocket_get_errors_and_the_connection_stays(live):
    live.close()                                  # this test speaks the protocol by hand
    ws = live.open_live_socket()
    try:
        assert json.loads(ws.recv())["type"] == "attached"
        for message, expected in [
            (struct.pack(">I", 999) + b"{}", "header length field says 999"),
            (struct.pack(">I", 2) + b"[]" + b"x", "must be a JSON object"),
            (struct.pack(">I", 19) + b'{"format": "jpeg"} ' + b"\xff\xd8\xffnot really", "could not be decoded"),
            (b"\x00\x00", "at least 4 bytes"),
        ]:
            ws.send_binary(message)
            reply = json.loads(ws.recv())
            assert reply["type"] == "error" and expected in reply["message"], reply
        ws.send("hello")
        assert "text messages are commands" in json.loads(ws.recv())["message"]
        ws.send_binary(struct.pack(">I", 2) + b"{}" + bytes(17 * 1024 * 1024))       # over the frame limit
        reply = json.loads(ws.recv())
        assert reply["status"] == 413 and "the limit is 16777216" in reply["message"]
        ws.send(json.dumps({"type": "status"}))
        status = json.loads(ws.recv())                 # refused frames are not counted as frames
        assert status["type"] == "status" and status["attached"] and status["frame"] is None
        assert status["frames"]["received"] == 0
        ws.send_binary(b"\x00\x00\x00\x10" + b'{"frame_id": 4} ' + encode(webcam_like(3)))
        ack = json.loads(ws.recv())
        assert ack["type"] == "frame" and ack["accepted"] and ack["frame_id"] == 4
    finally:
        ws.close()


def test_of_two_concurrent_http_pushes_the_later_one_wins(host):
    """Frames pushed over HTTP without ids, two at a time: their ids are handed out on arrival, so the two
    never share one, and the one that arrived later (the higher id) is kept, whichever decoded first."""
    from concurrent.futures import ThreadPoolExecutor
    session = new_session()
    slow = encode(np.full((2048, 2048, 3), 90, dtype=np.uint8), "PNG", compress_level=9)   # tens of ms to decode
    fast = encode(webcam_like(1, 64))
    token = _post_frame(host, session, fast).json()["token"]
    with ThreadPoolExecutor(2) as pool:
        for pair in range(6):
            bodies = (slow, fast) if pair % 2 == 0 else (fast, slow)
            acks = [f.result().json() for f in [pool.submit(_post_frame, host, session, body, token)
                                                 for body in bodies]]
            ids = sorted(ack["frame_id"] for ack in acks)
            assert ids[0] != ids[1], acks
            newer = next(ack for ack in acks if ack["frame_id"] == ids[1])
            assert newer["accepted"], acks
            assert host.get_json(f"/comfy-turbo/live/{session}")["frame"]["frame_id"] == ids[1]
    assert end_http_session(host, session, token)


def test_every_frame_gets_an_answer_even_when_overtaken(host):
    """Frames sent back to back, faster than they decode: each is answered once, the ones a newer frame
    replaced before their decode with accepted: false (overtaken), and the newest is kept."""
    frames = 12
    # A flat 2048x2048 PNG: a few kB to send, tens of ms to decode, so the frames behind it pile up.
    big = encode(np.full((2048, 2048, 3), 90, dtype=np.uint8), "PNG", compress_level=9)
    with LiveClient(host.url, new_session()) as client:
        for frame_id in range(1, frames + 1):
            client.send_frame(big, frame_id, "png")
        answers, deadline = {}, time.monotonic() + 60
        while len(answers) < frames and time.monotonic() < deadline:
            for source, message, _ in client.receive(1.0):
                if source == "live":
                    reply = json.loads(message)
                    assert reply["type"] == "frame", reply
                    assert reply["frame_id"] not in answers, f"frame {reply['frame_id']} answered twice"
                    answers[reply["frame_id"]] = reply
        client.live_ws.send(json.dumps({"type": "status"}))
        status = next(json.loads(m) for s, m, _ in client.receive(10.0) if s == "live")
    assert sorted(answers) == list(range(1, frames + 1))
    overtaken = [i for i, reply in answers.items() if reply.get("overtaken")]
    assert overtaken, "no frame was overtaken: send them faster, or bigger"
    assert all(not answers[i]["accepted"] for i in overtaken)
    assert answers[frames]["accepted"] and status["frame"]["frame_id"] == frames
    assert status["frames"]["received"] == frames
    assert status["frames"]["dropped"] == frames - 1            # nothing used them: every older one dropped


@pytest.mark.parametrize("session", ["a b", "-live", "x" * 65, "caf\u00e9"])
def test_malformed_session_ids_are_refused_everywhere(host, session):
    quoted = requests.utils.quote(session, safe="")
    response = requests.post(f"{host.url}/comfy-turbo/live/{quoted}/frame", data=encode(webcam_like(0)), timeout=10)
    assert response.status_code == 400 and "is not valid" in response.json()["error"]["message"]
    ws = websocket.create_connection(f"ws://127.0.0.1:{host.port}/comfy-turbo/live/{quoted}/ws?clientId=c")
    try:
        assert "is not valid" in json.loads(ws.recv())["message"]
        assert close_code(ws) == 4400
    finally:
        ws.close()
    assert_prompt_refused(host, passthrough(session), "is not valid")


def assert_prompt_refused(host, prompt, message):
    with pytest.raises(PromptRejected) as rejected:
        host.post_prompt(prompt)
    assert message in json.dumps(rejected.value.body)


def test_a_session_name_that_could_be_a_path_is_refused_in_the_graph(host):
    assert_prompt_refused(host, passthrough("../../etc"), "is not valid")
    assert_serving(host)


def test_an_unknown_session_is_named_in_the_error(host):
    assert requests.get(f"{host.url}/comfy-turbo/live/never-opened", timeout=10).status_code == 404
    result = host.run(passthrough("never-opened-" + uuid.uuid4().hex[:6]))
    assert result.status == "error"
    assert "live session 'never-opened-" in result.error["exception_message"]
    assert "has no frame" in result.error["exception_message"]
    assert_serving(host)


def test_a_second_tab_on_the_same_session_is_refused_and_the_first_keeps_going(host, live):
    loop = ServerLoop(live, passthrough(live.session))
    loop.push_frame(encode(id_frame(1, 64)))
    wait_for(loop, lambda: loop.outputs)
    with pytest.raises(LiveError, match="already live in another tab or client"):
        LiveClient(host.url, live.session).connect()
    ws = LiveClient(host.url, live.session).open_live_socket()
    try:
        assert json.loads(ws.recv())["status"] == 409
        assert close_code(ws) == 4409
    finally:
        ws.close()
    http = _post_frame(host, live.session, encode(id_frame(2, 64)), client_id="someone-else")
    assert http.status_code == 403 and "belongs to another client" in http.json()["error"]["message"]
    loop.push_frame(encode(id_frame(3, 64)))
    wait_for(loop, lambda: loop.outputs[-1].frame_id == 2)       # the loop's own second frame
    assert read_id(loop.outputs[-1].image) == 3


def test_a_client_that_disconnects_mid_loop_leaves_the_server_serving(host, user_models):
    session = new_session()
    prompt = live_twin("turbo_live_webcam", session, size=256)          # about a second a frame here
    log_start = host.log_path.stat().st_size
    client = LiveClient(host.url, session).connect()
    loop = ServerLoop(client, prompt)
    loop.push_frame(encode(webcam_like(1, 256)))
    wait_for(loop, lambda: loop.executed, timeout=60)          # the first run executes
    running = loop.prompts[-1]
    loop.push_frame(encode(webcam_like(2, 256)))
    wait_for(loop, lambda: len(loop.prompts) == 2, timeout=60)   # the second waits in the queue
    waiting = loop.prompts[-1]
    client.close()                                 # mid-run: both websockets go
    deadline = time.monotonic() + 300
    while host.history(running).get("status", {}).get("completed") is None:
        assert time.monotonic() < deadline and host.alive(), host.log_tail()
        time.sleep(0.2)
    # The session ended with its connection, and its work with it: the running prompt was interrupted (not
    # failed for want of a frame), the queued one removed.
    messages = [event for event, _ in host.history(running)["status"]["messages"]]
    assert "execution_interrupted" in messages and "execution_error" not in messages, messages
    time.sleep(1.0)
    assert waiting not in json.dumps(host.get_json("/queue")), "the waiting run was not removed"
    waiting_history = host.history(waiting)
    assert waiting_history == {} or "execution_error" not in json.dumps(waiting_history), waiting_history
    assert requests.get(f"{host.url}/comfy-turbo/live/{session}", timeout=10).status_code == 404
    with open(host.log_path, "rb") as log:
        log.seek(log_start)
        assert b"Traceback" not in log.read()
    with LiveClient(host.url, session) as again:        # the session name is free again
        again_loop = ServerLoop(again, prompt)
        again_loop.push_frame(encode(webcam_like(2, 256)))
        wait_for(again_loop, lambda: again_loop.outputs, timeout=120)
    assert_serving(host)


def test_sessions_are_bounded_over_http(host):
    limit = host.get_json("/comfy-turbo/live")["limits"]["max_sessions"]
    opened = []
    try:
        while host.get_json("/comfy-turbo/live")["sessions"] < limit:
            response = _post_frame(host, new_session(), encode(webcam_like(0)))
            assert response.status_code == 200
            opened.append((response.json()["session"], response.json()["token"]))
        refused = _post_frame(host, new_session(), encode(webcam_like(0)))
        assert refused.status_code == 503 and "the limit" in refused.json()["error"]["message"]
    finally:
        for session, token in opened:
            end_http_session(host, session, token)
    assert_serving(host)
