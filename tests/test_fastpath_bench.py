"""The benchmark command itself: a short real run, its report, and the full-size model configs.

Only structure and sanity are checked here, never speed (timings live in bench/results/).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_bench_runs_both_paths_through_the_executor(tmp_path, model_files):
    env = dict(os.environ)
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--only", "sd-turbo", "--size", "64", "--steps", "2",
           "--batch", "1", "--runs", "2", "--warmup", "1", "--stage-runs", "1", "--threads", "1", "--paths", "stock", "ours",
           "stock-taesd", "--out", str(tmp_path), "--name", "smoke", "--quiet", "--extras", "on", "--compile", "off"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert results["device"] == "cpu" and results["device_name"]
    entry = results["models"]["sd-turbo"]
    assert entry["checkpoint"] == "sd-turbo-tiny.safetensors" and entry["size"] == 64
    rows = {r["path"]: r for r in entry["rows"]}
    assert set(rows) == {"stock", "ours", "stock-taesd"}
    for path, row in rows.items():
        assert row["latency_ms"]["n"] == 2 and row["latency_ms"]["median"] > 0
        stages = row["stages_ms"]
        assert len(stages["unet_steps"]) == 2 and all(s > 0 for s in stages["unet_steps"])   # one per step
        assert stages["decode"] > 0 and stages["text_encode_new"] > 0
        assert stages["decoder"] == ("taesd" if path == "stock-taesd" else "vae")
        assert row["memory"]["kind"] == "cpu resident set"
    assert rows["ours"]["ratio_vs_stock"] > 0 and "paired_ratio_vs_stock" in rows["ours"]
    assert all(len(row["warmup_ms"]) == 1 and row["warmup_ms"][0] > 0 for row in rows.values())   # first images
    extras = entry["extras"]
    assert extras["lora_switch"]["steady_ms"]["n"] == 2 and extras["lora_switch"]["switching_ms"]["median"] > 0
    assert extras["fast_vs_plain"]["max_abs_diff"] < 1e-3      # fp32 on the CPU: rounding only
    assert "precision" not in extras                           # fp16 against bf16 is a CUDA question
    md = (tmp_path / "smoke.md").read_text()
    assert "| steps | batch | stock ComfyUI | stock + TAESD | ours (default) |" in md and "pending a GPU run" in md
    assert "First runs" in md and "a switch costs" in md
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name,family", [("sd-turbo-full", "SD20"), ("sdxl-turbo-full", "SDXL")])
def test_full_size_configs_match_the_released_models(comfy, name, family):
    """The GPU benchmark's random-weight UNets have the real models' parameter counts and are detected as such."""
    import torch
    import comfy.model_detection
    import comfy.supported_models
    import models as bench_models
    config = getattr(comfy.supported_models, family)(bench_models.FULL_UNET_CONFIGS[name])
    unet = config.get_model({}, device=torch.device("meta")).diffusion_model
    assert sum(p.numel() for p in unet.parameters()) == bench_models.FULL_UNET_PARAMS[name]
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(detected).__name__ == family


def test_committed_results_cover_the_issue_settings_and_the_performance_page_shows_them():
    """bench/results/ holds whole runs (both models, 1 and 4 steps, batch 1 and 4, every path, 20+ rounds),
    and docs/performance.md's generated section is exactly what bench/report.py renders from them."""
    import report
    files = sorted((REPO / "bench" / "results").glob("*.json"))
    assert any(f.name.startswith("cpu-") for f in files), "no CPU results committed under bench/results/"
    for f in files:
        results = json.loads(f.read_text())
        assert f.stem == results["name"] and results["device_name"]
        assert set(results["models"]) == {"sd-turbo", "sdxl-turbo"}, f.name
        for family, entry in results["models"].items():
            cells = {(r["steps"], r["batch"], r["path"]) for r in entry["rows"]}
            assert cells == {(s, b, p) for s in (1, 4) for b in (1, 4) for p in report.PATHS}, (f.name, family)
            assert all(r["latency_ms"]["n"] >= 20 for r in entry["rows"]), (f.name, family)
            for suffix in (".md", ".png"):
                assert f.with_suffix(suffix).exists(), f"{f.with_suffix(suffix).name} missing: run bench/report.py"
    section = report.section_of(report.PAGE, report.PAGE_START, report.PAGE_END)
    assert section.strip() == report.page_section().strip(), \
        "docs/performance.md is stale: run `python bench/report.py --page docs/performance.md`"


def test_rerunning_one_setting_replaces_only_that_setting_and_keeps_notes():
    import run as bench_run
    entry = {"checkpoint": "c", "model_set": "tiny", "size": 128, "fast_options": {}}
    def rows(settings, tag):
        return [{"steps": s, "batch": b, "path": "stock", "tag": tag} for s, b in settings]
    first = bench_run.merge_entry(None, entry, rows([(1, 1), (4, 1)], "a"), {"settings": [(1, 1), (4, 1)]})
    first["notes"] = ["remark"]
    second = bench_run.merge_entry(first, entry, rows([(4, 1)], "b"), {"settings": [(4, 1)]})
    assert [(r["steps"], r["tag"]) for r in second["rows"]] == [(1, "a"), (4, "b")]
    assert [r["settings"] for r in second["runs"]] == [[(1, 1)], [(4, 1)]] and second["notes"] == ["remark"]
    other = bench_run.merge_entry(first, {**entry, "size": 256}, rows([(4, 1)], "c"), {"settings": [(4, 1)]})
    assert [r["tag"] for r in other["rows"]] == ["c"] and "notes" not in other   # another size starts afresh
