"""The API-format graphs the benchmark queues: the stock ComfyUI graph and ours, each with its outputs.

Every path ends in the same bench-only output node (``SINK``), which only receives the IMAGE, so
no path pays for PNG encoding or disk writes. A group of paths shares one graph (and one executor,
so its checkpoint is loaded once); ``execute_outputs`` picks which output a run computes.
"""
from __future__ import annotations

SINK = "BenchImageSink"
PATHS = ("stock", "stock-taesd", "ours", "ours-fast", "ours-fast-taesd")
GROUP_OF = {"stock": "stock", "stock-taesd": "stock", "ours": "ours", "ours-fast": "fast", "ours-fast-taesd": "fast"}
OUTPUT_OF = {path: "out_" + path.replace("-", "_") for path in PATHS}
DECODE_NODE_OF = {"stock": "decode", "stock-taesd": "decode_taesd", "ours": "decode", "ours-fast": "decode",
                  "ours-fast-taesd": "decode_taesd"}
ENCODE_NODE = "positive"
SAMPLER_NODE = "sample"


class ImageSink:
    """Bench-only output node: takes the decoded IMAGE (already on the host) and keeps nothing."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "The decoded image."})}}

    RETURN_TYPES = ()
    FUNCTION = "consume"
    OUTPUT_NODE = True
    CATEGORY = "_bench"
    DESCRIPTION = "Benchmark sink."

    last_image = None   # what the last run produced (bench/run.py compares paths with it)

    def consume(self, images):
        ImageSink.last_image = images.cpu()
        return {}


def _sink(source: str) -> dict:
    return {"class_type": SINK, "inputs": {"images": [source, 0]}}


def stock_graph(ckpt: str, taesd: str, steps: int, batch: int, size: int, seed: int, text: str) -> dict:
    """CheckpointLoaderSimple, CLIPTextEncode, SDTurboScheduler, SamplerCustom (euler_ancestral, cfg 1), VAEDecode."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        ENCODE_NODE: {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "sigmas": {"class_type": "SDTurboScheduler", "inputs": {"model": ["ckpt", 0], "steps": steps, "denoise": 1.0}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        SAMPLER_NODE: {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": True, "noise_seed": seed, "cfg": 1.0, "positive": [ENCODE_NODE, 0],
            "negative": ["negative", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER_NODE, 0], "vae": ["ckpt", 2]}},
        OUTPUT_OF["stock"]: _sink("decode"),
        "taesd": {"class_type": "VAELoader", "inputs": {"vae_name": taesd}},
        "decode_taesd": {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER_NODE, 0], "vae": ["taesd", 0]}},
        OUTPUT_OF["stock-taesd"]: _sink("decode_taesd"),
    }


def ours_graph(ckpt: str, taesd: str, steps: int, batch: int, size: int, seed: int, text: str,
               fast: dict | None = None, lora: tuple[str, float] | None = None) -> dict:
    """Our nodes at their defaults; with ``fast`` (TurboFastPath and TurboVAEDecode options) the fast path;
    with ``lora`` (file, strength) a core LoraLoaderModelOnly after it."""
    model = ["ckpt", 0]
    graph = {
        "ckpt": {"class_type": "TurboCheckpointLoader", "inputs": {
            "ckpt_name": ckpt, "weight_dtype": (fast or {}).get("weight_dtype", "default")}},
        ENCODE_NODE: {"class_type": "TurboTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}},
    }
    if fast is not None:
        graph["fast"] = {"class_type": "TurboFastPath", "inputs": {"model": model, **fast["model"]}}
        model = ["fast", 0]
    if lora is not None:
        graph["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model, "lora_name": lora[0], "strength_model": lora[1]}}
        model = ["lora", 0]
    graph.update({
        "sigmas": {"class_type": "TurboScheduler", "inputs": {"model": model, "steps": steps, "strength": 1.0,
                                                               "spacing": "trailing"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        SAMPLER_NODE: {"class_type": "TurboSampler", "inputs": {
            "model": model, "positive": [ENCODE_NODE, 0], "latent_image": ["latent", 0], "sigmas": ["sigmas", 0],
            "seed": seed, "eta": 1.0, "s_noise": 1.0, "noise_scale": "diffusers"}},
    })
    vae_opts = (fast or {}).get("vae", {"precision": "auto", "compile": False})
    graph["decode"] = {"class_type": "TurboVAEDecode", "inputs": {
        "samples": [SAMPLER_NODE, 0], "vae": ["ckpt", 2], "decoder": "vae", **vae_opts}}
    if fast is None:
        graph[OUTPUT_OF["ours"]] = _sink("decode")
    else:
        graph[OUTPUT_OF["ours-fast"]] = _sink("decode")
        graph["decode_taesd"] = {"class_type": "TurboVAEDecode", "inputs": {
            "samples": [SAMPLER_NODE, 0], "vae": ["ckpt", 2], "decoder": taesd, **vae_opts}}
        graph[OUTPUT_OF["ours-fast-taesd"]] = _sink("decode_taesd")
    return graph


def group_graph(group: str, **kwargs) -> dict:
    fast = kwargs.pop("fast")
    if group == "stock":
        return stock_graph(**kwargs)
    return ours_graph(**kwargs, fast=fast if group == "fast" else None)
