"""The shipped workflows in a real browser: ComfyUI's own web UI in headless Chromium (Playwright).

For each workflow in workflows/ a fresh page opens the Templates dialog, picks it under the pack's
name as a user does, and checks that the frontend shows no dialog, alert or error notice (it reports
a missing node or model file that way: a dialog in frontend 1.32, a notice in newer ones), logs no
error, and turns the graph into exactly the API twin. Then it presses Run (with
Empty Latent Image at 128 px instead of 512 in the queued prompt, as the API tests do), waits for
the server's success and the image on the Save Image node, and takes a 1280x800 screenshot.
The Turbo Live workflows are run with the Turbo Live panel instead: Live is pressed, and the webcam
(Chromium's fake camera), the paint canvas or typing drives the image (tests/test_browser_live.py has
the rest of the panel's behaviour).

Screenshots go to out/screenshots/ (COMFY_TURBO_SCREENSHOTS moves them). With
COMFY_TURBO_UPDATE_GALLERY=1 they also refresh docs/screenshots/ (the gallery in the README and
docs/workflows.md) and the template thumbnails workflows/<name>.jpg.

Chromium is Debian's `chromium` package, installed with apt-get when missing.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from comfy_host import PACK_DIR_NAME
from live_browser import run_live_workflow, stop_live
from workflow_utils import (FLOW_STAND_IN_TEXT_LOADER, T5_TEXT_LOADERS, TEST_SIZE, gallery_names_by_checkpoint,
                            is_live, load_api_twin, load_ui, node_of)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium's own connections get refused on a closed network.
# The fake-media flags give getUserMedia a moving test pattern, with the permission granted.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
VIEWPORT = {"width": 1280, "height": 800}
UI_SETTINGS = {
    "Comfy.TutorialCompleted": True,                 # no first-run template browser over the canvas
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,         # draw node text at the zoom that fits the whole graph
    "Comfy.Workflow.Persist": False,                 # every page starts empty, not with the last graph
    "Comfy.Validation.Workflows": True,              # the frontend's schema check on every load (its default)
}
NAMES = gallery_names_by_checkpoint()
UPDATE_GALLERY = os.environ.get("COMFY_TURBO_UPDATE_GALLERY") == "1"
SCREENSHOTS = Path(os.environ.get("COMFY_TURBO_SCREENSHOTS", REPO / "out" / "screenshots"))
GALLERY = REPO / "docs" / "screenshots"

# Runs before the frontend's own scripts: note each completed app.loadGraphData (the Templates dialog
# loads through it, and it runs the frontend's workflow validation), and every toast the frontend raises
# (its validator reports a schema error with toast.addAlert, and link repairs with toast.add).
INIT_SCRIPT = """
localStorage.setItem('vueNodesBannerDismissed', 'true');
window.__turboLoaded = [];
window.__turboToasts = [];
const __turboHook = setInterval(() => {
  const app = window.app, toast = app?.extensionManager?.toast;
  if (!app || !app.loadGraphData || !toast?.$onAction || app.__turboHooked) return;
  app.__turboHooked = true;
  clearInterval(__turboHook);
  toast.$onAction(({name, args}) => {
    if (name === 'addAlert') window.__turboToasts.push({severity: 'warn', summary: 'Alert', detail: String(args[0])});
    else if (name === 'add') window.__turboToasts.push({severity: String(args[0]?.severity),
      summary: String(args[0]?.summary ?? ''), detail: String(args[0]?.detail ?? '')});
  });
  const load = app.loadGraphData.bind(app);
  app.loadGraphData = async (...args) => {
    const result = await load(...args);
    window.__turboLoaded.push(args[3] ?? null);
    return result;
  };
}, 10);
"""
# The frontend's validator (useWorkflowValidation): a workflow that fails its zod schema raises an "Alert"
# toast ("Invalid workflow against zod schema: ..."), one whose links it had to repair a "Workflow
# Validation" warning and a "Workflow Links Fixed" notice.
VALIDATION_SUMMARIES = ("Alert", "Workflow Validation", "Workflow Links Fixed")
# What the frontend shows when something is wrong: dialogs (missing nodes/models, errors in 1.32), alerts,
# and the status notices newer frontends use for missing nodes and model files.
NOTICES = """(roles) => Array.from(document.querySelectorAll(roles.map(r => `[role=${r}]`).join(',')))
  .filter(e => e.getClientRects().length > 0 && e.innerText.trim()).map(e => e.innerText.trim().slice(0, 400))"""
LOAD_NOTICE_ROLES = ["dialog", "alertdialog", "alert", "status"]
RUN_NOTICE_ROLES = ["dialog", "alertdialog", "alert"]     # "1 job completed" may be a status
# Test-only: queue the graph with every Empty Latent Image at a small size (the graph itself keeps 512), and
# a T5 text-encoder loader replaced by ComfyUI's T5-less SD3 text path (workflow_utils.flow_stand_in_text,
# whose node lists it is given).
SHRINK_QUEUED_PROMPT = """
({size, t5Loaders, standIn}) => {
  const toPrompt = app.graphToPrompt.bind(app);
  app.graphToPrompt = async (...args) => {
    const prompt = await toPrompt(...args);
    for (const node of Object.values(prompt.output)) {
      if (node.class_type === 'EmptyLatentImage' || node.class_type === 'EmptySD3LatentImage') {
        node.inputs.width = size; node.inputs.height = size;
      }
      if (t5Loaders.includes(node.class_type)) {
        node.class_type = standIn.class_type;
        node.inputs = {...standIn.inputs};
      }
    }
    return prompt;
  };
}
"""


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            pytest.fail(f"{CHROMIUM} is missing and there is no apt-get to install Debian's chromium package")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, timeout=900,
                       stdout=subprocess.DEVNULL)
    assert CHROMIUM.exists()
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def ui(host, user_models):
    """The host with the UI settings of a returning user and the models the workflows name."""
    host.request("/settings", UI_SETTINGS)
    return host


class UiPage:
    """One fresh browser page on the ComfyUI web UI, recording what goes wrong after it has booted."""

    def __init__(self, browser, host):
        self.host = host
        self.context = browser.new_context(viewport=VIEWPORT)
        self.context.add_init_script(INIT_SCRIPT)
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.problems: list[str] = []
        self.watching = False
        self.page.on("pageerror", lambda error: self._problem(f"page error: {error}"))
        self.page.on("console", self._console)
        self.page.on("response", self._response)
        self.page.goto(host.url)
        self.page.wait_for_function("() => window.app?.graph && window.app.__turboHooked && "
                                    "Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 100")
        self.watching = True      # the frontend's own first-boot noise (no user.css etc.) is not ours

    def _problem(self, text):
        if self.watching:
            self.problems.append(text)

    def _console(self, message):
        # Requests to outside hosts (the frontend asks the Comfy Registry about node packs) fail on a closed
        # network; local failures are caught from the responses instead.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self._problem(f"console error: {message.text}")

    def _response(self, response):
        if response.url.startswith(self.host.url) and response.status >= 400:
            if UPDATE_GALLERY and response.url.startswith(f"{self.host.url}/api/workflow_templates/") \
                    and response.url.endswith(".jpg"):
                return        # the thumbnails this run is making
            self._problem(f"HTTP {response.status} {response.url}")

    def evaluate(self, script, arg=None):
        return self.page.evaluate(script, arg)

    def notices(self, roles=tuple(LOAD_NOTICE_ROLES)) -> list[str]:
        return self.evaluate(NOTICES, list(roles))

    def toasts(self) -> list[dict]:
        """Every toast raised since the page booted: {severity, summary, detail}."""
        return self.evaluate("() => window.__turboToasts")

    def validation_problems(self) -> list[str]:
        """What the frontend's workflow validation reported (schema errors, repaired links), and any
        other warning or error toast."""
        return [f"{t['severity']} {t['summary']}: {t['detail'][:2000]}" for t in self.toasts()
                if t["summary"] in VALIDATION_SUMMARIES or t["severity"] in ("warn", "error")]

    def open_template(self, name):
        """Templates dialog -> the pack's category -> the workflow's card, as a user picks it."""
        self.evaluate("() => { window.__turboToasts = []; }")      # only what this load raises counts
        self.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        dialog = self.page.locator("[role=dialog]").filter(has_text="Templates")
        dialog.get_by_text(PACK_DIR_NAME, exact=True).first.click()
        dialog.get_by_text(name, exact=True).first.click()
        self.page.wait_for_function("(name) => window.__turboLoaded.includes(name)", arg=name)
        dialog.wait_for(state="detached")
        self.page.wait_for_load_state("networkidle")    # the frontend's model checks have answered

    def load(self, workflow, name):
        self.evaluate("() => { window.__turboToasts = []; }")
        self.evaluate("async ([wf, name]) => { await app.loadGraphData(wf, true, true, name); }", [workflow, name])
        self.page.wait_for_load_state("networkidle")

    def close(self):
        self.context.close()


@pytest.fixture
def ui_page(browser, ui):
    page = UiPage(browser, ui)
    yield page
    page.close()


GRAPH_BOX = """() => {
  const {scale, offset} = app.canvas.ds, title = LiteGraph.NODE_TITLE_HEIGHT + 20;
  const box = [Infinity, Infinity, -Infinity, -Infinity];
  for (const n of app.graph.nodes) {
    box[0] = Math.min(box[0], n.pos[0]); box[1] = Math.min(box[1], n.pos[1] - title);
    box[2] = Math.max(box[2], n.pos[0] + n.size[0]); box[3] = Math.max(box[3], n.pos[1] + n.size[1]);
  }
  return [(box[0] + offset[0]) * scale, (box[1] + offset[1]) * scale,
          (box[2] + offset[0]) * scale, (box[3] + offset[1]) * scale].map(Math.round);
}"""


def _save_screenshot(png: bytes, name: str, graph_box: list[int]) -> None:
    """A palette PNG (a third of the size); on request also the gallery copy and the template thumbnail."""
    with Image.open(io.BytesIO(png)) as shot:
        shot = shot.convert("RGB")
        small = shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        for folder in [SCREENSHOTS] + ([GALLERY] if UPDATE_GALLERY else []):
            folder.mkdir(parents=True, exist_ok=True)
            small.save(folder / f"{name}.png", optimize=True)
        if UPDATE_GALLERY:
            # The Templates dialog shows a square card: the graph alone, centred on the canvas colour.
            left, top, right, bottom = graph_box
            graph = shot.crop((max(left - 12, 0), max(top - 12, 0), min(right + 12, shot.width),
                               min(bottom + 12, shot.height)))
            side = max(graph.size)
            card = Image.new("RGB", (side, side), shot.getpixel((shot.width // 2, shot.height - 120)))
            card.paste(graph, ((side - graph.width) // 2, (side - graph.height) // 2))
            card.resize((400, 400), Image.LANCZOS).save(REPO / "workflows" / f"{name}.jpg", quality=85, optimize=True)


def _wait_for_history(host, prompt_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = host.history(prompt_id)
        if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
            return entry
        assert host.alive(), host.log_tail()
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{host.log_tail()}")


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_and_runs_in_the_web_ui(ui_page, name):
    page, workflow, api = ui_page, load_ui(name), load_api_twin(name)

    page.open_template(name)
    assert page.evaluate("() => app.extensionManager.setting.get('Comfy.Validation.Workflows')") is True
    assert page.validation_problems() == []          # the frontend's own schema check passed
    assert page.notices() == []
    loaded = page.evaluate("() => app.graph.nodes.map(n => [String(n.id), n.type, !!n.has_errors])")
    assert sorted(loaded) == sorted([str(node["id"]), node["type"], False] for node in workflow["nodes"])
    # The frontend's own conversion of the opened graph is the API twin, titles included.
    assert page.evaluate("async () => (await app.graphToPrompt()).output") == api
    if is_live(api):
        run_live_workflow(page, name, api)
        _save_screenshot(page.page.screenshot(), name, page.evaluate(GRAPH_BOX))
        stop_live(page)
        session, deadline = node_of(api, "TurboLiveOutput")["inputs"]["session"], time.monotonic() + 30
        while page.host.get_json("/comfy-turbo/live")["sessions"] and time.monotonic() < deadline:
            time.sleep(0.2)                                 # Stop ended the session on the server
        assert page.host.get_json("/comfy-turbo/live")["sessions"] == 0, session
        assert page.problems == []
        return

    page.evaluate(SHRINK_QUEUED_PROMPT, {"size": TEST_SIZE, "t5Loaders": list(T5_TEXT_LOADERS),
                                         "standIn": FLOW_STAND_IN_TEXT_LOADER})
    with page.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as sent:
        page.page.get_by_role("button", name="Run", exact=True).first.click()
    queued = sent.value.json()
    assert queued.get("node_errors") in ({}, None), queued
    entry = _wait_for_history(page.host, queued["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]

    save_id = next(k for k, n in api.items() if n["class_type"] == "SaveImage")
    latents = [n for n in api.values() if n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage")]
    batch = latents[0]["inputs"]["batch_size"] if latents else 1
    assert len(entry["outputs"][save_id]["images"]) == batch
    # The web UI received the result and shows every image on the Save Image node.
    page.page.wait_for_function(
        "([id, n]) => { const imgs = app.graph.getNodeById(id)?.imgs;"
        " return imgs?.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        arg=[int(save_id), batch])
    widths = page.evaluate(f"() => app.graph.getNodeById({int(save_id)}).imgs.map(i => i.naturalWidth)")
    upscale = math.prod(n["inputs"]["scale_by"] for n in api.values() if n["class_type"] == "ImageScaleBy")
    assert widths == [round(TEST_SIZE * upscale)] * batch
    assert page.notices(RUN_NOTICE_ROLES) == []
    assert page.problems == []

    page.evaluate("() => new Promise(r => { app.graph.setDirtyCanvas(true, true); requestAnimationFrame(() => r()); })")
    _save_screenshot(page.page.screenshot(), name, page.evaluate(GRAPH_BOX))


def _broken(node_type=None, model=None) -> dict:
    workflow = load_ui("turbo_txt2img")
    if node_type:
        next(n for n in workflow["nodes"] if n["type"] == "TurboScheduler")["type"] = node_type
    if model:
        loader = next(n for n in workflow["nodes"] if n["type"] == "TurboCheckpointLoader")
        loader["widgets_values"][0] = model
        loader["properties"]["models"] = [{"name": model, "directory": "checkpoints",
                                           "url": f"https://huggingface.co/example/none/resolve/main/{model}"}]
    return workflow


@pytest.mark.parametrize("broken", [{"node_type": "TurboNoSuchNode"}, {"model": "not_downloaded_turbo.safetensors"}],
                         ids=["missing-node", "missing-model"])
def test_a_missing_node_or_model_file_is_noticed(ui_page, broken):
    """The checks above can fail: the frontend reports an unknown node type and an absent model file."""
    ui_page.load(_broken(**broken), "broken")
    missing = next(iter(broken.values()))
    ui_page.page.wait_for_function(
        f"() => ({NOTICES})({json.dumps(LOAD_NOTICE_ROLES)}).some(t => t.includes({json.dumps(missing)}))")


def _broken_structure(kind: str) -> dict:
    workflow = load_ui("turbo_txt2img")
    if kind == "node-without-position":
        del workflow["nodes"][0]["pos"]
    elif kind == "link-with-five-fields":
        workflow["links"][0] = workflow["links"][0][:5]
    elif kind == "link-its-target-does-not-hold":       # the target's input forgot the link: a stale link
        _, _, _, target, slot, _ = workflow["links"][0]
        next(n for n in workflow["nodes"] if n["id"] == target)["inputs"][slot]["link"] = None
    return workflow


@pytest.mark.parametrize("kind, reported", [
    ("node-without-position", "Invalid workflow against zod schema"),
    ("link-with-five-fields", "Invalid workflow against zod schema"),
    ("link-its-target-does-not-hold", "Workflow Validation"),
])
def test_the_frontends_validation_catches_a_broken_workflow(ui_page, kind, reported):
    """The schema check above can fail: the frontend's validator reports a broken file (a schema error as
    an alert, a link it must repair as a warning), and validation_problems() sees it."""
    ui_page.load(_broken_structure(kind), "broken")
    problems = ui_page.validation_problems()
    assert any(reported in problem for problem in problems), (kind, ui_page.toasts())
