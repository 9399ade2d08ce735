"""The shipped workflows (workflows/*.json and their API twins) against a real ComfyUI server.

Every UI workflow agrees with the live /object_info (the frontend's own schema validation of each
one is in tests/test_browser.py); the server lists them as templates; every API twin runs to an image
on the small random-weight models (at 128 px instead of the committed 512); LoRA, ControlNet and TAESD
change what they should. Plus the Comfy Registry packaging: pyproject.toml, LICENSE, .comfyignore and a
pack that imports nothing beyond ComfyUI.
"""
from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from comfy_host import PACK_DIR_NAME
from workflow_utils import (MODEL_LOADERS, TEST_SIZE, UI_DIR, USER_MODEL_STAND_INS, flow_stand_in_text, gallery_names,
                            gallery_names_by_checkpoint, live_names, load_api_twin, load_ui, node_of, png_pixels,
                            png_size, sampling_steps, shrink)

REPO = Path(__file__).resolve().parents[1]
NAMES = gallery_names()
BUILT_WITH_COMFYUI = "0.3.75"     # the ComfyUI whose /object_info the committed UI files were built from
FRONTEND_ONLY_NODES = {"MarkdownNote", "Note"}      # registered by the web UI itself; the browser test loads them
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODEL_URL = re.compile(r"https://(huggingface\.co/[\w.-]+/[\w.-]+/resolve/main/|github\.com/madebyollin/taesd/raw/main/)"
                       r"[\w./-]+\.(safetensors|pth)")


def test_the_gallery_has_every_workflow_of_the_issue():
    assert NAMES == sorted([
        "turbo_txt2img", "turbo_txt2img_sd", "turbo_img2img", "turbo_lora_stack", "turbo_controlnet_canny",
        "turbo_taesd_fast_decode", "turbo_taesdxl_fast_decode", "turbo_4step_quality", "turbo_batch4",
        "turbo_hires_fix", "turbo_inpaint", "turbo_live_txt2img", "turbo_live_webcam", "turbo_live_paint",
        # the other few-step families (issue 20)
        "turbo_lightning", "turbo_dmd2", "turbo_hyper_sd_tcd", "turbo_lcm_lora", "turbo_sd35_large_turbo",
        "turbo_flux_schnell"])
    assert sorted(p.name for p in (UI_DIR / "api").glob("*.json")) == sorted(f"{n}_api.json" for n in NAMES)


# --- the UI files -----------------------------------------------------------------------------

def _inputs(node_def):
    """(name, type, options) of every input of a node definition, in the frontend's order."""
    out = []
    for section in ("required", "optional"):
        specs = node_def["input"].get(section, {})
        for name in node_def.get("input_order", {}).get(section, list(specs)):
            kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {}) or {}
            if isinstance(kind, list):
                kind, options = "COMBO", {**options, "options": kind}
            out.append((name, kind, options, section))
    return out


def _widgets(node_def):
    """The frontend's widgets for a node definition, in widgets_values order."""
    widgets = []
    for name, kind, options, _ in _inputs(node_def):
        if kind in WIDGET_TYPES and not options.get("forceInput"):
            widgets.append((name, kind, options))
            if kind == "INT" and options.get("control_after_generate"):
                widgets.append((f"{name} (control after generate)", "CONTROL", {}))
            if options.get("image_upload"):
                widgets.append((f"{name} (upload)", "UPLOAD", {}))
    return widgets


def _widget_problem(kind, options, value):
    if kind == "COMBO":
        return None if value in options["options"] else f"{value!r} is not one of {options['options'][:8]}"
    if kind == "CONTROL":
        return None if value in CONTROL_VALUES else f"{value!r} is not a control mode"
    if kind == "UPLOAD":
        return None
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{value!r} is not an integer"
    if kind == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{value!r} is not a number"
    if not options.get("min", value) <= value <= options.get("max", value):
        return f"{value} is outside [{options.get('min')}, {options.get('max')}]"
    if kind == "INT" and options.get("step", 1) > 1 and value % options["step"]:
        return f"{value} is not a multiple of the step {options['step']}"
    return None


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_agrees_with_live_object_info(host, user_models, name):
    """Node types exist, sockets and widgets are the server's, values are in range, links connect types."""
    info = host.object_info()
    workflow = load_ui(name)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    problems = []
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY_NODES:
            continue
        if node["type"] not in info:
            problems.append(f"{where}: /object_info has no such node")
            continue
        node_def = info[node["type"]]
        inputs = {name: (kind, options, section) for name, kind, options, section in _inputs(node_def)}
        widgets = _widgets(node_def)
        # Sockets: the definition's connection inputs, and widgets turned into sockets.
        for slot in node.get("inputs", []):
            if slot["name"] not in inputs:
                problems.append(f"{where}: input {slot['name']} is not in the definition")
            elif slot["type"] != inputs[slot["name"]][0]:
                problems.append(f"{where}: input {slot['name']} is {slot['type']}, the server says "
                                f"{inputs[slot['name']][0]}")
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for input_name, (kind, options, section) in inputs.items():
            is_socket = kind not in WIDGET_TYPES or options.get("forceInput")
            if is_socket and section == "required" and input_name not in linked:
                problems.append(f"{where}: required input {input_name} is not connected")
        # Outputs, in the server's order (a newer ComfyUI may append outputs; links use slot indices).
        served_outputs = list(zip(node_def["output_name"], node_def["output"]))
        got_outputs = [(slot["name"], slot["type"]) for slot in node.get("outputs", [])]
        if got_outputs != served_outputs[:len(got_outputs)]:
            problems.append(f"{where}: outputs {got_outputs}, the server has {served_outputs}")
        # Widget values.
        values = node.get("widgets_values", [])
        if len(values) != len(widgets):
            problems.append(f"{where}: {len(values)} widget values for widgets {[w[0] for w in widgets]}")
            continue
        for (widget, kind, options), value in zip(widgets, values):
            if widget in linked:
                continue       # the linked value is what runs
            problem = _widget_problem(kind, options, value)
            if problem:
                problems.append(f"{where}: {widget}: {problem}")
        # The frontend only checks `models` entries whose name is one of the node's widget values.
        for entry in node["properties"].get("models", []):
            if entry["name"] not in values:
                problems.append(f"{where}: models entry {entry['name']} names no widget value")
    # Links: both ends agree, and the types match the server's output type.
    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        source, sink = nodes.get(origin), nodes.get(target)
        if source is None or sink is None:
            problems.append(f"link {link_id}: node {origin} or {target} does not exist")
            continue
        out_slot, in_slot = source["outputs"][origin_slot], sink["inputs"][target_slot]
        if link_id not in (out_slot.get("links") or []) or in_slot.get("link") != link_id:
            problems.append(f"link {link_id}: the nodes do not record it at both ends")
        served_type = info[source["type"]]["output"][origin_slot]
        if not link_type == out_slot["type"] == in_slot["type"] == served_type:
            problems.append(f"link {link_id}: {source['type']}.{out_slot['name']} ({served_type}) -> "
                            f"{sink['type']}.{in_slot['name']} ({in_slot['type']}), link says {link_type}")
    recorded = {slot["link"] for node in nodes.values() for slot in node.get("inputs", []) if slot.get("link")}
    if recorded != {link[0] for link in workflow["links"]}:
        problems.append(f"inputs record links {sorted(recorded)}, the link table has others")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_every_model_a_workflow_names_has_a_public_download(name):
    workflow = load_ui(name)
    entries = [e for node in workflow["nodes"] for e in node["properties"].get("models", [])]
    entries += workflow.get("models", [])
    assert entries, "a workflow that names no model file cannot be downloaded for"
    for entry in entries:
        assert MODEL_URL.fullmatch(entry["url"]), entry
        assert (entry["directory"], entry["name"]) in USER_MODEL_STAND_INS, entry
    loaders = [n for n in workflow["nodes"] if n["type"] in MODEL_LOADERS]
    assert loaders and all(n["properties"].get("models") for n in loaders)


def _graph(workflow: dict, output_counts: dict | None = None) -> dict:
    """A workflow without its layout (positions, sizes, order), outputs cut to the given counts."""
    graph = json.loads(json.dumps(workflow))
    for node in graph["nodes"]:
        for key in ("pos", "size", "order"):
            node.pop(key)
        if output_counts is not None:
            extra = node["outputs"][output_counts[node["id"]]:]
            assert all(not slot["links"] for slot in extra), node
            node["outputs"] = node["outputs"][:output_counts[node["id"]]]
    return graph


def test_ui_files_are_what_the_builder_makes_from_the_api_twins(host):
    """workflows/*.json == scripts/build_workflows.py applied to the API twins and the live /object_info.

    The layout is compared where the server is the ComfyUI the files were built with (0.3.75); a newer
    one may add outputs to core nodes (0.33's Save Image has one), which moves nothing else.
    """
    import build_workflows
    built = build_workflows.build_all(host.object_info())
    assert sorted(built) == NAMES
    version = host.get_json("/system_stats")["system"]["comfyui_version"]
    stale = []
    for name, workflow in built.items():
        committed = load_ui(name)
        if version == BUILT_WITH_COMFYUI:
            same = build_workflows.dumps(workflow) == (UI_DIR / f"{name}.json").read_text()
        else:
            counts = {node["id"]: len(node["outputs"]) for node in committed["nodes"]}
            same = _graph(workflow, counts) == _graph(committed)
        if not same:
            stale.append(name)
    assert not stale, f"out of date, run scripts/build_workflows.py: {stale}"


def test_the_builder_refuses_a_link_between_mismatched_types(host):
    import build_workflows
    api = load_api_twin("turbo_txt2img")
    api["6"]["inputs"]["vae"] = ["1", 1]            # CLIP into VAE Decode's vae
    with pytest.raises(TypeError, match="CLIP"):
        build_workflows.build_ui(build_workflows.SPEC_BY_NAME["turbo_txt2img"], api, host.object_info())


# --- served by the running server -------------------------------------------------------------

def test_server_lists_every_ui_workflow_as_a_template(host):
    listing = host.get_json("/api/workflow_templates")
    assert sorted(listing.get(PACK_DIR_NAME, [])) == NAMES        # API twins (workflows/api/) are not listed
    for name in NAMES:
        served = host.get_json(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
        assert served == load_ui(name)
        thumbnail = host.request(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg")   # the dialog's card
        assert thumbnail.startswith(b"\xff\xd8\xff") and len(thumbnail) < 100_000


def test_server_parses_our_pyproject_without_complaint(host):
    assert "Unable to parse pyproject.toml" not in host.log_path.read_text()


# --- the API twins, run ---------------------------------------------------------------------

def _run(host, prompt, prefix):
    for node in prompt.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = prefix
    result = host.run(prompt)
    assert result.status == "success", result.error
    return result


def _pixels(host, prompt, prefix) -> list[bytes]:
    return [png_pixels(host.view(image)) for image in _run(host, prompt, prefix).images()]


def _check_twin_run(host, name, prompt):
    """Run a (shrunk) API twin: one image per latent in the batch at the test size, as many steps as it asks."""
    result = _run(host, prompt, f"test/workflows/{name}")
    images = result.images()
    latents = [n for n in prompt.values() if n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage")]
    assert len(images) == (latents[0]["inputs"]["batch_size"] if latents else 1)
    for image in images:
        assert png_size(host.view(image)) == (TEST_SIZE, TEST_SIZE)
    steps = {e["data"]["max"] for e in result.events if e["type"] == "progress"}
    assert steps == {sampling_steps(prompt)}
    pixels = [png_pixels(host.view(image)) for image in images]
    assert len(set(pixels)) == len(pixels), "the images of a batch have their own noise"
    return pixels


# The LoRA, ControlNet and TAESD twins run first thing in their own tests below, right before their
# variants, so the server patches the LoRAs / loads the ControlNet once. The order keeps consecutive
# prompts on one checkpoint (SD-Turbo, SDXL-Turbo, then its LoRA, ControlNet and TAESDXL, then TAESD).
# The live twins send their image to a live client, not a file: tests/test_live_server.py runs them. The
# hires fix (two passes, twice the size) runs in tests/test_reach.py.
RUN_IN_OWN_TEST = ("turbo_lora_stack", "turbo_controlnet_canny", "turbo_taesdxl_fast_decode",
                   "turbo_taesd_fast_decode", "turbo_hires_fix", *live_names())


@pytest.mark.parametrize("name", [n for n in gallery_names_by_checkpoint() if n not in RUN_IN_OWN_TEST])
def test_api_twin_runs_to_an_image(host, user_models, name):
    _check_twin_run(host, name, shrink(flow_stand_in_text(load_api_twin(name))))


def test_stacked_loras_each_change_the_output_and_strength_zero_does_not(host, user_models):
    prompt = shrink(load_api_twin("turbo_lora_stack"))
    assert [prompt["10"]["class_type"], prompt["11"]["class_type"]] == ["LoraLoader", "LoraLoader"]
    assert prompt["11"]["inputs"]["model"] == ["10", 0] and prompt["5"]["inputs"]["model"] == ["11", 0]

    def with_strengths(first, second):
        p = copy.deepcopy(prompt)
        p["10"]["inputs"].update(strength_model=first, strength_clip=first)
        p["11"]["inputs"].update(strength_model=second, strength_clip=second)
        return p

    both = _check_twin_run(host, "turbo_lora_stack", prompt)
    first_only = _pixels(host, with_strengths(prompt["10"]["inputs"]["strength_model"], 0.0), "test/lora/first")
    none = _pixels(host, with_strengths(0.0, 0.0), "test/lora/zero")
    without = copy.deepcopy(prompt)                 # the same graph with no LoRA nodes at all
    del without["10"], without["11"]
    for node_id, socket, slot in (("2", "clip", 1), ("4", "model", 0), ("5", "model", 0)):
        without[node_id]["inputs"][socket] = ["1", slot]
    plain = _pixels(host, without, "test/lora/none")

    assert both != first_only          # the second LoRA changes the image
    assert first_only != none          # so does the first
    assert none == plain               # at strength 0 both leave it exactly as without LoRAs


def test_controlnet_changes_the_output_and_strength_zero_does_not(host, user_models):
    prompt = shrink(load_api_twin("turbo_controlnet_canny"))
    apply = node_of(prompt, "ControlNetApplyAdvanced")["inputs"]
    assert apply["strength"] > 0 and prompt["5"]["inputs"]["positive"] == ["14", 0]
    controlled = _check_twin_run(host, "turbo_controlnet_canny", prompt)
    off = copy.deepcopy(prompt)
    off["14"]["inputs"]["strength"] = 0.0
    zero = _pixels(host, off, "test/controlnet/zero")
    without = copy.deepcopy(prompt)
    for node_id in ("8", "12", "13", "14"):
        del without[node_id]
    without["5"]["inputs"]["positive"] = ["2", 0]
    plain = _pixels(host, without, "test/controlnet/none")
    assert controlled != zero
    assert zero == plain


@pytest.mark.parametrize("name", ["turbo_taesdxl_fast_decode", "turbo_taesd_fast_decode"])
def test_fast_decode_uses_taesd_not_the_checkpoint_vae(host, user_models, name):
    prompt = shrink(load_api_twin(name))
    assert node_of(prompt, "VAEDecode")["inputs"]["vae"] == ["15", 0]
    fast = _check_twin_run(host, name, prompt)
    full = copy.deepcopy(prompt)
    full["6"]["inputs"]["vae"] = ["1", 2]
    assert fast != _pixels(host, full, f"test/{name}/full")


# --- Comfy Registry packaging -------------------------------------------------------------------

def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_is_ready_for_the_comfy_registry():
    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([._-][A-Za-z0-9]+)*", name)
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"]
    assert project["license"] == {"file": "LICENSE"}
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert project["requires-python"].startswith(">=")
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    icon = comfy["Icon"]
    raw = project["urls"]["Repository"].replace("https://github.com/", "https://raw.githubusercontent.com/")
    assert icon.startswith(raw + "/main/"), "the icon is served from the repository"
    assert (REPO / icon.removeprefix(raw + "/main/")).is_file()


def test_comfyui_reads_our_pyproject_as_we_mean_it():
    """ComfyUI's own parser (comfy_config, also used at node load) sees the registry fields."""
    from conftest import comfyui_path
    if str(comfyui_path()) not in sys.path:
        sys.path.insert(0, str(comfyui_path()))
    from comfy_config import config_parser
    config = config_parser.extract_node_configuration(str(REPO))
    data = _pyproject()
    assert config.project.name == data["project"]["name"]
    assert config.project.version == data["project"]["version"]
    assert config.project.license.file == "LICENSE"
    assert config.project.dependencies == []
    assert config.project.supported_comfyui_version == data["tool"]["comfy"]["requires-comfyui"]
    assert config.tool_comfy.publisher_id == data["tool"]["comfy"]["PublisherId"]
    assert config.tool_comfy.display_name == data["tool"]["comfy"]["DisplayName"]


# ComfyUI's own top-level modules a node may use (its core nodes module and server included), and torch.
COMFYUI_MODULES = {"folder_paths", "latent_preview", "node_helpers", "nodes", "server", "protocol", "execution"}
# Packages ComfyUI itself requires (its requirements.txt name -> import name), which the live routes use.
COMFYUI_REQUIREMENTS = {"numpy": "numpy", "Pillow": "PIL", "aiohttp": "aiohttp"}


def _pack_sources():
    return [REPO / "__init__.py", REPO / "extension.py", *sorted((REPO / "nodes").glob("*.py")),
            *sorted((REPO / "samplers").glob("*.py")), *sorted((REPO / "live").glob("*.py"))]


def test_pack_needs_nothing_beyond_comfyui():
    """No runtime dependency: the pack imports only the stdlib, torch, ComfyUI's own modules and packages that
    ComfyUI's requirements.txt lists."""
    assert _pyproject()["project"]["dependencies"] == []
    from conftest import comfyui_path
    assert all((comfyui_path() / f"{module}.py").is_file() for module in COMFYUI_MODULES)
    required = {re.split(r"[<>=~! ]", line.strip())[0]
                for line in (comfyui_path() / "requirements.txt").read_text().splitlines() if line.strip()}
    assert set(COMFYUI_REQUIREMENTS) <= required
    foreign = []
    for path in _pack_sources():
        for stmt in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(stmt, ast.Import):
                modules = [alias.name for alias in stmt.names]
            elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0:
                modules = [stmt.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if not (top in sys.stdlib_module_names or top == "torch" or top in COMFYUI_MODULES
                        or top in COMFYUI_REQUIREMENTS.values() or top.startswith("comfy")):
                    foreign.append(f"{path.relative_to(REPO)}: {module}")
    assert len(_pack_sources()) >= 8
    assert not foreign, foreign


def _git(*args) -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line]


def test_comfyignore_leaves_out_everything_not_needed_at_run_time():
    """What `comfy node publish` uploads: the repository's files minus .comfyignore (gitignore patterns).

    comfy-cli packs the git-tracked files; untracked, not git-ignored files count too here, so a new
    file is judged before its first commit.
    """
    files = set(_git("ls-files", "--cached", "--others", "--exclude-standard"))
    ignored = files & set(_git("ls-files", "--cached", "--others", "--ignored", "--exclude-from=.comfyignore"))
    published = files - ignored
    needed = {"__init__.py", "extension.py", "pyproject.toml", "LICENSE", "README.md"}
    needed |= {str(p.relative_to(REPO)) for p in _pack_sources()}
    needed |= {f"workflows/{n}.json" for n in NAMES} | {f"workflows/api/{n}_api.json" for n in NAMES}
    needed |= {str(p.relative_to(REPO)) for p in (REPO / "web").rglob("*.js")}
    needed |= {str(p.relative_to(REPO)) for p in (REPO / "web" / "docs").glob("*.md")}     # node help pages
    assert any(f.startswith("web/docs/") for f in needed)
    assert needed <= published, f"left out but needed: {sorted(needed - published)}"
    dev_only = ("tests/", "scripts/", "docs/", ".ci/", "bench/", ".github/")
    assert not [f for f in published if f.startswith(dev_only)]
    assert any(f.startswith("tests/") for f in ignored) and any(f.startswith("scripts/") for f in ignored)
