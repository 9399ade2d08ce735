"""The fast path nodes in a real ComfyUI server, over HTTP: LoRA + torch.compile + TAESD, prompt memo."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from workflow_utils import SD_TURBO

NEW_NODES = ["TurboTextEncode", "TurboFastPath", "TurboVAEDecode"]


def fast_graph(seed: int, lora: float, text: str = "a lighthouse at dusk", fast: bool = True, prefix: str = "fast"):
    """Turbo loader -> LoraLoader -> [Turbo Fast Path, compiled] -> Turbo Sampler -> Turbo VAE Decode (TAESD)."""
    model = ["fast", 0] if fast else ["lora", 0]
    graph = {
        "ckpt": {"class_type": "TurboCheckpointLoader", "inputs": {"ckpt_name": SD_TURBO, "weight_dtype": "default"}},
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                        "lora_name": "sd-turbo-tiny-lora.safetensors",
                                                        "strength_model": lora, "strength_clip": lora}},
        "text": {"class_type": "TurboTextEncode", "inputs": {"clip": ["lora", 1], "text": text}},
        "sigmas": {"class_type": "TurboScheduler", "inputs": {"model": model, "steps": 2, "strength": 1.0,
                                                               "spacing": "trailing"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "TurboSampler", "inputs": {
            "model": model, "positive": ["text", 0], "latent_image": ["latent", 0], "sigmas": ["sigmas", 0],
            "seed": seed, "eta": 1.0, "s_noise": 1.0, "noise_scale": "diffusers"}},
        "decode": {"class_type": "TurboVAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2],
                                                               "decoder": "taesd", "precision": "auto",
                                                               "compile": fast}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"test/{prefix}"}},
    }
    if fast:
        graph["fast"] = {"class_type": "TurboFastPath", "inputs": {
            "model": ["lora", 0], "attention": "sdpa", "sdpa_backend": "auto", "channels_last": True,
            "compile": "inductor"}}
    return graph


def pixels(host, result) -> np.ndarray:
    assert result.status == "success", result.error
    (image,) = result.images()
    return np.asarray(Image.open(io.BytesIO(host.view(image))), dtype=np.int16)


@pytest.mark.parametrize("node_id", NEW_NODES)
def test_object_info_documents_the_fast_path_nodes(host, node_id):
    info = host.object_info()[node_id]
    assert info["python_module"].startswith("custom_nodes.") and info["category"] == "sampling/turbo"
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    for name, (_, options) in inputs.items():
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_compiled_fast_path_with_lora_and_taesd_over_http(host):
    """Compiled UNet and decoder in the server's executor: new seeds, LoRA changes, same pixels as eager."""
    first = pixels(host, host.run(fast_graph(seed=1, lora=1.0, prefix="fast-a")))
    second = pixels(host, host.run(fast_graph(seed=2, lora=1.0, prefix="fast-b")))     # the compiled graph again
    no_lora = pixels(host, host.run(fast_graph(seed=1, lora=0.0, prefix="fast-c")))
    again = pixels(host, host.run(fast_graph(seed=1, lora=1.0, prefix="fast-d")))
    eager = pixels(host, host.run(fast_graph(seed=1, lora=1.0, fast=False, prefix="eager")))
    assert first.shape == (64, 64, 3)
    assert np.abs(first - second).mean() > 2                # another seed
    assert np.abs(first - no_lora).mean() > 2               # the LoRA reaches the compiled UNet ...
    assert np.abs(first - again).max() <= 1                 # ... and leaves it again
    assert np.abs(first - eager).max() <= 2                 # compiled == eager up to rounding to 8 bits


def test_toggled_prompts_over_http(host):
    """Toggling between two prompts: ComfyUI re-runs Turbo Text Encode, whose memo must answer exactly."""
    texts = ["a red door", "a blue door"]
    images = [pixels(host, host.run(fast_graph(seed=3, lora=0.5, text=t, fast=False, prefix=f"memo-{i}")))
              for i, t in enumerate(texts + texts)]
    assert not np.array_equal(images[0], images[1])         # the prompt matters (little, with random weights)
    assert np.array_equal(images[0], images[2]) and np.array_equal(images[1], images[3])
