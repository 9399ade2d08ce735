"""Turbo Live's frame checks, session store and message layouts, in-process (no server).

The same code runs inside the server; tests/test_live_server.py drives it over HTTP and websockets.
"""
from __future__ import annotations

import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from comfy_turbo.live import frames, protocol
from comfy_turbo.live.frames import FrameError, Limits
from comfy_turbo.live.sessions import KEPT_PROMPTS, Frame, RunEnded, SessionError, SessionStore, check_session_id


def encoded(fmt: str, width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=95)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixels are never there): a decompression bomb's shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- frames -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_encoded_frames_decode_to_rgb_by_their_bytes(fmt):
    data = encoded(fmt)
    assert frames.sniff(data) == fmt
    for declared in (None, fmt):
        pixels = frames.decode(data, declared)
        assert pixels.shape == (48, 64, 3) and pixels.dtype == np.uint8 and pixels.flags.writeable
    if fmt == "png":        # lossless: the very pixels
        expected = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        assert np.array_equal(frames.decode(data), expected)


def test_raw_rgba_keeps_rgb_and_needs_its_exact_size():
    rgba = np.arange(4 * 3 * 4, dtype=np.uint8).reshape(3, 4, 4)
    assert np.array_equal(frames.decode(rgba.tobytes(), "rgba", 4, 3), rgba[:, :, :3])
    with pytest.raises(FrameError, match=r"raw RGBA frame of 4x3 is 48 bytes; got 47") as e:
        frames.decode(rgba.tobytes()[:-1], "rgba", 4, 3)
    assert e.value.status == 400
    with pytest.raises(FrameError, match="needs its width and height"):
        frames.decode(rgba.tobytes(), "rgba")


@pytest.mark.parametrize("data, declared, message, status", [
    (b"", None, "empty", 400),
    (b"GIF89a" + b"\0" * 40, None, "not a JPEG, PNG or WebP image", 415),
    (b"hello, this is text", None, "not a JPEG, PNG or WebP image", 415),
    (encoded("png"), "jpeg", "declared jpeg but its bytes are png", 415),
    (encoded("jpeg"), "bmp", "format 'bmp' is not accepted", 415),
    (encoded("jpeg")[:200], None, "could not be decoded.*truncated or corrupt", 400),
    (encoded("png")[:60] + b"\0" * 40, None, "could not be decoded", 400),
])
def test_bad_frames_are_refused_with_the_problem_and_the_fix(data, declared, message, status):
    with pytest.raises(FrameError, match=message) as e:
        frames.decode(data, declared)
    assert e.value.status == status
    assert str(e.value).startswith("comfy-turbo live: ")


def test_limits_on_bytes_and_pixels_are_checked_before_decoding():
    small = Limits(max_frame_bytes=1000, max_pixels=64 * 64)
    with pytest.raises(FrameError, match="the limit is 1000") as e:
        frames.decode(encoded("png", 64, 64), limits=small)
    assert e.value.status == 413
    with pytest.raises(FrameError, match=r"65x64 = 4160 pixels; the limit is 4096") as e:
        frames.decode(encoded("jpeg", 65, 64, seed=1), limits=Limits(max_pixels=64 * 64))
    assert e.value.status == 413
    # A header that claims 30000 x 30000 is refused from the header alone (PIL would need 2.7 GB).
    with pytest.raises(FrameError, match="header claims an enormous image.*900000000 pixels") as e:
        frames.decode(png_header_claiming(30000, 30000))
    assert e.value.status == 413
    with pytest.raises(FrameError, match="3000x3000 = 9000000 pixels"):      # under PIL's own bomb limit
        frames.decode(png_header_claiming(3000, 3000))
    with pytest.raises(FrameError, match=r"2x9000 .* 8192 per side"):
        frames.decode(np.zeros((9000, 2, 4), np.uint8).tobytes(), "rgba", 2, 9000)


def test_limits_come_from_the_environment():
    limits = Limits.from_env({"COMFY_TURBO_LIVE_MAX_SESSIONS": "3", "COMFY_TURBO_LIVE_IDLE_SECONDS": "2.5"})
    assert (limits.max_sessions, limits.idle_seconds, limits.max_pixels) == (3, 2.5, Limits().max_pixels)
    with pytest.raises(ValueError, match="COMFY_TURBO_LIVE_MAX_PIXELS='lots' is not a number"):
        Limits.from_env({"COMFY_TURBO_LIVE_MAX_PIXELS": "lots"})


# --- sessions -----------------------------------------------------------------------------------

def frame(frame_id: int) -> Frame:
    return Frame(frame_id, np.zeros((2, 2, 3), np.uint8), 0.0, 0.0, "png")


@pytest.mark.parametrize("name", ["live", "cam-1", "A.b_c", "x" * 64])
def test_session_ids_of_the_documented_form_are_accepted(name):
    assert check_session_id(name) == name


@pytest.mark.parametrize("name", ["", "-live", "a b", "../etc", "x" * 65, "caf\u00e9", None, 7])
def test_other_session_ids_are_refused(name):
    with pytest.raises(SessionError, match="1-64 letters, digits"):
        check_session_id(name)


def opened(store: SessionStore, session_id: str = "s", frame_id: int = 1) -> str:
    """Open a session as an HTTP push does (its first frame); its token."""
    assert store.put(session_id, frame(frame_id))[0]
    return store.get(session_id).token


def test_the_newest_frame_wins_and_overtaken_frames_count_as_dropped():
    store = SessionStore()
    token = opened(store)
    assert store.put("s", frame(3), token)[0]              # 1 was never used: dropped
    accepted, session = store.put("s", frame(2), token)    # arrives late: older than the one held
    assert not accepted and session.frame.id == 3
    store.authorize_run("s", "prompt-a")
    store.authorize_run("s", "prompt-b")
    taken, _ = store.take("s", "prompt-a")
    assert taken.id == 3
    store.take("s", "prompt-b")                     # the same frame again is one use
    assert store.put("s", frame(4), token)[0]       # 3 was used: not dropped
    assert session.counters() == {"received": 4, "used": 1, "dropped": 2, "sent": 0, "outputs_dropped": 0}
    assert store.reserve_frame_id("s") == 5


def test_frame_ids_are_handed_out_on_arrival_so_the_later_of_two_pushes_wins():
    """Two frames without ids arrive (HTTP pushes) and decode at once; the later one finishes first. Its
    id, reserved on arrival, is still the higher, so it wins and the earlier one is refused as older."""
    store = SessionStore()
    tickets = store.begin_decode("s"), store.begin_decode("s")
    earlier, later = store.reserve_frame_id("s", tickets[0]), store.reserve_frame_id("s", tickets[1])
    assert (earlier, later) == (1, 2)
    token = opened(store, "s", later)
    store.end_decode("s", tickets[1])
    accepted, session = store.put("s", frame(earlier), token)
    store.end_decode("s", tickets[0])
    assert not accepted and session.frame.id == later
    assert store.reserve_frame_id("s") == 3


def test_a_run_waits_for_frames_that_arrived_before_it_not_for_later_ones():
    """take() waits for a frame still decoding when it was called, and not for one that arrived after:
    with frames arriving continuously it would otherwise wait its whole timeout every time."""
    import threading
    store = SessionStore()
    token = opened(store)
    store.authorize_run("s", "p")
    decoding = store.begin_decode("s")                  # frame 2 arrived and decodes
    result = {}

    def run():
        start = time.monotonic()
        result["frame"] = store.take("s", "p", wait=10.0)[0].id
        result["seconds"] = time.monotonic() - start

    reader = threading.Thread(target=run)
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive()                             # it waits for frame 2
    store.begin_decode("s")                              # frame 3 arrives after the run asked, and never ends
    store.put("s", frame(2), token)
    store.end_decode("s", decoding)
    reader.join(5.0)
    assert not reader.is_alive() and result["frame"] == 2
    assert result["seconds"] < 5.0                       # not the 10 s timeout: frame 3 was not waited for


def test_reserved_ids_of_refused_frames_are_forgotten():
    store = SessionStore()
    for i in range(100):                            # frames that failed to decode: no session, no reservation
        ticket = store.begin_decode(f"s{i}")
        store.reserve_frame_id(f"s{i}", ticket)
        store.end_decode(f"s{i}", ticket)
    assert len(store) == 0 and not store._decoding and store.reserve_frame_id("s7") == 1
    store.attach("s1", "tab", connection := object())
    ticket = store.begin_decode("s1")
    assert store.reserve_frame_id("s1", ticket) == 1 and store.reserve_frame_id("s1") == 2
    assert store.detach("s1", connection) and store.reserve_frame_id("s1") == 1


def test_no_frame_yet_names_the_session():
    store = SessionStore()
    with pytest.raises(SessionError, match="live session 'cam' has no frame: it is not open") as e:
        store.take("cam")
    assert e.value.status == 404
    store.attach("cam", "client", object())
    store.authorize_run("cam", "p")
    with pytest.raises(SessionError, match="'cam' has no frame: no frame has arrived yet"):
        store.take("cam", "p")


def test_only_the_sessions_runs_read_its_frames_and_an_ended_sessions_runs_stop_as_interrupted():
    store = SessionStore()
    token = opened(store)
    store.authorize_run("s", "mine")
    assert store.run_started("s", "mine") is not None and store.take("s", "mine")[0].id == 1
    assert store.run_started("s", "theirs") is None        # its fingerprint: NaN, never a cached frame
    with pytest.raises(SessionError, match="not a run of live session 's'") as e:
        store.take("s", "theirs")
    assert e.value.status == 403
    with pytest.raises(SessionError, match="not a run of live session 's'"):
        store.output_session("s", "theirs")
    assert store.output_session("s", "mine").id == "s" and store.output_session("none-open", "x") is None
    assert store.close("s", token)
    with pytest.raises(RunEnded):                          # picked up as its session ended: interrupted
        store.take("s", "mine")
    with pytest.raises(RunEnded):
        store.output_session("s", "mine")


def test_an_open_session_needs_its_token():
    store = SessionStore()
    token = opened(store)
    for wrong in (None, "", "guess", token[:-1]):
        with pytest.raises(SessionError, match="belongs to another client") as e:
            store.put("s", frame(2), wrong)
        assert e.value.status == 403
        with pytest.raises(SessionError, match="belongs to another client"):
            store.close("s", wrong)
        with pytest.raises(SessionError, match="belongs to another client"):
            store.attach("s", "tab", object(), token=wrong)      # taking over a session fed over HTTP
    assert store.get("s").received == 1                  # refused frames are not counted
    assert "client_id" not in store.get("s").status() and "token" not in store.get("s").status()
    session = store.attach("s", "tab", object(), token=token)
    assert session.token != token                        # a new owner: a new secret
    with pytest.raises(SessionError, match="belongs to another client"):
        store.put("s", frame(2), token)


def test_one_client_attaches_at_a_time_and_a_new_run_starts_fresh():
    store = SessionStore()
    first, second = object(), object()
    token = store.attach("s", "tab-1", first).token
    store.put("s", frame(1), token)
    first_run = store.get("s").run
    store.put("s", frame(9), token)
    with pytest.raises(SessionError, match="already live in another tab") as e:
        store.attach("s", "tab-2", second)
    assert e.value.status == 409
    assert store.put("s", frame(10), token)[0]
    assert not store.detach("s", second)                     # not the owner: nothing happens
    assert store.get("s").attached is first
    assert store.detach("s", first) and store.get("s") is None      # the session ends with its connection
    session = store.attach("s", "tab-2", second)
    assert session.client_id == "tab-2" and session.frame is None and store.reserve_frame_id("s") == 1
    assert session.token != token
    store.put("s", frame(1), session.token)
    store.authorize_run("s", "p")
    assert store.run_started("s", "p")[1] == 1
    assert store.run_started("s", "p") != (first_run, 1)       # frame 1 of this run is not frame 1 of the last


def test_a_refused_frame_opens_no_session():
    store = SessionStore()
    store.attach("s", "tab-1", object())
    with pytest.raises(SessionError):
        store.put("s", frame(1), "not-the-token")
    with pytest.raises(SessionError):
        store.put("bad name", frame(1))
    assert len(store) == 1 and store.get("other") is None


def test_sessions_are_bounded_and_idle_ones_expire():
    now = [0.0]
    store = SessionStore(Limits(max_sessions=2, idle_seconds=10), clock=lambda: now[0])
    store.put("a", frame(1))
    token = store.attach("b", "tab", object()).token
    store.put("b", frame(1), token)
    with pytest.raises(SessionError, match="already 2 live sessions, the limit") as e:
        store.put("c", frame(1))
    assert e.value.status == 503
    now[0] = 11.0                                  # 'a' idle for 11 s; 'b' is attached, so it stays
    store.put("c", frame(1))
    assert store.get("a") is None and store.get("b") is not None and len(store) == 2
    assert store.close("c", store.get("c").token) and not store.close("c")


@pytest.mark.parametrize("open_session", [True, False])
def test_a_session_keeps_the_history_of_its_last_runs_only(open_session):
    store = SessionStore()
    if open_session:
        store.put("s", frame(1))
        expired = [store.authorize_run("s", f"p{i}") for i in range(KEPT_PROMPTS + 3)]
    else:
        expired = [store.note_prompt("s", f"p{i}") for i in range(KEPT_PROMPTS + 3)]
    assert expired[:KEPT_PROMPTS] == [[]] * KEPT_PROMPTS
    assert expired[KEPT_PROMPTS:] == [["p0"], ["p1"], ["p2"]]
    assert store.note_prompt("s", f"p{KEPT_PROMPTS + 2}") == []     # seen already
    assert (store.get("s") is not None) == open_session               # noting a prompt opens no session


# --- message layouts ----------------------------------------------------------------------------

def test_frame_messages_round_trip_and_bad_ones_are_named():
    message = protocol.pack_frame({"frame_id": 7, "format": "jpeg"}, b"\xff\xd8\xffDATA")
    header, payload = protocol.unpack_frame(message)
    assert header == {"frame_id": 7, "format": "jpeg"} and bytes(payload) == b"\xff\xd8\xffDATA"
    for bad, match in [(b"\0\0", "at least 4 bytes"), (struct.pack(">I", 99) + b"{}", "header length field says 99"),
                       (struct.pack(">I", 3) + b"abc", "not UTF-8 JSON"), (struct.pack(">I", 2) + b"[]", "JSON object")]:
        with pytest.raises(protocol.ProtocolError, match=match):
            protocol.unpack_frame(bad)


def test_output_messages_are_comfyuis_type_4():
    body = protocol.pack_image_with_metadata({"prompt_id": "p", "image_type": "image/jpeg"}, b"JPEG")
    message = struct.pack(">I", 4) + body          # what PromptServer.send_bytes puts on the wire
    (length,) = struct.unpack_from(">I", message, 4)
    assert json.loads(message[8:8 + length]) == {"prompt_id": "p", "image_type": "image/jpeg"}
    assert protocol.unpack_image_with_metadata(message) == ({"prompt_id": "p", "image_type": "image/jpeg"}, b"JPEG")
    with pytest.raises(protocol.ProtocolError, match="type 1"):
        protocol.unpack_image_with_metadata(struct.pack(">II", 1, 1) + b"x")


# --- the loop's graph and its output sender -------------------------------------------------------

def test_values_change_only_widgets_of_the_sessions_graph():
    from comfy_turbo.live.graphs import GraphError, apply_values, check_live_graph
    graph = {"1": {"class_type": "TurboLiveInput", "inputs": {"session": "s", "width": 0}},
             "2": {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["1", 0]}},
             "3": {"class_type": "TurboLiveOutput", "inputs": {"images": ["2", 0], "session": "s"}}}
    assert check_live_graph(graph, "s") is True
    assert check_live_graph({k: v for k, v in graph.items() if k != "1"}, "s") is False     # txt2img: no frames
    changed, count = apply_values(graph, {"2": {"seed": 7}, "1": {"width": 0}})
    assert count == 1 and changed["2"]["inputs"]["seed"] == 7 and graph["2"]["inputs"]["seed"] == 1   # a copy
    for values, message in [({"2": {"model": 3}}, "is a link"), ({"2": {"seed": ["1", 0]}}, "looks like a link"),
                            ({"9": {"seed": 1}}, "no node '9'"), ({"1": {"session": "t"}}, "cannot change"),
                            ([], "values must be"), ({"2": {f"x{i}": i for i in range(300)}}, "at most")]:
        with pytest.raises(GraphError, match=message):
            apply_values(graph, values)
    for prompt, message in [(graph | {"3": {"class_type": "TurboLiveOutput", "inputs": {"session": "t"}}}, "uses live session 't'"),
                            (graph | {"3": {"class_type": "TurboLiveOutput", "inputs": [1]}}, "API format"),
                            ({"1": graph["1"]}, "no Turbo Live Output"), ({}, "API format"), ({"1": 5}, "API format")]:
        with pytest.raises(GraphError, match=message):
            check_live_graph(prompt, "s")


def test_the_output_sender_keeps_order_and_the_newest_pictures_win():
    import threading
    from comfy_turbo.live.sender import Output, OutputSender
    sender, sent, dropped, gate = OutputSender(max_waiting=2), [], [], threading.Event()

    def output(session, n):
        def send():
            gate.wait(5)
            sent.append((session, n))
        return Output(session, send, lambda: dropped.append((session, n)))

    sender.submit(output("a", 0))                  # taken at once; it blocks on the gate
    deadline = time.monotonic() + 5
    while sender.waiting() and time.monotonic() < deadline:
        time.sleep(0.01)
    for n in range(1, 6):
        sender.submit(output("a", n))
    sender.submit(output("b", 1))                  # another session's picture is not dropped for a's
    assert sender.waiting("a") == 2 and sender.waiting("b") == 1
    gate.set()
    while len(sent) < 4 and time.monotonic() < deadline + 5:
        time.sleep(0.01)
    assert sent == [("a", 0), ("a", 4), ("a", 5), ("b", 1)]
    assert dropped == [("a", 1), ("a", 2), ("a", 3)]


def test_a_run_reads_the_frame_its_fingerprint_named():
    """A frame that arrives between a run's start (its fingerprint, the cache key) and its Turbo Live Input
    executing is left for the next run: the run's pixels always match its cache key."""
    store = SessionStore()
    token = opened(store)
    store.authorize_run("s", "run-1")
    assert store.run_started("s", "run-1")[1] == 1
    assert store.put("s", frame(2), token)[0]
    assert store.take("s", "run-1")[0].id == 1
    session = store.get("s")
    assert (session.used, session.dropped, session.frame_used) == (1, 0, False)     # frame 2 waits for a run
    store.authorize_run("s", "run-2")
    assert store.run_started("s", "run-2")[1] == 2 and store.take("s", "run-2")[0].id == 2
    assert (session.used, session.frame_used) == (2, True)


def test_an_open_session_freezes_the_heap_until_the_last_one_ends():
    """ComfyUI's gc.collect() between prompts walks only what was made since a session opened (live.heap)."""
    import gc
    import weakref

    from comfy_turbo.live.heap import FrozenHeap

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    clock = [0.0]
    store = SessionStore(Limits(idle_seconds=10), clock=lambda: clock[0], heap=FrozenHeap())
    before = Node()
    before.me = before                                   # a cycle that exists when the first session opens
    made_before = weakref.ref(before)
    try:
        store.put("a", frame(1))
        del before                                       # ... and becomes garbage while frozen
        assert store.heap.frozen and gc.get_freeze_count() > 0
        during = Node()
        during.me = during                               # a cycle made while live is still collected
        made_during = weakref.ref(during)
        del during
        gc.collect()
        assert made_during() is None and made_before() is not None
        store.put("b", frame(1))
        store.heap.refreeze()
        assert store.close("a", store.get("a").token) and store.heap.frozen     # "b" is still open
        clock[0] = 11.0                                  # "b" expires: the last one
        assert len(store) == 0 and not store.heap.frozen and gc.get_freeze_count() == 0
        gc.collect()
        assert made_before() is None                     # frozen cycles are collected once unfrozen
    finally:
        gc.unfreeze()


def test_a_heap_frozen_by_someone_else_is_left_to_them():
    import gc

    from comfy_turbo.live.heap import FrozenHeap

    gc.freeze()
    try:
        heap = FrozenHeap()
        heap.hold("a")
        heap.release("a")
        assert not heap.frozen and gc.get_freeze_count() > 0           # not ours to unfreeze
    finally:
        gc.unfreeze()


def test_a_model_that_dies_in_a_cycle_while_frozen_is_still_freed(comfy):
    """ComfyUI frees such a model with gc.collect() (cleanup_models_gc), which a frozen heap defeats: the next
    live run collects the frozen objects too (nodes.live.free_dead_models)."""
    import gc
    import weakref

    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    from comfy_turbo.live.heap import FrozenHeap
    from comfy_turbo.nodes.live import free_dead_models

    module = torch.nn.Linear(4, 4)
    module.me = [module]                                   # a reference cycle, as ComfyUI warns of
    patcher = comfy.model_patcher.ModelPatcher(module, torch.device("cpu"), torch.device("cpu"))
    loaded = mm.LoadedModel(patcher)
    loaded.real_model = weakref.ref(module)                # what LoadedModel.model_load records
    alive = weakref.ref(module)
    heap = FrozenHeap()
    mm.current_loaded_models.append(loaded)
    try:
        heap.hold("a")
        del module, patcher                                # ComfyUI dropped its patcher: the model is dead
        assert loaded.is_dead() and not free_dead_models(None)
        gc.collect()
        assert alive() is not None, "frozen: ComfyUI's own collection cannot free it"
        assert free_dead_models(heap) and alive() is None and heap.frozen
        assert not free_dead_models(heap)                  # nothing dead any more: no second collection
    finally:
        mm.current_loaded_models.remove(loaded)
        heap.release("a")
