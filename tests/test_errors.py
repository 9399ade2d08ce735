"""Bad input over HTTP: a clear execution_error naming our node, the problem and the fix; the server
keeps serving and the next prompt succeeds. Model files are never executed."""
from __future__ import annotations

import itertools
import pickle

import pytest
import safetensors.torch
import torch

from comfy_host import PromptRejected
from workflow_utils import SD15, SD_TURBO, node_of, png_size, txt2img

_seeds = itertools.count(1000)


def assert_recovers(host):
    """The server is up and a fresh (uncached) prompt succeeds."""
    assert host.alive()
    result = host.run(txt2img(SD_TURBO, width=64, height=64, seed=next(_seeds), prefix="test/recovery"))
    assert result.status == "success", result.error


def assert_turbo_error(result, node_type, *phrases):
    assert result.status == "error", result.status
    error = result.error
    assert error["node_type"] == node_type
    message = error["exception_message"]
    assert message.startswith("comfy-turbo: "), message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"


class Evil:
    """Unpickling this runs code that writes a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def bad_checkpoints(host, model_files, tmp_path_factory):
    folder = host.models_dir / "checkpoints"
    good = safetensors.torch.load_file(str(model_files[SD_TURBO]))
    (folder / "bad-zero.safetensors").write_bytes(b"")
    (folder / "bad-truncated.safetensors").write_bytes(model_files[SD_TURBO].read_bytes()[:4_000_000])
    (folder / "bad-corrupt.safetensors").write_bytes(b"\xff" * 64 + bytes(range(256)) * 100)
    safetensors.torch.save_file({k: v for k, v in good.items() if not k.startswith("cond_stage_model.")},
                                str(folder / "bad-no-clip.safetensors"))
    safetensors.torch.save_file({k: v for k, v in good.items() if not k.startswith("first_stage_model.")},
                                str(folder / "bad-no-vae.safetensors"))
    safetensors.torch.save_file({"lora_unet_down.weight": torch.zeros(4, 4)}, str(folder / "bad-not-a-model.safetensors"))
    marker = tmp_path_factory.mktemp("pickle") / "pwned.txt"
    with open(folder / "bad-malicious.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"x": torch.zeros(1)}, "payload": Evil(marker)}, f)
    torch.save({"state_dict": {"first_stage_model.x": torch.zeros(2)}}, folder / "bad-plain-pickle.ckpt")
    return marker


@pytest.mark.parametrize("ckpt,phrases", [
    ("bad-zero.safetensors", ["'bad-zero.safetensors' is empty (0 bytes)", "Download the file again"]),
    ("bad-truncated.safetensors", ["not a complete safetensors file", "truncated or corrupt", "4,000,000 bytes"]),
    ("bad-corrupt.safetensors", ["not a complete safetensors file", "Download it again"]),
    ("bad-no-clip.safetensors", ["has no text encoder weights", "Load CLIP"]),
    ("bad-no-vae.safetensors", ["has no VAE weights", "Load VAE"]),
    ("bad-not-a-model.safetensors", ["no diffusion model that ComfyUI recognises", "own loaders"]),
    ("bad-plain-pickle.ckpt", ["no diffusion model that ComfyUI recognises"]),   # loads safely, then detection
    (SD15, ["is a SD15 checkpoint", "core 'Load Checkpoint' node"]),
])
def test_bad_checkpoint_files(host, bad_checkpoints, ckpt, phrases):
    result = host.run(txt2img(ckpt, width=64, height=64, prefix="test/bad"))
    assert_turbo_error(result, "TurboCheckpointLoader", *phrases)
    assert_recovers(host)


def test_malicious_pickle_is_never_executed(host, bad_checkpoints):
    marker = bad_checkpoints
    result = host.run(txt2img("bad-malicious.ckpt", width=64, height=64, prefix="test/evil"))
    assert_turbo_error(result, "TurboCheckpointLoader", "weights_only", "none of its code ran", ".safetensors")
    assert not marker.exists()
    # The payload is real: plain pickle.load would have run it.
    with open(host.models_dir / "checkpoints" / "bad-malicious.ckpt", "rb") as f:
        pickle.load(f)
    assert marker.read_text() == "pwned"
    marker.unlink()
    assert_recovers(host)


def _save_latent(host, name, tensor):
    """A .latent file as core SaveLatent writes it, for core LoadLatent."""
    safetensors.torch.save_file({"latent_tensor": tensor.contiguous(), "latent_format_version_0": torch.tensor([])},
                                str(host.base_dir / "input" / name))
    return name


def _with_loaded_latent(host, name):
    prompt = txt2img(SD_TURBO, width=64, height=64, prefix="test/latent")
    prompt["20"] = {"class_type": "LoadLatent", "inputs": {"latent": name}}
    node_of(prompt, "TurboSampler")["inputs"]["latent_image"] = ["20", 0]
    return prompt


@pytest.mark.parametrize("name,tensor,phrases", [
    ("sd3.latent", torch.randn(1, 16, 8, 8), ["16 channels", "needs 4", "SD3/Flux", "Empty Latent Image"]),
    ("nan.latent", torch.full((1, 4, 8, 8), float("nan")), ["NaN or inf", "VAE Encode"]),
    ("inf.latent", torch.full((1, 4, 8, 8), float("inf")), ["NaN or inf"]),
    ("video.latent", torch.randn(1, 4, 3, 8, 8), ["shape (1, 4, 3, 8, 8)", "video and audio latents"]),
])
def test_bad_latents(host, name, tensor, phrases):
    result = host.run(_with_loaded_latent(host, _save_latent(host, name, tensor)))
    assert_turbo_error(result, "TurboSampler", *phrases)
    assert_recovers(host)


def test_prompt_from_another_text_encoder(host):
    prompt = txt2img(SD_TURBO, width=64, height=64, prefix="test/wrong-clip")
    prompt["21"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}}
    node_of(prompt, "CLIPTextEncode")["inputs"]["clip"] = ["21", 1]
    result = host.run(prompt)
    assert_turbo_error(result, "TurboSampler", "encoded 768 wide", "needs 1024", "CLIP output of this checkpoint")
    assert_recovers(host)


@pytest.mark.parametrize("width,height", [(100, 76), (72, 132)])
def test_sizes_not_divisible_by_8_give_a_correct_image(host, width, height):
    """ComfyUI floors image sizes to multiples of 8 (the latent grid); the UNet takes any latent size."""
    result = host.run(txt2img(SD_TURBO, width=width, height=height, seed=next(_seeds), prefix="test/odd"))
    assert result.status == "success", result.error
    assert png_size(host.view(result.images()[0])) == (width // 8 * 8, height // 8 * 8)


@pytest.mark.parametrize("field,value,phrase", [
    ("steps", 0, "smaller than min of 1"), ("steps", 5, "bigger than max of 4"),
    ("strength", 1.5, "bigger than max of 1.0"), ("strength", -0.1, "smaller than min of 0.0"),
])
def test_out_of_range_widgets_are_refused_before_queueing(host, field, value, phrase):
    """Widget bounds are checked by ComfyUI's validation: HTTP 400 naming our node and the input."""
    prompt = txt2img(SD_TURBO, width=64, height=64, prefix="test/range")
    node_of(prompt, "TurboScheduler")["inputs"][field] = value
    with pytest.raises(PromptRejected) as rejected:
        host.post_prompt(prompt)
    body = rejected.value.body
    assert rejected.value.code == 400
    (node_error,) = [e for e in body["node_errors"].values() if e["class_type"] == "TurboScheduler"]
    (detail,) = node_error["errors"]
    assert phrase in detail["message"] and field in detail["details"]
    assert_recovers(host)


def test_cancel_during_sampling(host):
    """/interrupt while the sampler runs ends the prompt with execution_interrupted; the next one succeeds."""
    prompt = txt2img(SD_TURBO, width=256, height=256, steps=4, seed=next(_seeds), prefix="test/cancel")
    node_of(prompt, "EmptyLatentImage")["inputs"]["batch_size"] = 4
    sent = []

    def interrupt_on_first_step(event):
        if event["type"] == "progress" and not sent:
            sent.append(event["data"]["value"])
            host.interrupt()

    result = host.run(prompt, on_event=interrupt_on_first_step)
    assert sent == [1]
    assert result.status == "interrupted"
    assert result.error["node_type"] in ("TurboSampler", "VAEDecode")
    assert not result.images()
    assert_recovers(host)
