"""Driving the Turbo Live panel (web/turbo_live.js) in a browser page, as a user does, for the browser tests."""
from __future__ import annotations

import re

from workflow_utils import TEST_SIZE

STATS = "() => window.__turboLive.stats()"
PANEL = "#turbo-live-panel"


def role(page, name: str):
    return page.page.locator(f"{PANEL} [data-role={name}]")


def set_live_size(page, size: int = TEST_SIZE) -> None:
    """Turbo Live Input at size x size (its widgets, as a user sets them; the panel captures at that size),
    and Empty Latent Image too in every prompt the page queues (its size is linked to the loader's)."""
    page.evaluate("""(size) => {
      for (const n of app.graph.nodes) if (n.type === 'TurboLiveInput')
        for (const w of n.widgets) if (w.name === 'width' || w.name === 'height') w.value = size;
      const toPrompt = app.graphToPrompt.bind(app);
      app.graphToPrompt = async (...args) => {
        const prompt = await toPrompt(...args);
        for (const node of Object.values(prompt.output))
          if (node.class_type === 'EmptyLatentImage') Object.assign(node.inputs, {width: size, height: size});
        return prompt;
      };
    }""", size)


def stats(page) -> dict:
    return page.evaluate(STATS)


def wait_stats(page, condition: str, timeout: float = 240.0) -> dict:
    """Wait until `condition` (JS, on the panel's stats `s`) holds."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    try:
        page.page.wait_for_function(f"() => {{ const s = window.__turboLive.stats(); return {condition}; }}",
                                    timeout=timeout * 1000)
    except PlaywrightTimeout:
        raise AssertionError(f"after {timeout:.0f} s, still not {condition}: {stats(page)}, "
                             f"message {role(page, 'message').inner_text()!r}") from None
    return stats(page)


def shown_fps(page) -> float:
    return float(re.match(r"([\d.]+) fps", role(page, "stats").inner_text()).group(1))


def output_fingerprint(page) -> list[int]:
    """The shown output's pixels, summed per channel (to tell two pictures apart)."""
    return page.evaluate("""() => { const img = document.querySelector('#turbo-live-panel [data-role=output]');
      const c = Object.assign(document.createElement('canvas'), {width: img.naturalWidth, height: img.naturalHeight});
      const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
      const d = ctx.getImageData(0, 0, c.width, c.height).data, sum = [0, 0, 0];
      for (let i = 0; i < d.length; i += 4) { sum[0] += d[i]; sum[1] += d[i + 1]; sum[2] += d[i + 2]; }
      return sum; }""")


def paint_stroke(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    box = role(page, "paint").bounding_box()
    mouse = page.page.mouse
    mouse.move(box["x"] + box["width"] * start[0], box["y"] + box["height"] * start[1])
    mouse.down()
    for step in range(1, 9):
        t = step / 8
        mouse.move(box["x"] + box["width"] * (start[0] + (end[0] - start[0]) * t),
                   box["y"] + box["height"] * (start[1] + (end[1] - start[1]) * t))
    mouse.up()


def prompt_posts(page) -> list[str]:
    """The URLs of every POST /prompt the page makes from now on. The panel makes none: the server queues
    the session's runs (protocol 2)."""
    posts: list[str] = []
    page.page.on("request", lambda r: posts.append(r.url)
                 if r.method == "POST" and r.url.split("?")[0].rstrip("/").endswith("/prompt") else None)
    return posts


def live_source(api: dict) -> str:
    inputs = [n for n in api.values() if n["class_type"] == "TurboLiveInput"]
    return inputs[0]["inputs"]["source"] if inputs else "prompt"


def run_live_workflow(page, name: str, api: dict) -> None:
    """Press Live on an opened live workflow and check that its source drives the picture."""
    set_live_size(page)
    panel = page.page.locator(PANEL)
    panel.wait_for(state="visible")                     # the panel opens with a live graph
    source = live_source(api)
    assert role(page, "source").input_value() == source
    posts = prompt_posts(page)
    role(page, "toggle").click()
    if source == "webcam":
        # Chromium's fake camera: frames flow, and the panel shows a frame rate above 0.
        wait_stats(page, "s.outputs >= 3 && s.frameId > 1 && s.fps > 0")
        page.page.wait_for_function(f"() => parseFloat(document.querySelector('{PANEL} [data-role=stats]')"
                                    ".textContent) > 0")
        assert shown_fps(page) > 0
    elif source == "paint":
        paint_stroke(page, (0.2, 0.2), (0.8, 0.6))
        first = wait_stats(page, "s.outputs >= 1")
        paint_stroke(page, (0.3, 0.8), (0.7, 0.3))
        later = wait_stats(page, f"s.outputs >= 2 && s.frameId > {first['frameId']}")
        assert later["frameId"] > first["frameId"]
    else:
        first = wait_stats(page, "s.outputs >= 1")
        before, picture = stats(page), output_fingerprint(page)
        prompt_box = role(page, "prompt")
        prompt_box.click()
        prompt_box.press("End")
        prompt_box.press_sequentially(", at night", delay=40)         # 10 keystrokes while a frame runs
        final_text = prompt_box.input_value()
        # Once the loop is idle (no run in flight, no edit waiting) the picture shown is the newest run's, and
        # that run holds the final text (the server keeps the session's last runs in ComfyUI's history).
        after = wait_stats(page, f"s.promptId !== {first['promptId']!r} && s.submitted > {before['submitted']} "
                                 "&& s.promptId === s.lastRun && !s.inFlight && !s.editWaiting")
        shown = page.host.history(after["promptId"])["prompt"][2]
        assert [n["inputs"]["text"] for n in shown.values() if "text" in n["inputs"]] == [final_text]
        # The edits went as values, not as the graph again, and those made while a run executed folded into
        # few runs (the server replaces a waiting run with the newer values).
        assert after["graphs"] == 1 and after["sets"] > before["sets"], (before, after)
        assert after["ran"] - before["ran"] < 10, (before, after)
        text_widget = page.evaluate("() => app.graph.nodes.find(n => n.type === 'TurboTextEncode')"
                                    ".widgets.find(w => w.name === 'text').value")
        assert text_widget == final_text
        assert output_fingerprint(page) != picture
    assert page.evaluate(f"() => document.querySelector('{PANEL} [data-role=output]').naturalWidth") == TEST_SIZE
    assert role(page, "message").inner_text() == ""
    assert posts == [], posts
    assert stats(page)["objectUrls"] <= 2
    page.evaluate("() => new Promise(r => { app.graph.setDirtyCanvas(true, true); requestAnimationFrame(() => r()); })")


def stop_live(page) -> None:
    role(page, "toggle").click()
    wait_stats(page, "!s.running", timeout=30)
