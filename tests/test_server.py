"""The pack installed in a real ComfyUI server, driven over HTTP and the websocket."""
from __future__ import annotations

from pathlib import Path

import pytest

from workflow_utils import (SD15, SD_TURBO, SDXL_TURBO, TURBO_CHECKPOINTS, load_api, node_of, png_size, txt2img,
                            write_input_image)

REPO = Path(__file__).resolve().parents[1]
OUR_NODES = ["TurboCheckpointLoader", "TurboScheduler", "TurboFamilySchedule", "TurboEulerSampler", "TurboSampler",
             "TurboTextEncode", "TurboFastPath", "TurboVAEDecode", "TurboLiveInput", "TurboLiveOutput"]


def test_pack_loads_without_import_error(host):
    log = host.log_path.read_text()
    (timing,) = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/comfy-turbo")]
    assert "IMPORT FAILED" not in timing            # ComfyUI marks a pack that raised on import here
    assert "comfy-turbo module for custom nodes" not in log
    assert "comfy_entrypoint in" not in log         # V3 entrypoint warnings name the module path


@pytest.mark.parametrize("node_id", OUR_NODES)
def test_object_info_lists_node_with_documented_inputs(host, node_id):
    info = host.object_info()[node_id]
    assert info["python_module"].startswith("custom_nodes.")    # ours, not a built-in of the same name
    assert info["category"] == "sampling/turbo"
    assert info["display_name"] and info["display_name"] != node_id
    assert len(info["description"]) > 40
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    assert inputs, node_id
    for name, (_, options) in inputs.items():
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"


@pytest.mark.parametrize("node_id", OUR_NODES)
def test_node_help_page_is_served_where_the_frontend_asks(host, node_id):
    """The frontend's NodeHelpService fetches /extensions/<pack>/docs/<node>.md for a node whose
    python_module is custom_nodes.<pack> (after trying docs/<node>/<locale>.md); ours answers with the page."""
    module = host.object_info(node_id)[node_id]["python_module"].split(".")
    assert module[0] == "custom_nodes" and len(module) >= 2
    page = host.request(f"/extensions/{module[1]}/docs/{node_id}.md").decode()
    assert page.startswith("# ")
    assert (REPO / "web" / "docs" / f"{node_id}.md").read_text() == page


def test_our_ids_do_not_shadow_builtins(host):
    info = host.object_info()
    for node_id in OUR_NODES:
        assert node_id.startswith("Turbo")
    assert info["SDTurboScheduler"]["python_module"] == "comfy_extras.nodes_custom_sampler"


def test_loader_lists_checkpoints_and_dtypes(host):
    required = host.object_info("TurboCheckpointLoader")["TurboCheckpointLoader"]["input"]["required"]
    assert {SD_TURBO, SDXL_TURBO} <= set(required["ckpt_name"][1]["options"])
    assert required["weight_dtype"][1]["options"] == ["default", "fp16", "bf16", "fp32"]
    steps = host.object_info("TurboScheduler")["TurboScheduler"]["input"]["required"]["steps"][1]
    assert (steps["min"], steps["max"], steps["default"]) == (1, 4, 1)


def _progress_maxima(result):
    return [e["data"]["max"] for e in result.events if e["type"] == "progress"]


@pytest.mark.parametrize("ckpt", TURBO_CHECKPOINTS)
def test_txt2img_one_step(host, ckpt):
    result = host.run(txt2img(ckpt, width=192, height=128, prefix=f"test/{ckpt}"))
    assert result.status == "success", result.error
    images = result.images()
    assert len(images) == 1
    assert png_size(host.view(images[0])) == (192, 128)
    assert set(_progress_maxima(result)) == {1}        # one sampling step, reported to the UI


@pytest.mark.parametrize("ckpt", TURBO_CHECKPOINTS)
def test_img2img_two_steps_strength_half(host, ckpt):
    name = write_input_image(host.base_dir / "input", f"in-{ckpt}.png", 160, 128, seed=3)
    prompt = load_api("turbo_img2img_api.json")
    node_of(prompt, "TurboCheckpointLoader")["inputs"]["ckpt_name"] = ckpt
    node_of(prompt, "LoadImage")["inputs"]["image"] = name
    node_of(prompt, "SaveImage")["inputs"]["filename_prefix"] = f"test/img2img-{ckpt}"
    scheduler = node_of(prompt, "TurboScheduler")["inputs"]
    assert (scheduler["steps"], scheduler["strength"]) == (2, 0.5)
    result = host.run(prompt)
    assert result.status == "success", result.error
    assert png_size(host.view(result.images()[0])) == (160, 128)
    assert set(_progress_maxima(result)) == {1}        # int(2 * 0.5) = 1 step, at t=499


def test_sampler_node_in_core_sampler_custom(host):
    """The SAMPLER form, in core SamplerCustom at cfg 1 with our sigmas."""
    prompt = txt2img(SDXL_TURBO, steps=2, prefix="test/sampler-custom")
    prompt["10"] = {"class_type": "TurboEulerSampler", "inputs": {"eta": 1.0, "s_noise": 1.0, "noise_scale": "diffusers"}}
    prompt["11"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": 5, "cfg": 1.0, "positive": ["2", 0], "negative": ["2", 0],
        "sampler": ["10", 0], "sigmas": ["4", 0], "latent_image": ["3", 0]}}
    prompt["6"]["inputs"]["samples"] = ["11", 0]
    del prompt["5"]
    result = host.run(prompt)
    assert result.status == "success", result.error
    assert png_size(host.view(result.images()[0])) == (128, 128)
    assert set(_progress_maxima(result)) == {2}


def test_an_api_prompt_from_before_the_family_input_runs_as_turbo(host):
    """An API prompt saved before Load Turbo Checkpoint had ``family`` (issue 20) queues and gives the
    pixels of family 'turbo' (PNG bytes differ only in the embedded prompt)."""
    import io

    from PIL import Image

    def pixels(prompt) -> bytes:
        result = host.run(prompt)
        assert result.status == "success", result.error
        with Image.open(io.BytesIO(host.view(result.images()[0]))) as img:
            return img.tobytes()

    older = txt2img(SD_TURBO, seed=7, prefix="test/older")
    del node_of(older, "TurboCheckpointLoader")["inputs"]["family"]
    current = txt2img(SD_TURBO, seed=7, prefix="test/current")
    assert node_of(current, "TurboCheckpointLoader")["inputs"]["family"] == "turbo"
    assert pixels(older) == pixels(current)


def test_wrong_family_is_refused_and_server_recovers(host):
    result = host.run(txt2img(SD15, prefix="test/wrong"))
    assert result.status == "error"
    error = result.error
    assert error["node_type"] == "TurboCheckpointLoader"
    message = error["exception_message"]
    assert "SD15" in message and "sd15-tiny.safetensors" in message
    assert "Load Checkpoint" in message          # and the fix
    again = host.run(txt2img(SD_TURBO, prefix="test/after-wrong"))
    assert again.status == "success", again.error


@pytest.mark.parametrize("steps,strength,expected", [
    (1, 0.0, "strength=0.0 is out of range"),
    (1, 0.5, "steps * strength = 1 * 0.5 = 0.5 < 1, so no step would run"),
])
def test_scheduler_input_without_a_step_is_a_clear_execution_error(host, steps, strength, expected):
    prompt = txt2img(SD_TURBO, prefix="test/no-step")
    node_of(prompt, "TurboScheduler")["inputs"].update(steps=steps, strength=strength)
    result = host.run(prompt)
    assert result.status == "error"
    assert result.error["node_type"] == "TurboScheduler"
    assert expected in result.error["exception_message"]
    assert host.run(txt2img(SD_TURBO, prefix="test/after-no-step")).status == "success"
