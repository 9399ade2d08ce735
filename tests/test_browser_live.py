"""The Turbo Live panel in headless Chromium: its helpers against the server's protocol, the loop the
server runs for it (protocol 2: the panel hands the graph over once, then sends frames and changed values,
never a prompt), and how the loop ends: Stop, a closed tab, a second tab on the same session, a restarted
server, a refused graph; and how it goes on: refused values, someone clearing ComfyUI's queue.

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
from live_browser import PANEL, prompt_posts, role, stats, stop_live, wait_stats
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


# Records the text messages the page sends on the live websocket (the graph, changed values).
RECORD_SENT = """() => {
  window.__turboSent = [];
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    if (typeof data === 'string' && this.url.includes('/comfy-turbo/live/')) window.__turboSent.push(JSON.parse(data));
    return send.call(this, data);
  };
}"""
SET_WIDGET = """([type, name, value]) => {
  app.graph.nodes.find(n => n.type === type).widgets.find(w => w.name === name).value = value;
}"""


def sent(page) -> list[dict]:
    return page.evaluate("() => window.__turboSent")


def node_id(prompt: dict, class_type: str) -> str:
    return next(k for k, n in prompt.items() if n["class_type"] == class_type)


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
                  p: [m.percentile([5, 1, 3, 2, 4], 50), m.percentile([1, 2, 3, 4, 5], 95), m.percentile([], 50)],
                  change: (() => {
                    const a = {'1': {class_type: 'A', inputs: {x: 1, s: 'a'}},
                               '2': {class_type: 'B', inputs: {i: ['1', 0], q: 5}}};
                    const edit = (f) => { const b = structuredClone(a); f(b); return m.promptChange(a, b); };
                    return [m.promptChange(null, a), m.promptChange(a, structuredClone(a)),
                            edit(b => { b['1'].inputs.s = 'b'; b['2'].inputs.q = 6; }),
                            edit(b => { b['1']._meta = {title: 't'}; }),
                            edit(b => { b['2'].inputs.i = ['3', 0]; }), edit(b => { b['2'].inputs.i = 7; }),
                            edit(b => { b['1'].class_type = 'C'; }),
                            edit(b => { b['3'] = {class_type: 'A', inputs: {}}; }),
                            edit(b => { delete b['1'].inputs.x; b['1'].inputs.y = 1; })];
                  })(),
                  refusal: m.refusalText({type: 'error', status: 400, request: 'set', message: 'comfy-turbo live: ...',
                    error: {message: 'Prompt outputs failed validation', details: ''},
                    node_errors: {'2': {class_type: 'TurboLiveOutput', errors: [
                      {message: 'Value 500 bigger than max of 100', details: 'quality'}]}}}),
                  plain: m.refusalText({type: 'error', status: 400, request: 'graph',
                                        message: 'comfy-turbo live: no Output'})};
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
    graph, same = {"kind": "graph"}, {"kind": "same"}
    values = {"kind": "set", "values": {"1": {"s": "b"}, "2": {"q": 6}}}
    assert result["change"] == [graph, same, values, same, graph, graph, graph, graph, graph]
    assert result["refusal"] == ("ComfyUI refused the values: Prompt outputs failed validation\n"
                                 "TurboLiveOutput #2: Value 500 bigger than max of 100: quality")
    assert result["plain"] == "no Output"


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


def test_the_server_runs_the_loop_the_panel_never_posts_a_prompt(browser, echo_host, echo_workflow):
    page = open_echo(browser, echo_host, echo_workflow)
    posts = prompt_posts(page)
    page.evaluate(RECORD_SENT)
    try:
        role(page, "toggle").click()
        shown = wait_stats(page, "s.outputs > 20 && s.frameId > 20 && s.submitted > 20", timeout=90)
        assert posts == []
        # The graph went once, as the frontend makes it; nothing changed since, so nothing else went.
        assert [m["type"] for m in sent(page)] == ["graph"]
        assert sent(page)[0]["prompt"] == page.evaluate("async () => (await app.graphToPrompt()).output")
        assert shown["graphs"] == 1 and shown["sets"] == 0 and shown["objectUrls"] <= 2
        assert role(page, "message").inner_text() == ""
        assert page.problems == []
    finally:
        page.close()


def test_a_widget_edit_goes_as_values_and_shows_in_the_next_output(browser, echo_host, echo_workflow):
    page = open_echo(browser, echo_host, echo_workflow)
    posts = prompt_posts(page)
    page.evaluate(RECORD_SENT)
    try:
        role(page, "fps-cap").fill("5")         # a few runs a second: the shown run's history entry stays a while
        role(page, "toggle").click()
        wait_stats(page, "s.outputs >= 3", timeout=60)
        assert page.evaluate("() => window.__turboLive.lastMetadata.image_type") == "image/webp"
        page.evaluate(SET_WIDGET, ["TurboLiveOutput", "format", "jpeg"])         # as a user picks it
        page.page.wait_for_function("() => window.__turboLive.lastMetadata.image_type === 'image/jpeg'",
                                    timeout=30_000)
        jpeg_run = page.evaluate("() => window.__turboLive.lastMetadata.prompt_id")
        # The run that made the JPEG is an ordinary prompt in ComfyUI's history, with the new value.
        entry = echo_host.history(jpeg_run)
        shown = wait_stats(page, "!s.editWaiting")
        messages = sent(page)
        output = node_id(messages[0]["prompt"], "TurboLiveOutput")
        assert entry["prompt"][2][output]["inputs"]["format"] == "jpeg"
        assert [m["type"] for m in messages] == ["graph", "set"]
        assert messages[1]["values"] == {output: {"format": "jpeg"}}      # only the value that changed
        assert (shown["graphs"], shown["sets"]) == (1, 1)
        stop_live(page)
        assert posts == [] and page.problems == []
    finally:
        page.close()


def test_outputs_faster_than_the_picture_loads_leak_no_object_url(browser, echo_host, echo_workflow):
    page = open_echo(browser, echo_host, echo_workflow)
    try:
        role(page, "fps-cap").fill("120")
        # The most object URLs the panel holds just after each output arrives.
        page.evaluate("""() => { const live = window.__turboLive, display = live.display.bind(live);
          window.__peakUrls = 0;
          live.display = (frame) => {
            display(frame);
            window.__peakUrls = Math.max(window.__peakUrls, live.objectUrls.size);
          };
        }""")
        role(page, "toggle").click()
        wait_stats(page, "s.outputs >= 10", timeout=60)
        # A burst of 50 outputs in one task: none of them can load before the next comes.
        burst = page.evaluate("""async () => {
          const canvas = Object.assign(document.createElement('canvas'), {width: 96, height: 96});
          const image = new Uint8Array(await (await new Promise(r => canvas.toBlob(r, 'image/png'))).arrayBuffer());
          const live = window.__turboLive, meta = new TextEncoder().encode(JSON.stringify({prompt_id: 'burst',
            image_type: 'image/png', turbo_live: {session: live.graph.session, frame_id: null}}));
          let peak = 0;
          for (let i = 0; i < 50; i++) {
            const message = new Uint8Array(8 + meta.length + image.length), view = new DataView(message.buffer);
            view.setUint32(0, 4); view.setUint32(4, meta.length);
            message.set(meta, 8); message.set(image, 8 + meta.length);
            live.onComfyMessage({data: message.buffer});
            peak = Math.max(peak, live.stats().objectUrls);
          }
          return peak;
        }""")
        assert burst <= 2
        wait_stats(page, "s.outputs >= 40", timeout=90)
        assert page.evaluate("() => window.__peakUrls") <= 2
        stop_live(page)
        # Once the last picture has loaded, only its URL lives.
        page.page.wait_for_function("() => window.__turboLive.stats().objectUrls === 1", timeout=10_000)
        assert page.evaluate(f"() => document.querySelector('{PANEL} [data-role=output]').naturalWidth") == 96
    finally:
        page.close()


def blocker(color: int) -> dict:
    """A prompt of another client that keeps ComfyUI's worker busy for a second or more on CPU, and whose
    colour keeps it out of the cache."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 1, "color": color}},
            "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 1.0}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


def test_outputs_keep_coming_when_someone_clears_comfyuis_queue(browser, echo_host, echo_workflow):
    page = open_echo(browser, echo_host, echo_workflow)
    try:
        role(page, "toggle").click()
        wait_stats(page, "s.outputs >= 3", timeout=60)
        for color in (1, 2):
            # While another client's prompt runs, the session's next run waits in the queue: clear it, and
            # each one the server queues again, until that prompt is done.
            blocking, cleared = echo_host.post_prompt(blocker(color), client_id="blocker")["prompt_id"], 0
            deadline = time.monotonic() + 60
            while not echo_host.history(blocking):
                assert time.monotonic() < deadline
                queue = echo_host.get_json("/queue")
                if any(item[1] == blocking for item in queue["queue_running"]) and queue["queue_pending"]:
                    requests.post(f"{echo_host.url}/queue", json={"clear": True}, timeout=10).raise_for_status()
                    cleared += 1
                time.sleep(0.05)
            assert cleared >= 1
            shown = stats(page)["outputs"]
            wait_stats(page, f"s.outputs > {shown + 5} && s.running", timeout=60)
        assert role(page, "message").inner_text() == ""
        assert page.problems == []
    finally:
        page.close()


def test_a_refused_graph_stops_live_and_refused_values_do_not(browser, echo_host, echo_workflow):
    page = open_echo(browser, echo_host, echo_workflow)
    posts = prompt_posts(page)
    page.evaluate(RECORD_SENT)
    message = role(page, "message")
    try:
        page.evaluate(SET_WIDGET, ["TurboLiveOutput", "quality", 500])          # past its max, 100
        role(page, "toggle").click()
        wait_stats(page, "!s.running", timeout=30)
        assert "ComfyUI refused the graph" in message.inner_text()
        assert "Value 500 bigger than max of 100: quality" in message.inner_text()
        assert message.inner_text().endswith("Live stopped.")
        page.evaluate(SET_WIDGET, ["TurboLiveOutput", "quality", 80])
        role(page, "toggle").click()
        shown = wait_stats(page, "s.outputs >= 3 && s.running", timeout=60)
        assert message.inner_text() == ""
        # Refused values: the server keeps the last good graph, Live goes on, and they are not sent again.
        page.evaluate(SET_WIDGET, ["TurboLiveOutput", "quality", 500])
        page.page.wait_for_function(f"() => document.querySelector('{PANEL} [data-role=message]')"
                                    ".textContent.includes('ComfyUI refused the values')")
        wait_stats(page, f"s.outputs > {shown['outputs'] + 10} && s.running", timeout=60)
        assert [m.get("values") for m in sent(page) if m["type"] == "set"] == [{"2": {"quality": 500}}]
        page.evaluate(SET_WIDGET, ["TurboLiveOutput", "quality", 70])           # fixed: accepted, message gone
        page.page.wait_for_function(f"() => document.querySelector('{PANEL} [data-role=message]').textContent === ''")
        assert wait_stats(page, "!s.editWaiting")["sets"] == 2
        assert posts == []
    finally:
        page.close()
