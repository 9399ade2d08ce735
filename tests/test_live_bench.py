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

LOOPS = ("server", "browser_driven", "stock")
OURS = LOOPS[:2]


def check_results(results: dict, frames: int | None = None) -> None:
    """The three loops in every measurement, with figures that hang together (whatever the machine's speed)."""
    import live_bench
    assert results["schema"] == live_bench.SCHEMA and tuple(results["loops"]) == LOOPS == live_bench.LOOPS
    transport = results["transport"]
    for kind in LOOPS:
        assert transport[kind]["total_ms"]["n"] == transport["frames"] and transport[kind]["total_ms"]["median"] > 0
    for kind in OURS:
        stages = transport[kind]["stages_ms"]
        assert {"wait", "decode", "graph", "encode", "server"} <= stages.keys() and "between" not in stages
    for webcam in results["webcam"]:
        for kind in LOOPS:
            assert webcam[kind]["total_ms"]["n"] == webcam["frames"] == (frames or webcam["frames"])
            assert 0 < webcam[kind]["model_ms"]["median"] < webcam[kind]["total_ms"]["median"]
    for stream in results["stream"]:
        for kind in LOOPS:
            assert stream[kind]["frames_shown"] >= 2 and stream[kind]["fps"] > 0
            assert 0 < stream[kind]["busy"] <= 1.05                      # clocks of client and server: a little slack
            assert stream[kind]["gap_overhead_ms"]["mean"] is not None
            assert len(stream[kind]["pictures"]) == stream[kind]["frames_shown"]
        for kind in OURS:
            between, tail = stream[kind]["between_ms"], stream[kind]["tail"]
            assert between["n"] >= 1 and between["median"] >= 0 and tail["frames"] >= 1
            assert 0 <= tail["gc_share"] <= 1 and stream[kind]["max_queue_remaining"] <= 2
    for typing in results["typing"]:
        for kind in LOOPS:
            assert typing[kind]["latency_ms"]["n"] == typing["characters"] and typing[kind]["prompts"] >= 1


def test_live_bench_runs_the_three_loops_side_by_side(tmp_path, model_files):
    out = tmp_path / "live-smoke.json"
    cmd = [sys.executable, str(REPO / "bench" / "live_bench.py"), "--size", "64", "--model-size", "64", "--frames",
           "2", "--seconds", "4", "--typing-model", "sd-turbo", "--typing-text", "a fox", "--threads", "1",
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["models"] == "tiny" and results["comfyui_version"]
    assert results["transport"]["frames"] == 4
    (typing,) = results["typing"]
    assert typing["characters"] == 5
    check_results(results, frames=2)
    md = out.with_suffix(".md").read_text()
    for must in ("| transport, no model", "per-frame overhead outside the model", "browser-driven", "target (issue #18)",
                 "not measured (no GPU)"):
        assert must in md, must


def test_committed_live_results_cover_every_measurement_and_the_live_page_shows_them():
    import live_bench
    files = sorted((REPO / "bench" / "results" / "live").glob("*.json"))
    assert files, "commit the CPU results of `bash bench/live.sh`"
    for path in files:
        results = json.loads(path.read_text())
        assert results.get("schema") == live_bench.SCHEMA, \
            f"{path.name} predates the three-loop benchmark: re-run `bash bench/live.sh` (see bench/live_bench.py)"
        check_results(results)
        assert results["transport"]["frames"] >= 20 and results["transport"]["size"] == 512
        assert results["webcam"] and all(w["size"] == 512 and w["frames"] >= 10 for w in results["webcam"])
        assert results["stream"] and all(s["seconds"] >= 20 for s in results["stream"])
        for stream in results["stream"]:
            assert stream["server"]["between_ms"]["n"] >= 10
            if results["device"] == "cpu":         # frames come faster than the model: a frame always waits
                assert stream["server"]["model_ms"]["median"] > 1000 / stream["camera_fps"]
        assert results["typing"] and all(t["characters"] >= 20 for t in results["typing"])
        assert path.with_suffix(".md").read_text().strip().endswith(live_bench.render(results).strip())
    page = live_bench.PAGE.read_text()
    start, end = page.index(live_bench.PAGE_START), page.index(live_bench.PAGE_END)
    assert page[start + len(live_bench.PAGE_START):end].strip() == live_bench.page_section().strip(), \
        "docs/live.md's figures are stale: run `python bench/live_bench.py --page docs/live.md`"
