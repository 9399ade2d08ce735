"""Run the shipped txt2img workflow through a real headless ComfyUI and report stage timings."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_host import REPO_ROOT, ComfyHost, cache_dir  # noqa: E402

STAND_INS = {"sdxl": "sdxl-turbo-tiny.safetensors", "sd": "sd-turbo-tiny.safetensors"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, help="a real SD-Turbo / SDXL-Turbo .safetensors file; "
                                                        "without it a random-weight stand-in is generated")
    parser.add_argument("--stand-in", choices=sorted(STAND_INS), default="sdxl",
                        help="which stand-in to generate when no --checkpoint is given (default: sdxl)")
    parser.add_argument("--prompt", help="the positive prompt (default: the workflow's)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=1, choices=[1, 2, 3, 4])
    parser.add_argument("--size", type=int, help="square output size in pixels (default: native 512)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out", help="where the PNG is copied (default: out/)")
    args = parser.parse_args()

    stages: list[tuple[str, float]] = []
    t0 = time.monotonic()
    if args.checkpoint:
        checkpoint = args.checkpoint.expanduser().resolve()
        if not checkpoint.is_file():
            parser.error(f"--checkpoint {checkpoint} is not a file")
    else:
        fixtures = cache_dir() / "fixtures"
        name = {"sdxl": "sdxl-turbo", "sd": "sd-turbo"}[args.stand_in]
        subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "fixtures" / "make_models.py"),
                        "--comfyui", os.environ["COMFYUI_PATH"], "--out", str(fixtures), "--only", name], check=True)
        checkpoint = fixtures / "checkpoints" / STAND_INS[args.stand_in]
        stages.append(("stand-in checkpoint (cached after the first run)", time.monotonic() - t0))

    prompt = json.loads((REPO_ROOT / "workflows" / "api" / "turbo_txt2img_api.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = checkpoint.name
    prompt["4"]["inputs"]["steps"] = args.steps
    prompt["5"]["inputs"]["seed"] = args.seed
    if args.prompt:
        prompt["2"]["inputs"]["text"] = args.prompt
    if args.size:
        prompt["3"]["inputs"].update(width=args.size, height=args.size)

    host = ComfyHost(cache_dir() / "demo-host")
    host.install_model(checkpoint, "checkpoints")
    t = time.monotonic()
    with host:
        stages.append(("ComfyUI server start", time.monotonic() - t))
        t = time.monotonic()
        result = host.run(prompt, timeout=1800)
        total = time.monotonic() - t
        if result.status != "success":
            print(f"FAILED: {json.dumps(result.error, indent=2)}", file=sys.stderr)
            return 1
        per_node = result.node_seconds()
        for node_id, seconds in per_node.items():
            title = prompt[node_id].get("_meta", {}).get("title", prompt[node_id]["class_type"])
            stages.append((f"  node {node_id} {title}", seconds))
        stages.append(("prompt total (queue -> saved PNG)", total))
        image = result.images()[0]
        args.out.mkdir(parents=True, exist_ok=True)
        target = args.out / image["filename"]
        target.write_bytes(host.view(image))

    print(f"\ncheckpoint: {checkpoint}")
    print(f"{'stage':<52} {'seconds':>9}")
    for stage, seconds in stages:
        print(f"{stage:<52} {seconds:>9.3f}")
    print(f"\nPNG written to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
