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
from comfy_turbo.live.sessions import KEPT_PROMPTS, Frame, SessionError, SessionStore, check_session_id


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


def test_the_newest_frame_wins_and_overtaken_frames_count_as_dropped():
    store = SessionStore()
    assert store.put("s", frame(1))[0]
    assert store.put("s", frame(3))[0]              # 1 was never used: dropped
    accepted, session = store.put("s", frame(2))    # arrives late: older than the one held
    assert not accepted and store.newest_frame_key("s")[1] == 3
    taken, _ = store.take("s", "prompt-a")
    assert taken.id == 3
    store.take("s", "prompt-b")                     # the same frame again is one use
    assert store.put("s", frame(4))[0]              # 3 was used: not dropped
    assert session.counters() == {"received": 4, "used": 1, "dropped": 2, "sent": 0}
    assert store.reserve_frame_id("s") == 5


def test_frame_ids_are_handed_out_on_arrival_so_the_later_of_two_pushes_wins():
    """Two frames without ids arrive (HTTP pushes) and decode at once; the later one finishes first. Its
    id, reserved on arrival, is still the higher, so it wins and the earlier one is refused as older."""
    store = SessionStore()
    tickets = store.begin_decode("s"), store.begin_decode("s")
    earlier, later = store.reserve_frame_id("s", tickets[0]), store.reserve_frame_id("s", tickets[1])
    assert (earlier, later) == (1, 2)
    assert store.put("s", frame(later))[0]
    store.end_decode("s", tickets[1])
    accepted, session = store.put("s", frame(earlier))
    store.end_decode("s", tickets[0])
    assert not accepted and session.frame.id == later
    assert store.reserve_frame_id("s") == 3


def test_a_prompt_waits_for_frames_that_arrived_before_it_not_for_later_ones():
    """take() waits for a frame still decoding when it was called, and not for one that arrived after:
    with frames arriving continuously it would otherwise wait its whole timeout every time."""
    import threading
    store = SessionStore()
    store.put("s", frame(1))
    decoding = store.begin_decode("s")                  # frame 2 arrived and decodes
    result = {}

    def prompt():
        start = time.monotonic()
        result["frame"] = store.take("s", "p", wait=10.0)[0].id
        result["seconds"] = time.monotonic() - start

    reader = threading.Thread(target=prompt)
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive()                             # it waits for frame 2
    store.begin_decode("s")                              # frame 3 arrives after the prompt asked, and never ends
    store.put("s", frame(2))
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
    store.attach("s1", "tab", token := object())
    ticket = store.begin_decode("s1")
    assert store.reserve_frame_id("s1", ticket) == 1 and store.reserve_frame_id("s1") == 2
    assert store.detach("s1", token) and store.reserve_frame_id("s1") == 1


def test_no_frame_yet_names_the_session():
    store = SessionStore()
    with pytest.raises(SessionError, match="live session 'cam' has no frame: it is not open") as e:
        store.take("cam")
    assert e.value.status == 404
    store.attach("cam", "client", object())
    with pytest.raises(SessionError, match="'cam' has no frame: no frame has arrived yet"):
        store.take("cam")


def test_one_client_attaches_at_a_time_and_a_new_run_starts_fresh():
    store = SessionStore()
    first, second = object(), object()
    store.attach("s", "tab-1", first)
    store.put("s", frame(1), "tab-1")
    first_run = store.newest_frame_key("s")[0]
    store.put("s", frame(9), "tab-1")
    with pytest.raises(SessionError, match="already live in another tab") as e:
        store.attach("s", "tab-2", second)
    assert e.value.status == 409
    with pytest.raises(SessionError, match="live in another client's connection"):
        store.put("s", frame(10), "tab-2")                   # over HTTP, as another client
    assert store.put("s", frame(10), "tab-1")[0]
    assert not store.detach("s", second)                     # not the owner: nothing happens
    assert store.get("s").attached is first
    assert store.detach("s", first) and store.get("s") is None      # the session ends with its connection
    session = store.attach("s", "tab-2", second)
    assert session.client_id == "tab-2" and session.frame is None and store.reserve_frame_id("s") == 1
    store.put("s", frame(1), "tab-2")
    assert store.newest_frame_key("s")[1] == 1
    assert store.newest_frame_key("s") != (first_run, 1)       # frame 1 of this run is not frame 1 of the last


def test_a_refused_frame_opens_no_session():
    store = SessionStore()
    store.attach("s", "tab-1", object())
    with pytest.raises(SessionError):
        store.put("s", frame(1), "tab-2")
    with pytest.raises(SessionError):
        store.put("bad name", frame(1))
    assert len(store) == 1 and store.get("other") is None


def test_sessions_are_bounded_and_idle_ones_expire():
    now = [0.0]
    store = SessionStore(Limits(max_sessions=2, idle_seconds=10), clock=lambda: now[0])
    store.put("a", frame(1))
    store.attach("b", "tab", object())
    store.put("b", frame(1), "tab")
    with pytest.raises(SessionError, match="already 2 live sessions, the limit") as e:
        store.put("c", frame(1))
    assert e.value.status == 503
    now[0] = 11.0                                  # 'a' idle for 11 s; 'b' is attached, so it stays
    store.put("c", frame(1))
    assert store.get("a") is None and store.get("b") is not None and len(store) == 2
    assert store.close("c") and not store.close("c")


@pytest.mark.parametrize("open_session", [True, False])
def test_a_session_keeps_the_history_of_its_last_prompts_only(open_session):
    store = SessionStore()
    if open_session:
        store.put("s", frame(1))
    expired = [store.note_prompt("s", f"p{i}") for i in range(KEPT_PROMPTS + 3)]
    assert expired[:KEPT_PROMPTS] == [[]] * KEPT_PROMPTS
    assert expired[KEPT_PROMPTS:] == [["p0"], ["p1"], ["p2"]]
    assert store.note_prompt("s", f"p{KEPT_PROMPTS + 2}") == []     # seen already
    assert store.prompt_started("s", "p2") is None and store.prompt_started("s", "p3") is not None
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
