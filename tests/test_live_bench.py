"""The live benchmark (bench/live_bench.py): a short real run, and the committed results behind docs/live.md.

Only structure and sanity are checked, never speed: the figures live in bench/results/live/.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_live_bench_runs_ours_and_stock_side_by_side(tmp_path, model_files):
    out = tmp_path / "live-smoke.json"
    cmd = [sys.executable, str(REPO / "bench" / "live_bench.py"), "--size", "64", "--model-size", "64", "--frames",
           "2", "--seconds", "2", "--typing-model", "sd-turbo", "--typing-text", "a fox", "--threads", "1",
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["models"] == "tiny" and results["comfyui_version"]
    transport = results["transport"]
    assert transport["ours_ms"]["n"] == transport["stock_ms"]["n"] == 4 and transport["ratio"] > 0
    (webcam,) = results["webcam"]
    for side in ("ours", "stock"):
        assert webcam[side]["total_ms"]["n"] == 2
        assert 0 < webcam[side]["model_ms"]["median"] < webcam[side]["total_ms"]["median"]
    (stream,) = results["stream"]
    assert stream["ours"]["frames_shown"] >= 1 and stream["stock"]["frames_shown"] >= 1
    assert stream["ours"]["max_queue_remaining"] <= 1
    (typing,) = results["typing"]
    assert typing["characters"] == 5
    for side in ("ours", "stock"):
        assert typing[side]["latency_ms"]["n"] == 5 and typing[side]["prompts"] >= 1
    md = out.with_suffix(".md").read_text()
    assert "| transport, no model" in md and "per-frame overhead outside the model" in md


def test_committed_live_results_cover_every_measurement_and_the_live_page_shows_them():
    import live_bench
    files = sorted((REPO / "bench" / "results" / "live").glob("*.json"))
    assert files, "commit the CPU results of `bash bench/live.sh`"
    for path in files:
        results = json.loads(path.read_text())
        assert results["transport"]["frames"] >= 20 and results["transport"]["size"] == 512
        assert results["webcam"] and all(w["size"] == 512 and w["frames"] >= 10 for w in results["webcam"])
        assert results["stream"] and all(s["seconds"] >= 20 for s in results["stream"])
        assert results["typing"] and all(t["characters"] >= 20 for t in results["typing"])
        assert path.with_suffix(".md").read_text().strip().endswith(live_bench.render(results).strip())
    page = live_bench.PAGE.read_text()
    start, end = page.index(live_bench.PAGE_START), page.index(live_bench.PAGE_END)
    assert page[start + len(live_bench.PAGE_START):end].strip() == live_bench.page_section().strip(), \
        "docs/live.md's figures are stale: run `python bench/live_bench.py --page docs/live.md`"
