"""The Turbo Live panel in headless Chromium: its helpers against the server's protocol, and how the loop
ends: Stop, a closed tab, a second tab on the same session, a restarted server.

These run on a private ComfyUI with no model at all: the graph is Turbo Live Input (webcam) -> Turbo Live
Output, so Chromium's fake camera comes straight back. The shipped live workflows themselves run in
tests/test_browser.py.
"""
from __future__ import annotations

import base64
import time

import pytest
import requests

from build_workflows import Spec, build_ui
from comfy_host import ComfyHost
from live_browser import PANEL, role, stats, stop_live, wait_stats
from test_browser import UI_SETTINGS, UiPage, browser, chromium  # noqa: F401  (fixtures)

from comfy_turbo.live import protocol

SESSION = "echo"
ECHO = {"1": {"class_type": "TurboLiveInput", "_meta": {"title": "Turbo Live Input"},
              "inputs": {"session": SESSION, "width": 96, "height": 96, "source": "webcam"}},
        "2": {"class_type": "TurboLiveOutput", "_meta": {"title": "Turbo Live Output"},
              "inputs": {"images": ["1", 0], "session": SESSION, "format": "webp", "quality": 80}}}


@pytest.fixture(scope="module")
def echo_host(tmp_path_factory):
    """A ComfyUI of its own (the restart test stops it), with no models."""
    server = ComfyHost(tmp_path_factory.mktemp("comfy-live-echo"))
    server.start()
    server.request("/settings", UI_SETTINGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def echo_workflow(echo_host):
    spec = Spec("turbo_live_echo", "Turbo Live echo", "The camera, straight back.", [["note", "1"], ["2"]])
    return build_ui(spec, ECHO, echo_host.object_info(), "0.0.0")


def open_echo(browser, host, workflow) -> UiPage:
    page = UiPage(browser, host)
    page.load(workflow, "echo")
    page.page.locator(PANEL).wait_for(state="visible")
    return page


def session_status(host) -> int:
    return requests.get(f"{host.url}/comfy-turbo/live/{SESSION}", timeout=10).status_code


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_panels_helpers_speak_the_servers_protocol(browser, echo_host, echo_workflow):
    page = open_echo(browser, echo_host, echo_workflow)
    try:
        result = page.evaluate("""async () => {
          const m = await import('/extensions/comfy-turbo/turbo_live.js');
          const frame = new Uint8Array(m.packFrame({frame_id: 7, format: 'jpeg'}, new Uint8Array([255, 216, 255, 1]).buffer));
          const meta = new TextEncoder().encode(JSON.stringify({prompt_id: 'p', image_type: 'image/webp'}));
          const message = new Uint8Array(8 + meta.length + 3);
          new DataView(message.buffer).setUint32(0, 4); new DataView(message.buffer).setUint32(4, meta.length);
          message.set(meta, 8); message.set([1, 2, 3], 8 + meta.length);
          const back = m.unpackImageWithMetadata(message.buffer);
          return {frame: btoa(String.fromCharCode(...frame)), meta: back.metadata, type: back.blob.type,
                  size: back.blob.size, other: m.unpackImageWithMetadata(new Uint8Array([0, 0, 0, 1, 0, 0, 0, 0]).buffer),
                  skip: [m.skipProbability(1, 0.98), m.skipProbability(0.99, 0.98), m.skipProbability(0.98, 0.98),
                         m.skipProbability(0.5, 0.98), m.skipProbability(0.999, 1)],
                  cos: [m.cosine([1, 0], [1, 0]), m.cosine([1, 0], [0, 1]), m.cosine([1, 1], [-1, -1])],
                  p: [m.percentile([5, 1, 3, 2, 4], 50), m.percentile([1, 2, 3, 4, 5], 95), m.percentile([], 50)]};
        }""")
    finally:
        page.close()
    header, payload = protocol.unpack_frame(base64.b64decode(result["frame"]))
    assert header == {"frame_id": 7, "format": "jpeg"} and bytes(payload) == b"\xff\xd8\xff\x01"
    assert result["meta"] == {"prompt_id": "p", "image_type": "image/webp"}
    assert (result["type"], result["size"], result["other"]) == ("image/webp", 3, None)
    assert result["skip"] == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.0])       # StreamDiffusion's formula
    assert result["cos"] == pytest.approx([1.0, 0.0, -1.0])
    assert result["p"][:2] == pytest.approx([3.0, 4.8]) and result["p"][2] is None


def test_stop_ends_the_session_and_a_closed_tab_does_too(browser, echo_host, echo_workflow):
    page = open_echo(browser, echo_host, echo_workflow)
    try:
        role(page, "toggle").click()
        wait_stats(page, "s.outputs >= 2", timeout=60)
        assert session_status(echo_host) == 200
        stop_live(page)
        wait_until(lambda: session_status(echo_host) == 404)
        assert role(page, "toggle").inner_text().endswith("Live")
        role(page, "toggle").click()                        # one click starts it again
        wait_stats(page, "s.outputs >= 2 && s.running", timeout=60)
        assert page.problems == []
    finally:
        page.close()                                        # the tab goes while Live runs
    wait_until(lambda: session_status(echo_host) == 404)
    queue = echo_host.get_json("/queue")
    assert queue["queue_pending"] == [] and queue["queue_running"] == []


def test_a_second_tab_on_the_same_session_is_told_and_the_first_keeps_going(browser, echo_host, echo_workflow):
    first, second = open_echo(browser, echo_host, echo_workflow), open_echo(browser, echo_host, echo_workflow)
    try:
        role(first, "toggle").click()
        wait_stats(first, "s.outputs >= 1", timeout=60)
        role(second, "toggle").click()
        second.page.wait_for_function(f"() => document.querySelector('{PANEL} [data-role=message]')"
                                      ".textContent.includes('already live in another tab')")
        assert not stats(second)["running"]
        shown = stats(first)["outputs"]
        wait_stats(first, f"s.outputs > {shown + 1} && s.running", timeout=60)
    finally:
        first.close()
        second.close()


def test_a_server_restart_stops_the_loop_and_live_starts_again_after(browser, echo_host, echo_workflow):
    page = open_echo(browser, echo_host, echo_workflow)
    try:
        role(page, "toggle").click()
        wait_stats(page, "s.outputs >= 1", timeout=60)
        echo_host.stop()
        wait_stats(page, "!s.running", timeout=30)
        assert "Live stopped" in role(page, "message").inner_text()
        echo_host.start()
        page.page.wait_for_function("() => window.__turboLive.connected()", timeout=60_000)   # the UI reconnected
        role(page, "toggle").click()
        wait_stats(page, "s.outputs >= 1 && s.running", timeout=60)
    finally:
        page.close()
