"""Build the UI-format workflows in workflows/ from their API twins in workflows/api/.

The API twins (``workflows/api/<name>_api.json``) are the source of truth: what the server runs.
This script turns each into the graph a user opens in ComfyUI's web UI (``workflows/<name>.json``,
workflow format 0.4), using the live server's ``/object_info`` for every node's sockets, widgets
and their order, so the two can never drift apart. It adds what only the UI has: a layout, node
titles, a Markdown note with the model downloads, and the frontend's ``models`` metadata (file
name, public URL, models/ folder) that its missing-models dialog reads.

    python scripts/build_workflows.py            # start a bare ComfyUI, rewrite workflows/*.json
    python scripts/build_workflows.py --check    # exit 1 if a committed file is out of date
    python scripts/build_workflows.py --url http://127.0.0.1:8188   # use a running server

Run it through the project environment (``source scripts/env.sh; "$COMFY_TURBO_PY" scripts/...``).
The tests call ``build_all(object_info)`` against their live server and compare with the files.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tomllib
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS_DIR = REPO / "workflows"
API_DIR = WORKFLOWS_DIR / "api"

# Every model file a workflow names: (models/ folder, file name) -> public download URL.
MODEL_SOURCES = {
    ("checkpoints", "sd_turbo.safetensors"):
        "https://huggingface.co/stabilityai/sd-turbo/resolve/main/sd_turbo.safetensors",
    ("checkpoints", "sd_xl_turbo_1.0_fp16.safetensors"):
        "https://huggingface.co/stabilityai/sdxl-turbo/resolve/main/sd_xl_turbo_1.0_fp16.safetensors",
    ("loras", "toy_face_sdxl.safetensors"):
        "https://huggingface.co/CiroN2022/toy-face/resolve/main/toy_face_sdxl.safetensors",
    ("loras", "pixel-art-xl.safetensors"):
        "https://huggingface.co/nerijs/pixel-art-xl/resolve/main/pixel-art-xl.safetensors",
    ("controlnet", "controlnet-canny-sdxl-1.0.fp16.safetensors"):
        "https://huggingface.co/diffusers/controlnet-canny-sdxl-1.0/resolve/main/diffusion_pytorch_model.fp16.safetensors",
    ("vae_approx", "taesd_encoder.pth"): "https://github.com/madebyollin/taesd/raw/main/taesd_encoder.pth",
    ("vae_approx", "taesd_decoder.pth"): "https://github.com/madebyollin/taesd/raw/main/taesd_decoder.pth",
    ("vae_approx", "taesdxl_encoder.pth"): "https://github.com/madebyollin/taesd/raw/main/taesdxl_encoder.pth",
    ("vae_approx", "taesdxl_decoder.pth"): "https://github.com/madebyollin/taesd/raw/main/taesdxl_decoder.pth",
    # The other few-step families (issue 20)
    ("checkpoints", "sd_xl_base_1.0.safetensors"):
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    ("checkpoints", "sdxl_lightning_4step.safetensors"):
        "https://huggingface.co/ByteDance/SDXL-Lightning/resolve/main/sdxl_lightning_4step.safetensors",
    ("loras", "dmd2_sdxl_4step_lora.safetensors"):
        "https://huggingface.co/tianweiy/DMD2/resolve/main/dmd2_sdxl_4step_lora.safetensors",
    ("loras", "Hyper-SDXL-1step-lora.safetensors"):
        "https://huggingface.co/ByteDance/Hyper-SD/resolve/main/Hyper-SDXL-1step-lora.safetensors",
    ("loras", "lcm-lora-sdxl.safetensors"):
        "https://huggingface.co/latent-consistency/lcm-lora-sdxl/resolve/main/pytorch_lora_weights.safetensors",
    ("checkpoints", "sd3.5_large_turbo.safetensors"):
        "https://huggingface.co/stabilityai/stable-diffusion-3.5-large-turbo/resolve/main/sd3.5_large_turbo.safetensors",
    ("text_encoders", "clip_g.safetensors"):
        "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/resolve/main/text_encoders/clip_g.safetensors",
    ("text_encoders", "clip_l.safetensors"):
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
    ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"):
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn.safetensors",
    ("diffusion_models", "flux1-schnell.safetensors"):
        "https://huggingface.co/black-forest-labs/FLUX.1-schnell/resolve/main/flux1-schnell.safetensors",
    ("vae", "ae.safetensors"): "https://huggingface.co/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors",
}

# Which widget of which loader names a file in which models/ folder.
MODEL_WIDGETS = {
    ("TurboCheckpointLoader", "ckpt_name"): "checkpoints",
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("VAELoader", "vae_name"): "vae",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("TripleCLIPLoader", "clip_name1"): "text_encoders",
    ("TripleCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name3"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
}
# VAELoader's TAESD entries are not files: each needs an encoder and a decoder in models/vae_approx.
TAESD_FILES = {name: [f"{name}_encoder.pth", f"{name}_decoder.pth"] for name in ("taesd", "taesdxl")}

# Nodes the frontend provides itself (no /object_info entry, dropped from the API prompt).
FRONTEND_ONLY_NODES = {"MarkdownNote", "Note"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_ID = 100


TURBO_LICENCE = ("Stability AI's Turbo weights are under their non-commercial community licence; "
                 "read it on the model page first.")
FAMILY_GRAPH = [["note", "1"], ["2", "3", "4"], ["5", "6", "7"], ["8", "9"]]
FAMILY_LORA_GRAPH = [["note", "1", "10"], ["2", "3", "4"], ["5", "6", "7"], ["8", "9"]]
FAMILY_SAMPLING = ("*Turbo Family Schedule* gives the family's sigmas, its sampler and the model; *Basic Guider* "
                   "(no negative prompt, no CFG) and *SamplerCustomAdvanced* run them, one model call per step.")


@dataclass
class Spec:
    """What the UI file adds to an API twin."""
    name: str
    title: str
    about: str                     # Markdown, first part of the note
    layout: list = field(default_factory=list)   # columns of node ids, left to right
    licence: str = TURBO_LICENCE   # the note's last line


SPECS = [
    Spec("turbo_txt2img", "SDXL-Turbo: text to image in 1 step",
         "One UNet call, no negative prompt, no CFG. *Load Turbo Checkpoint* gives the native size "
         "(512x512) to *Empty Latent Image*.",
         [["note", "1"], ["2", "3", "4"], ["5"], ["6", "7"]]),
    Spec("turbo_txt2img_sd", "SD-Turbo: text to image in 1 step",
         "SD-Turbo (SD 2.1 family) at its native 512x512, one step, Euler (eta 0) as in sd-turbo's "
         "reference scheduler.",
         [["note", "1"], ["2", "3", "4"], ["5"], ["6", "7"]]),
    Spec("turbo_img2img", "SDXL-Turbo: image to image, 2 steps at strength 0.5",
         "*Load Image* -> *VAE Encode* -> *Turbo Sampler*. With steps 2 and strength 0.5 the scheduler "
         "runs int(2 x 0.5) = 1 step at t=499, as diffusers' img2img does. Pick your own image in "
         "*Load Image* (`example.png` ships in ComfyUI's `input/` folder).",
         [["note", "1", "8"], ["2", "9", "4"], ["5"], ["6", "7"]]),
    Spec("turbo_lora_stack", "SDXL-Turbo with two LoRAs stacked",
         "Two core *Load LoRA* nodes in a chain: both patch the model and the text encoder before the "
         "Turbo nodes see them. Set a strength to 0 to switch a LoRA off. Any SDXL LoRA works; "
         "2 steps suit LoRAs better than 1.",
         [["note", "1"], ["10", "11"], ["2", "3", "4"], ["5"], ["6", "7"]]),
    Spec("turbo_controlnet_canny", "SDXL-Turbo with a Canny ControlNet",
         "The core *Canny* node turns the control image into edges; *Apply ControlNet* adds them to "
         "the prompt's conditioning. The Turbo Sampler uses only the positive output (no CFG). "
         "Any SDXL canny ControlNet works.",
         [["note", "1", "8"], ["2", "12", "13"], ["14", "3", "4"], ["5"], ["6", "7"]]),
    Spec("turbo_taesd_fast_decode", "SD-Turbo with fast TAESD decoding",
         "The core *Load VAE* set to `taesd` decodes with the tiny TAESD autoencoder instead of the "
         "full VAE: much faster, slightly softer. Needs both TAESD files in `models/vae_approx`.",
         [["note", "1"], ["2", "3", "4"], ["5"], ["15", "6", "7"]]),
    Spec("turbo_taesdxl_fast_decode", "SDXL-Turbo with fast TAESDXL decoding",
         "The core *Load VAE* set to `taesdxl` decodes with the tiny TAESDXL autoencoder instead of the "
         "full SDXL VAE: much faster, and no fp16 overflow. Needs both TAESDXL files in `models/vae_approx`.",
         [["note", "1"], ["2", "3", "4"], ["5"], ["15", "6", "7"]]),
    Spec("turbo_4step_quality", "SDXL-Turbo: 4 steps for more detail",
         "Four trailing steps (999, 749, 499, 249) with Euler ancestral (eta 1), sdxl-turbo's reference "
         "scheduler. Still one UNet call per step.",
         [["note", "1"], ["2", "3", "4"], ["5"], ["6", "7"]]),
    Spec("turbo_batch4", "SD-Turbo: a batch of 4",
         "*Empty Latent Image* with batch size 4: four images from one queue press, each with its own noise.",
         [["note", "1"], ["2", "3", "4"], ["5"], ["6", "7"]]),
    Spec("turbo_hires_fix", "SDXL-Turbo hires fix: 512, then 2x with a second pass",
         "Turbo models make doubled subjects when asked for 1024 directly. This makes the picture at the native "
         "512x512, upscales it 2x (core *Upscale Image By*, Lanczos; swap in *Load Upscale Model* + *Upscale Image "
         "(using Model)* if you have an upscaler), and redraws it at 1024 with 2 steps at strength 0.5 in "
         "'exact' strength mode (t=499, 249): the composition stays, the detail is new.",
         [["note", "1"], ["2", "3", "4"], ["5", "6"], ["16", "17", "18"], ["19", "20"], ["7"]]),
    Spec("turbo_inpaint", "SDXL-Turbo inpainting",
         "Right-click *Load Image* and choose *Open in MaskEditor*: paint where the picture should change. "
         "*Set Latent Noise Mask* keeps everything outside the mask exactly as it was; inside, 2 steps redraw it "
         "from the prompt. The pack's sampler runs ComfyUI's own masked sampling, one UNet call per step.",
         [["note", "1", "8"], ["2", "9", "21"], ["4", "5"], ["6", "7"]]),
    Spec("turbo_live_txt2img", "Turbo Live: type a prompt and watch (SDXL-Turbo)",
         "Press **Live** in the *Turbo Live* panel (it opens with this graph), then type in its prompt box: "
         "every edit re-runs the graph, edits made while a frame runs fold into one follow-up, and the "
         "image follows as you type. The prompt memo of *Turbo Text Encode* and TAESDXL decoding keep "
         "each frame short. Frames reach the panel over the websocket as JPEG: nothing is saved to disk. "
         "Change anything in the graph while it runs (steps, seed, a LoRA) and the next frame shows it."
         " *Turbo Family Schedule* samples the family set on *Load Turbo Checkpoint* (`from loader`), so any SD 2.x / SDXL few-step model goes live: for a DMD2, Lightning, Hyper-SD or LCM file, set its family on the loader and the steps it supports on the schedule. For a base model with a family's LoRA, name the family on the schedule instead.",
         [["note", "1"], ["2", "3", "4"], ["5", "15"], ["6", "7"]]),
    Spec("turbo_live_webcam", "Turbo Live: webcam image-to-image (SD-Turbo)",
         "Press **Live** in the *Turbo Live* panel and allow the camera: each webcam frame goes to "
         "*Turbo Live Input* in memory (no upload), is encoded with TAESD, denoised in 1 step (steps 2, "
         "strength 0.5: t=499) and shown as it comes back. The newest frame always wins; the panel caps "
         "the frame rate and skips frames almost equal to the last one. Type in the panel's prompt box to "
         "restyle it live."
         " *Turbo Family Schedule* samples the family set on *Load Turbo Checkpoint* (`from loader`), so any SD 2.x / SDXL few-step model goes live: for a DMD2, Lightning, Hyper-SD or LCM file, set its family on the loader and the steps it supports on the schedule. For a base model with a family's LoRA, name the family on the schedule instead.",
         [["note", "1"], ["8", "2", "15"], ["9", "4"], ["5"], ["6", "7"]]),
    Spec("turbo_live_paint", "Turbo Live: paint and watch (SDXL-Turbo)",
         "Press **Live** in the *Turbo Live* panel and paint on its canvas: each stroke sends the canvas "
         "to *Turbo Live Input* and the picture is redrawn in 1 step (steps 2, strength 0.5: t=499). Pick "
         "a colour and brush size in the panel; *Clear* starts over. Type in the prompt box to change "
         "what it paints."
         " *Turbo Family Schedule* samples the family set on *Load Turbo Checkpoint* (`from loader`), so any SD 2.x / SDXL few-step model goes live: for a DMD2, Lightning, Hyper-SD or LCM file, set its family on the loader and the steps it supports on the schedule. For a base model with a family's LoRA, name the family on the schedule instead.",
         [["note", "1"], ["8", "2", "15"], ["9", "4"], ["5"], ["6", "7"]]),
]
SPECS += [
    Spec("turbo_lightning", "SDXL-Lightning: 4 steps",
         "ByteDance's SDXL-Lightning 4-step checkpoint, sampled as its authors do: trailing Euler at 999, 749, "
         "499, 249. *Load Turbo Checkpoint* with family `sdxl-lightning` (the weights cannot say which "
         "distillation they are) gives the native 1024x1024. " + FAMILY_SAMPLING + " For the 1-step checkpoint "
         "set steps to 1: the schedule then patches the model to predict x0, as the authors' scheduler does "
         "(`prediction_type=\"sample\"`). The 2- and 8-step files work the same way.",
         FAMILY_GRAPH, "SDXL-Lightning is under the OpenRAIL++ licence; read it on the model page."),
    Spec("turbo_dmd2", "DMD2: SDXL in 4 steps with the DMD2 LoRA",
         "The SDXL base model with DMD2's 4-step LoRA, sampled as the DMD2 authors do: LCM's sampler at "
         "timesteps 999, 749, 499, 249. " + FAMILY_SAMPLING + " For DMD2's 1-step UNet (t=399), load it with "
         "family `dmd2` and set steps to 1: it starts from unit noise, as diffusers does, where ComfyUI's "
         "own noise scaling would be 24 % too small.",
         FAMILY_LORA_GRAPH, "DMD2's authors release it under a non-commercial, share-alike licence (CC BY-NC-SA "
                            "4.0, in their repository github.com/tianweiy/DMD2); read it before use. The SDXL "
                            "base model is under OpenRAIL++."),
    Spec("turbo_hyper_sd_tcd", "Hyper-SD: SDXL in 1 step with the unified LoRA and TCD",
         "The SDXL base model with Hyper-SD's unified LoRA, sampled as its authors do: the TCD sampler, which "
         "ComfyUI has no core node for. *gamma* is TCD's stochasticity (diffusers' `eta`): -1 keeps the "
         "family's 1.0; use lower values with more steps (1 to 8). " + FAMILY_SAMPLING + " Hyper-SD's 2-, 4- "
         "and 8-step LoRAs take family `hyper-sd` (DDIM trailing) instead.",
         FAMILY_LORA_GRAPH, "Hyper-SD's weights are on ByteDance's model page with their licence; the SDXL "
                            "base model is under OpenRAIL++."),
    Spec("turbo_lcm_lora", "LCM-LoRA: SDXL in 4 steps",
         "The SDXL base model with the LCM-LoRA, on LCM's own timestep grid (19 + 20k: 999, 759, 499, 259 at "
         "4 steps), where the common `sgm_uniform` advice lands elsewhere. " + FAMILY_SAMPLING + " Any SDXL "
         "model works with the LoRA; LCM takes 1 to 8 steps.",
         FAMILY_LORA_GRAPH, "The LCM-LoRA and the SDXL base model are under OpenRAIL++."),
    Spec("turbo_sd35_large_turbo", "SD3.5 Large Turbo: 4 steps",
         "Stability AI's SD3.5 Large Turbo through ComfyUI's own loaders, sampled as Stability's reference does: "
         "flow Euler at shift 3, 4 steps, about 1 megapixel. " + FAMILY_SAMPLING + " The T5-XXL text encoder "
         "in fp8 keeps memory down; `t5xxl_fp16.safetensors` works too.",
         [["note", "1", "11"], ["2", "3", "4"], ["5", "6", "7"], ["8", "9"]],
         "SD3.5 Large Turbo is under Stability AI's community licence; read it on the model page first."),
    Spec("turbo_flux_schnell", "FLUX.1-schnell: 4 steps",
         "Black Forest Labs' FLUX.1-schnell through ComfyUI's own loaders, sampled as its scheduler config says: "
         "flow Euler at shift 1 (no dynamic shift), sigmas 1, 0.75, 0.5, 0.25. " + FAMILY_SAMPLING + " schnell "
         "takes 1 to 4 steps and no guidance.",
         [["note", "1", "11", "12"], ["2", "3", "4"], ["5", "6", "7"], ["8", "9"]],
         "FLUX.1-schnell is under the Apache 2.0 licence."),
]
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}

COLUMN_GAP, ROW_GAP = 50, 70   # a node's title bar (30 px) sits above its position


# --- node definitions -------------------------------------------------------------------------

def input_specs(node_def: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, optional) for every visible input, in the server's order."""
    inputs = node_def["input"]
    order = node_def.get("input_order") or {k: list(v) for k, v in inputs.items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs[section][name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if isinstance(kind, list):
                kind, options = "COMBO", {**options, "options": kind}
            out.append((name, kind, options, section == "optional"))
    return out


def is_widget(kind: str, options: dict) -> bool:
    return kind in WIDGET_TYPES and not options.get("forceInput")


def widget_names(node_def: dict) -> list[str]:
    """The frontend's widgets of a node, in order, as its widgets_values lists them."""
    names = []
    for name, kind, options, _ in input_specs(node_def):
        if not is_widget(kind, options):
            continue
        names.append(name)
        if kind == "INT" and options.get("control_after_generate"):
            names.append(f"{name}:control_after_generate")
        if options.get("image_upload"):
            names.append(f"{name}:upload")
    return names


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# --- the build --------------------------------------------------------------------------------

def pack_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def model_entries(class_type: str, inputs: dict) -> list[dict]:
    """The frontend's ``models`` entries for the files this node's widgets name."""
    entries = []
    for (cls, widget), folder in MODEL_WIDGETS.items():
        if cls != class_type or not isinstance(inputs.get(widget), str):
            continue
        name = inputs[widget]
        if folder == "vae" and name in TAESD_FILES:
            continue  # listed at workflow level: the widget value is not a file name
        url = MODEL_SOURCES.get((folder, name))
        if url is None:
            raise KeyError(f"{class_type}.{widget} names {folder}/{name}: add its download URL to MODEL_SOURCES")
        entries.append({"name": name, "url": url, "directory": folder})
    return entries


def workflow_models(api: dict) -> list[dict]:
    """Every model file the workflow needs: node-level entries, then TAESD pairs."""
    out = []
    for node in api.values():
        out.extend(model_entries(node["class_type"], node["inputs"]))
        if node["class_type"] == "VAELoader" and node["inputs"].get("vae_name") in TAESD_FILES:
            for name in TAESD_FILES[node["inputs"]["vae_name"]]:
                out.append({"name": name, "url": MODEL_SOURCES[("vae_approx", name)], "directory": "vae_approx"})
    return out


def note_text(spec: Spec, api: dict) -> str:
    lines = [f"## {spec.title}", "", spec.about, "", "### Models", ""]
    by_folder: dict[str, list[dict]] = {}
    for entry in workflow_models(api):
        by_folder.setdefault(entry["directory"], []).append(entry)
    for folder, entries in by_folder.items():
        lines.append(f"**models/{folder}/**")
        lines.append("")
        for entry in entries:
            lines.append(f"- [{entry['name']}]({entry['url']})")
        lines.append("")
    lines.append(spec.licence)
    return "\n".join(lines)


def estimate_size(node: dict) -> list[int]:
    """A size no smaller than the frontend's own (LiteGraph grows a node to fit, never shrinks it)."""
    special = {"CLIPTextEncode": [400, 160], "TurboTextEncode": [400, 160], "SaveImage": [380, 420],
               "TurboLiveOutput": [380, 460], "LoadImage": [300, 340],
               "MarkdownNote": [400, 300]}
    if node["type"] in special:
        return list(special[node["type"]])
    sockets = sum(1 for slot in node["inputs"] if "widget" not in slot)
    widgets = len(node["widgets_values"])
    height = 6 + 20 * max(sockets, len(node["outputs"])) + (24 * widgets + 8 if widgets else 0)
    width = max(300, 9 * len(node.get("title", node["type"])) + 40)
    return [width, height]


def build_ui(spec: Spec, api: dict, object_info: dict, version: str | None = None) -> dict:
    version = version or pack_version()
    ids = sorted(api, key=int)
    placed = [node_id for column in spec.layout for node_id in column if node_id != "note"]
    if sorted(placed, key=int) != ids:
        raise ValueError(f"{spec.name}: layout places {sorted(placed, key=int)}, the API twin has {ids}")

    nodes, links, link_id = {}, [], 0
    # Pass 1: node shells with their sockets.
    for node_id in ids:
        api_node = api[node_id]
        class_type = api_node["class_type"]
        node_def = object_info.get(class_type)
        if node_def is None:
            raise KeyError(f"{spec.name}: node {node_id} is a {class_type}, which /object_info does not list")
        specs = input_specs(node_def)
        values = api_node["inputs"]
        unknown = set(values) - {name for name, *_ in specs}
        if unknown:
            raise KeyError(f"{spec.name}: node {node_id} ({class_type}) has inputs {sorted(unknown)} it does not define")
        inputs, widgets_values = [], []
        for name, kind, options, optional in specs:
            value = values.get(name)
            if is_widget(kind, options):
                if is_link(value):
                    inputs.append({"name": name, "type": kind, "widget": {"name": name}, "link": None})
                    value = options.get("default")   # the widget keeps a value while its socket is linked
                elif value is None:                  # the twins give every widget, optional ones too
                    raise KeyError(f"{spec.name}: node {node_id} ({class_type}) gives no value for {name}")
                widgets_values.append(value)
                if kind == "INT" and options.get("control_after_generate"):
                    widgets_values.append("fixed")   # the seed of the API twin, reproducibly
                if options.get("image_upload"):
                    widgets_values.append("image")
            else:
                slot = {"name": name, "type": kind, "link": None}
                if optional:
                    slot["shape"] = 7
                inputs.append(slot)
        outputs = [{"name": out_name, "type": out_type, "links": []}
                   for out_name, out_type in zip(node_def["output_name"], node_def["output"])]
        properties = {"Node name for S&R": class_type}
        if node_def["python_module"].startswith("custom_nodes."):
            properties.update({"cnr_id": "comfy-turbo", "ver": version})
        else:
            properties["cnr_id"] = "comfy-core"
        models = model_entries(class_type, values)
        if models:
            properties["models"] = models
        node = {"id": int(node_id), "type": class_type, "pos": [0, 0], "size": [0, 0], "flags": {}, "order": 0,
                "mode": 0, "inputs": inputs, "outputs": outputs}
        title = api_node.get("_meta", {}).get("title")
        if title:      # always explicit: display names change between ComfyUI versions ("Canny" in 0.3.75)
            node["title"] = title
        node["properties"] = properties
        node["widgets_values"] = widgets_values
        nodes[node_id] = node

    # Pass 2: links, numbered in the order of target node id and input slot.
    for node_id in ids:
        node = nodes[node_id]
        for slot_index, slot in enumerate(node["inputs"]):
            value = api[node_id]["inputs"].get(slot["name"])
            if value is None:
                continue
            if not is_link(value):
                raise ValueError(f"{spec.name}: node {node_id}.{slot['name']} is a socket but has value {value!r}")
            source_id, source_slot = value
            source = nodes[source_id]
            out_type = source["outputs"][source_slot]["type"]
            if out_type != slot["type"]:
                raise TypeError(f"{spec.name}: {source_id}:{source_slot} ({out_type}) -> "
                                f"{node_id}.{slot['name']} ({slot['type']})")
            link_id += 1
            slot["link"] = link_id
            source["outputs"][source_slot]["links"].append(link_id)
            links.append([link_id, int(source_id), source_slot, int(node_id), slot_index, out_type])
    for node in nodes.values():
        for out_slot in node["outputs"]:
            if not out_slot["links"]:
                out_slot["links"] = None

    # Execution order as the frontend computes it: a node after everything it depends on.
    order, done = [], set()

    def visit(node_id):
        if node_id in done:
            return
        for value in api[node_id]["inputs"].values():
            if is_link(value):
                visit(value[0])
        done.add(node_id)
        order.append(node_id)
    for node_id in ids:
        visit(node_id)

    # Layout: the spec's columns, top to bottom; "note" marks the Markdown note's place.
    note = {"id": NOTE_ID, "type": "MarkdownNote", "pos": [0, 0], "size": [0, 0], "flags": {}, "order": 0,
            "mode": 0, "inputs": [], "outputs": [], "title": "About this workflow", "properties": {},
            "widgets_values": [note_text(spec, api)], "color": "#432", "bgcolor": "#653"}
    placeable = {**nodes, "note": note}
    x = 0
    for column in spec.layout:
        y, width = 30, 0
        for node_id in column:
            node = placeable[node_id]
            node["size"] = estimate_size(node)
            node["pos"] = [x, y]
            y += node["size"][1] + ROW_GAP
            width = max(width, node["size"][0])
        x += width + COLUMN_GAP

    ordered = [note] + [nodes[node_id] for node_id in order]
    for index, node in enumerate(ordered):
        node["order"] = index

    workflow = {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfy-turbo/workflows/{spec.name}")),
        "revision": 0,
        "last_node_id": max(NOTE_ID, *(int(i) for i in ids)),
        "last_link_id": link_id,
        "nodes": sorted(ordered, key=lambda n: n["id"]),
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }
    taesd = [m for m in workflow_models(api) if m["directory"] == "vae_approx"]
    if taesd:
        workflow["models"] = taesd
    return workflow


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}_api.json").read_text())


def build_all(object_info: dict) -> dict[str, dict]:
    """name -> UI workflow, for every spec."""
    api_names = sorted(p.name[:-len("_api.json")] for p in API_DIR.glob("*_api.json"))
    if api_names != sorted(SPEC_BY_NAME):
        raise ValueError(f"workflows/api has {api_names}, the specs name {sorted(SPEC_BY_NAME)}")
    version = pack_version()
    return {spec.name: build_ui(spec, load_api(spec.name), object_info, version) for spec in SPECS}


def dumps(workflow: dict) -> str:
    """JSON with two-space indents, lists of plain values (positions, links) kept on one line."""
    def render(value, depth: int) -> str:
        pad, inner = "  " * depth, "  " * (depth + 1)
        if isinstance(value, dict) and value:
            items = [f"{inner}{json.dumps(k)}: {render(v, depth + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(value, list) and any(isinstance(v, (dict, list)) and v for v in value):
            return "[\n" + ",\n".join(inner + render(v, depth + 1) for v in value) + "\n" + pad + "]"
        return json.dumps(value, ensure_ascii=False)
    return render(workflow, 0) + "\n"


def fetch_object_info(url: str | None) -> dict:
    if url:
        with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as resp:
            return json.loads(resp.read())
    sys.path.insert(0, str(REPO / "scripts"))
    from comfy_host import ComfyHost
    with tempfile.TemporaryDirectory(prefix="comfy-turbo-build-") as base, ComfyHost(Path(base)) as host:
        return host.object_info()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running ComfyUI with comfy-turbo installed (default: start one)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file would change")
    args = parser.parse_args()
    built = build_all(fetch_object_info(args.url))
    stale = []
    for name, workflow in built.items():
        path = WORKFLOWS_DIR / f"{name}.json"
        text = dumps(workflow)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
    for path in stale:
        print(("out of date: " if args.check else "wrote ") + str(path.relative_to(REPO)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    raise SystemExit(main())
