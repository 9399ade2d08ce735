#!/usr/bin/env python3
"""The checkpoints the benchmark runs on.

* ``tiny``: the test fixtures (tests/fixtures/make_models.py): shallow 320-channel UNets with the real
  full-size text encoders and VAE. For CPU runs.
* ``full``: random-weight SD-Turbo (SD 2.1 UNet, 866M parameters) and SDXL-Turbo (2.57B) in the
  real single-file layout, with the same full-size text encoders and VAE, for GPU runs. They are
  built by the fixture machinery (same builders, seeding, atomic writes and completion markers),
  with the UNet configs of the real models, into ``<cache>/bench-models`` on first use: about
  2.6 GB and 6.9 GB in fp16. Never commit them.

The UNet configs are what ComfyUI's ``detect_unet_config`` reports for the real files
(stabilityai/sd-turbo ``sd_turbo.safetensors``, stabilityai/sdxl-turbo
``sd_xl_turbo_1.0_fp16.safetensors``); ComfyUI's SD20 / SDXL model classes add the head sizes.

    python bench/models.py --models full [--verify]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
sys.path.insert(0, str(REPO / "scripts"))
import make_models  # noqa: E402
from comfy_host import cache_dir  # noqa: E402

FULL_UNET_CONFIGS = {
    "sd-turbo-full": dict(make_models._UNET_COMMON, adm_in_channels=None, context_dim=1024,
                          use_linear_in_transformer=True, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                          transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                          transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "sdxl-turbo-full": dict(make_models._UNET_COMMON, num_classes="sequential", adm_in_channels=2816,
                            context_dim=2048, use_linear_in_transformer=True, channel_mult=[1, 2, 4],
                            num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
                            transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
}
# UNet parameter counts of the released models (diffusers' UNet2DConditionModel.num_parameters()).
FULL_UNET_PARAMS = {"sd-turbo-full": 865_910_724, "sdxl-turbo-full": 2_567_463_684}

MODEL_SETS = {
    "tiny": {"sd-turbo": "sd-turbo-tiny.safetensors", "sdxl-turbo": "sdxl-turbo-tiny.safetensors"},
    "full": {"sd-turbo": "sd-turbo-full.safetensors", "sdxl-turbo": "sdxl-turbo-full.safetensors"},
}
TAESD_NAMES = {"sd-turbo": "taesd", "sdxl-turbo": "taesdxl"}


def lora_name(checkpoint: str) -> str:
    """The bench's LoRA for a checkpoint (same random-weight builder as the tests' fixtures)."""
    return checkpoint.replace(".safetensors", "-lora.safetensors")


def _register_full_models() -> None:
    """Add the full-size checkpoints to the fixture tables, as extra groups of their own."""
    for name, config in FULL_UNET_CONFIGS.items():
        family = name.replace("-full", "")
        make_models.UNET_CONFIGS[name] = config
        make_models.MODEL_CLASS[name] = make_models.MODEL_CLASS[family]
        make_models.FIXTURES[name] = (f"checkpoints/{name}.safetensors", name, "checkpoint", name)
        make_models.LORA_KEYS[name] = make_models.LORA_KEYS[family]
        make_models.FIXTURES[name + "-lora"] = (f"loras/{name}-lora.safetensors", name, "lora", name)
    make_models.GROUPS = tuple(dict.fromkeys(make_models.GROUPS + tuple(FULL_UNET_CONFIGS)))


def models_dir(model_set: str) -> Path:
    return cache_dir() / ("fixtures" if model_set == "tiny" else "bench-models")


def ensure(model_set: str, families: list[str], comfyui_path: str, device: str | None = None) -> Path:
    """Generate (once) the checkpoints of ``families`` in ``model_set`` plus TAESD; returns the models dir.
    ``device``: where full-size checkpoints are built (a GPU: seconds instead of minutes); tiny ones are
    always built on the CPU, byte-identical to the tests' fixtures."""
    out = models_dir(model_set)
    if model_set == "tiny":
        groups = list(families) + ["loras", "taesd"]
    else:
        _register_full_models()
        groups = [f + "-full" for f in families] + ["taesd"]
    make_models.ensure_models(str(out), comfyui_path, groups, device=None if model_set == "tiny" else device)
    return out


def unet_parameters(path: Path) -> int:
    """UNet parameters in a single-file checkpoint, from the safetensors header only (no tensor is read)."""
    import math
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.diffusion_model."))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=sorted(MODEL_SETS), default="full")
    parser.add_argument("--only", nargs="+", choices=sorted(TAESD_NAMES), default=sorted(TAESD_NAMES))
    parser.add_argument("--verify", action="store_true", help="check the UNet parameter counts of full models")
    args = parser.parse_args(argv)
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        parser.error("COMFYUI_PATH is not set: run through scripts/env.sh")
    out = ensure(args.models, args.only, comfyui)
    for family in args.only:
        path = out / "checkpoints" / MODEL_SETS[args.models][family]
        params = unet_parameters(path)
        print(f"{path.name}: {path.stat().st_size / 2**30:.2f} GiB, UNet {params / 1e6:.1f}M parameters")
        expected = FULL_UNET_PARAMS.get(path.stem)
        if args.verify and expected is not None and params != expected:
            print(f"  expected {expected / 1e6:.1f}M", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
