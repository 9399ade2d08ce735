"""Shared fixtures: the pack imported by path, generated model files, and a real ComfyUI server."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from comfy_host import cache_dir  # noqa: E402

pytest_plugins = ["skip_policy"]      # a skip must name a GPU or a second host; any other fails the run


def _register_pack() -> None:
    """Import the repo as the package ``comfy_turbo`` (its folder name may not be importable)."""
    if "comfy_turbo" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "comfy_turbo", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfy_turbo"] = module
    spec.loader.exec_module(module)


_register_pack()


def comfyui_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.exit("COMFYUI_PATH is not set: run the tests with `bash scripts/test.sh`.", returncode=2)
    return Path(path)


@pytest.fixture(scope="session")
def model_files() -> dict[str, Path]:
    """Generate (once, cached) the small random-weight model files; returns name -> path."""
    out = cache_dir() / "fixtures"
    subprocess.run([sys.executable, str(REPO / "tests" / "fixtures" / "make_models.py"),
                    "--comfyui", str(comfyui_path()), "--out", str(out)], check=True)
    return {p.name: p for p in out.rglob("*.safetensors")}


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in this process (CPU), for tests that count calls or read internals."""
    # ComfyUI first on sys.path, wherever it already is: its nodes.py must win over this repo's nodes/
    # package (`python -m pytest` run from the repo root puts the root on sys.path).
    path = str(comfyui_path())
    while path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    import comfy.sd  # noqa: F401
    import comfy.samplers  # noqa: F401
    import nodes
    assert Path(nodes.__file__).parent == Path(path), f"`nodes` is {nodes.__file__}, not ComfyUI's"
    return sys.modules["comfy"]


@pytest.fixture(scope="session")
def host(tmp_path_factory, model_files):
    """One real ComfyUI server for the session, with the pack and all generated models installed."""
    from comfy_host import ComfyHost
    server = ComfyHost(tmp_path_factory.mktemp("comfy-base"), comfyui_path())
    for path in model_files.values():
        server.install_model(path, path.parent.name)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def user_models(host, model_files):
    """The host's models/ and input/ as a user of the shipped workflows has them.

    Every file a workflow in workflows/ names is installed under that name, as a link to the
    generated stand-in (TAESD as .pth, as its GitHub release ships it), and input/example.png is
    ComfyUI's own example image at 128 px. Returns {(folder, name): installed path}.
    """
    import safetensors.torch
    import torch
    from PIL import Image

    from workflow_utils import TEST_SIZE, USER_MODEL_STAND_INS
    installed = {}
    converted = host.base_dir / "user-models"
    converted.mkdir(exist_ok=True)
    for (folder, name), stand_in in USER_MODEL_STAND_INS.items():
        source = model_files[stand_in]
        if name.endswith(".pth"):
            target = converted / name
            if not target.exists():
                torch.save(safetensors.torch.load_file(str(source)), target)
            source = target
        host.install_model(source, folder, name)
        installed[(folder, name)] = host.models_dir / folder / name
    example = comfyui_path() / "input" / "example.png"
    if example.is_file():
        with Image.open(example) as img:
            picture = img.convert("RGB").resize((TEST_SIZE, TEST_SIZE), Image.LANCZOS)
    else:                          # a checkout without input/: shapes with edges for Canny
        from PIL import ImageDraw
        picture = Image.new("RGB", (TEST_SIZE, TEST_SIZE), (40, 90, 160))
        draw = ImageDraw.Draw(picture)
        draw.ellipse((16, 16, 80, 80), fill=(240, 200, 40))
        draw.rectangle((56, 64, 116, 120), fill=(200, 60, 60))
    picture.save(host.base_dir / "input" / "example.png")
    return installed
