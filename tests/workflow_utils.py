"""Load the shipped API-format workflows and point them at test models and sizes."""
from __future__ import annotations

import copy
import io
import json
import random
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
API_DIR = REPO / "workflows" / "api"

SD_TURBO = "sd-turbo-tiny.safetensors"
SDXL_TURBO = "sdxl-turbo-tiny.safetensors"
SD15 = "sd15-tiny.safetensors"
TURBO_CHECKPOINTS = [SD_TURBO, SDXL_TURBO]


def load_api(name: str) -> dict:
    return json.loads((API_DIR / name).read_text())


def node_of(prompt: dict, class_type: str) -> dict:
    matches = [n for n in prompt.values() if n["class_type"] == class_type]
    assert len(matches) == 1, f"expected one {class_type}, found {len(matches)}"
    return matches[0]


def txt2img(ckpt: str, width: int = 128, height: int = 128, steps: int = 1, seed: int = 1,
            prefix: str = "test/txt2img", text: str | None = None) -> dict:
    prompt = copy.deepcopy(load_api("turbo_txt2img_api.json"))
    node_of(prompt, "TurboCheckpointLoader")["inputs"]["ckpt_name"] = ckpt
    node_of(prompt, "EmptyLatentImage")["inputs"].update(width=width, height=height)
    node_of(prompt, "TurboScheduler")["inputs"]["steps"] = steps
    node_of(prompt, "TurboSampler")["inputs"]["seed"] = seed
    node_of(prompt, "SaveImage")["inputs"]["filename_prefix"] = prefix
    if text is not None:
        node_of(prompt, "CLIPTextEncode")["inputs"]["text"] = text
    return prompt


def write_input_image(input_dir: Path, name: str, width: int, height: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(width * height)])
    image.save(input_dir / name)
    return name


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


# --- the shipped workflow gallery (workflows/*.json and their API twins) ----------------------

UI_DIR = REPO / "workflows"
TEST_SIZE = 128          # the committed workflows are 512 px; tests run them at this size

# The file names the workflows ask for (models/<folder>/<name>) -> the generated stand-in that the
# tests install under that name, so every workflow opens and runs unmodified apart from its size.
USER_MODEL_STAND_INS = {
    ("checkpoints", "sd_turbo.safetensors"): "sd-turbo-tiny.safetensors",
    ("checkpoints", "sd_xl_turbo_1.0_fp16.safetensors"): "sdxl-turbo-tiny.safetensors",
    ("loras", "toy_face_sdxl.safetensors"): "sdxl-turbo-tiny-lora.safetensors",
    ("loras", "pixel-art-xl.safetensors"): "sdxl-turbo-tiny-lora.safetensors",
    ("controlnet", "controlnet-canny-sdxl-1.0.fp16.safetensors"): "sdxl-turbo-tiny-controlnet.safetensors",
    ("vae_approx", "taesd_encoder.pth"): "taesd_encoder.safetensors",
    ("vae_approx", "taesd_decoder.pth"): "taesd_decoder.safetensors",
    ("vae_approx", "taesdxl_encoder.pth"): "taesdxl_encoder.safetensors",
    ("vae_approx", "taesdxl_decoder.pth"): "taesdxl_decoder.safetensors",
    # The other few-step families: SDXL distillations and LoRAs on the SDXL stand-ins, the flow models on
    # tiny SD3 / FLUX.1-schnell stand-ins with a 16-channel VAE and the CLIP-L / CLIP-G encoders.
    ("checkpoints", "sd_xl_base_1.0.safetensors"): "sdxl-turbo-tiny.safetensors",
    ("checkpoints", "sdxl_lightning_4step.safetensors"): "sdxl-turbo-tiny.safetensors",
    ("loras", "dmd2_sdxl_4step_lora.safetensors"): "sdxl-turbo-tiny-unet-lora.safetensors",
    ("loras", "Hyper-SDXL-1step-lora.safetensors"): "sdxl-turbo-tiny-unet-lora.safetensors",
    ("loras", "lcm-lora-sdxl.safetensors"): "sdxl-turbo-tiny-unet-lora.safetensors",
    ("checkpoints", "sd3.5_large_turbo.safetensors"): "sd3-tiny.safetensors",
    ("diffusion_models", "flux1-schnell.safetensors"): "flux-schnell-tiny.safetensors",
    ("vae", "ae.safetensors"): "flow-vae-tiny.safetensors",
    ("text_encoders", "clip_l.safetensors"): "clip-l-tiny.safetensors",
    ("text_encoders", "clip_g.safetensors"): "clip-g-tiny.safetensors",
    # Listed only, so the workflows' widgets validate: T5-XXL (4.7B parameters) cannot be a stand-in here, and the
    # flow twins run with ComfyUI's T5-less SD3 text path instead (flow_stand_in_text below).
    ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"): "clip-l-tiny.safetensors",
}

# The nodes that load a workflow's diffusion model, and the widget naming its file.
MODEL_LOADERS = {"TurboCheckpointLoader": ("checkpoints", "ckpt_name"),
                 "CheckpointLoaderSimple": ("checkpoints", "ckpt_name"), "UNETLoader": ("diffusion_models", "unet_name")}
T5_TEXT_LOADERS = ("TripleCLIPLoader", "DualCLIPLoader")
# What replaces them in a test run (here and in the browser tests' queued prompt): ComfyUI's T5-less SD3 text path.
FLOW_STAND_IN_TEXT_LOADER = {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "sd3"}}


def gallery_names() -> list[str]:
    """Names of the UI workflows in workflows/ (each has workflows/api/<name>_api.json)."""
    return sorted(p.stem for p in UI_DIR.glob("*.json"))


def gallery_names_by_checkpoint() -> list[str]:
    """The gallery grouped by the checkpoint it loads, so a server loads each model once."""
    def key(name):
        return model_stand_in(load_api_twin(name)), name
    return sorted(gallery_names(), key=key)


def model_stand_in(prompt: dict) -> str:
    """The stand-in file of the diffusion model a prompt loads (its first model loader)."""
    for node in prompt.values():
        if node["class_type"] in MODEL_LOADERS:
            folder, widget = MODEL_LOADERS[node["class_type"]]
            return USER_MODEL_STAND_INS[(folder, node["inputs"][widget])]
    raise KeyError("the prompt loads no diffusion model")


def flow_stand_in_text(prompt: dict) -> dict:
    """The same prompt with its T5 text-encoder loader (TripleCLIPLoader, DualCLIPLoader flux) replaced by
    ComfyUI's T5-less SD3 text path, CLIPLoader clip_l type sd3 (77 x 4096 context, 2048 pooled: the
    widths the SD3 and FLUX.1-schnell stand-ins take). T5-XXL (4.7B parameters) does not fit a test run."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] in T5_TEXT_LOADERS:
            node.update(copy.deepcopy(FLOW_STAND_IN_TEXT_LOADER))
    return prompt


def load_ui(name: str) -> dict:
    return json.loads((UI_DIR / f"{name}.json").read_text())


def load_api_twin(name: str) -> dict:
    return load_api(f"{name}_api.json")


def is_live(prompt: dict) -> bool:
    """A Turbo Live graph: its image goes to a live session's client, not to a file."""
    return any(node["class_type"] == "TurboLiveOutput" for node in prompt.values())


def live_names() -> list[str]:
    return [name for name in gallery_names() if is_live(load_api_twin(name))]


def shrink(prompt: dict, size: int = TEST_SIZE) -> dict:
    """The same prompt with every Empty Latent Image and Turbo Live Input at size x size (linked sizes replaced)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage", "TurboLiveInput"):
            node["inputs"].update(width=size, height=size)
    return prompt


def sampling_steps(prompt: dict) -> int:
    """How many steps the prompt's Turbo Scheduler (or Turbo Family Schedule) runs: int(steps * strength)."""
    schedulers = [n for n in prompt.values() if n["class_type"] in ("TurboScheduler", "TurboFamilySchedule")]
    assert len(schedulers) == 1, f"expected one Turbo Scheduler or Turbo Family Schedule, found {len(schedulers)}"
    inputs = schedulers[0]["inputs"]
    return int(inputs["steps"] * inputs["strength"])


def png_pixels(data: bytes) -> bytes:
    """The decoded RGB pixels of a PNG (its metadata, which holds the prompt, left out)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB").tobytes()
