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
